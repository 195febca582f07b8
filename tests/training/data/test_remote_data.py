"""Training data from object storage: data.path as a URL for arrays, tables and image folders, streamed through fsspec
(fsspec's memory:// filesystem for the unit cases, moto's S3 server on loopback for the rest)."""
import io
import uuid

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from aeserve.models.registry import Registry
from aeserve.training.config import build_run_config
from aeserve.training.data import arrays, locations
from aeserve.training.data.arrays import RemoteArray
from aeserve.training.data.config import DataConfig
from aeserve.training.data.dataset import DataError
from aeserve.training.data.sources import load_dataset
from aeserve.training.trainer import train
from tests.training.data.test_images import write_folder
from tests.training.data.test_tables import write_csv


def npy_bytes(x: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, x)
    return buffer.getvalue()


@pytest.fixture
def memory():
    """A fresh folder of fsspec's in-memory filesystem, as (filesystem, URL)."""
    fs, folder = fsspec.filesystem("memory"), f"/aeserve-{uuid.uuid4().hex[:8]}"
    yield fs, f"memory:/{folder}"
    fs.rm(folder, recursive=True)


@pytest.fixture
def s3(s3_bucket):
    import s3fs

    return s3fs.S3FileSystem(skip_instance_cache=True), s3_bucket


class CountedReads:
    """Wraps a filesystem's cat_ranges: how many ranges and bytes were asked for."""

    def __init__(self, monkeypatch, fs):
        self.ranges, self.bytes = 0, 0
        real = fs.cat_ranges

        def counted(paths, starts, ends, **kwargs):
            self.ranges += len(starts)
            self.bytes += sum(e - s for s, e in zip(starts, ends, strict=True))
            return real(paths, starts, ends, **kwargs)

        monkeypatch.setattr(fs, "cat_ranges", counted)


def test_rows_of_a_remote_array_read_as_numpy_indexes_them(memory, monkeypatch):
    fs, url = memory
    x = np.arange(1000 * 6, dtype=np.float32).reshape(1000, 6)
    fs.pipe(f"{url}/x.npy", npy_bytes(x))
    where = locations.location(f"{url}/x.npy")
    remote = RemoteArray(where, 128, x.shape, x.dtype)  # np.save writes a 128-byte header for this array
    reads = CountedReads(monkeypatch, where.fs)
    for key in (7, -1, slice(None), slice(10, 20), slice(990, 2000), slice(5, 50, 7), np.array([5, 3, 3, 999, -2, 0, 400, 401]),
                x[:, 0] % 3 == 0, np.array([], np.int64)):
        np.testing.assert_array_equal(remote[key], x[key])
    view = remote.rows(100, 200)
    assert view.shape == (100, 6) and len(view.rows(90, None)) == 10
    np.testing.assert_array_equal(np.asarray(view), x[100:200])
    np.testing.assert_array_equal(view[np.array([0, 99])], x[[100, 199]])
    with pytest.raises(IndexError):
        view[np.array([100])]
    # A gather is fetched as runs: rows a few bytes apart share one range; far apart ones do not.
    monkeypatch.setattr(arrays, "GAP_BYTES", 24 * 10)
    reads.ranges = 0
    np.testing.assert_array_equal(remote[np.array([900, 0, 5, 12, 500])], x[[900, 0, 5, 12, 500]])
    assert reads.ranges == 3  # 0..12, 500, 900


def test_a_big_npy_at_a_url_is_read_rows_on_demand_and_trains_as_the_local_file(memory, monkeypatch, tmp_path):
    fs, url = memory
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(600, 3)) @ rng.normal(size=(3, 12))).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    fs.pipe(f"{url}/x.npy", npy_bytes(x))
    monkeypatch.setattr(arrays, "REMOTE_WHOLE_BYTES", 1024)  # this array "does not fit": read rows on demand
    remote = load_dataset(DataConfig(source="npy", path=f"{url}/x.npy"))
    local = load_dataset(DataConfig(source="npy", path=str(tmp_path / "x.npy")))
    assert isinstance(remote.train_x, RemoteArray) and remote.train_x.shape == local.train_x.shape == (540, 12)
    np.testing.assert_array_equal(np.asarray(remote.test_x), local.test_x)  # the same contiguous split
    assert (remote.preprocessing.offset, remote.preprocessing.scale) == (local.preprocessing.offset, local.preprocessing.scale)
    # The fingerprint names the object by what the store says of it and its first and last blocks, not by its bytes.
    reads = CountedReads(monkeypatch, remote.train_x.file.fs)
    assert remote.fingerprint == remote.fingerprint != local.fingerprint
    assert reads.bytes <= 2 * 2 * locations.HEADER_BYTES
    registry = Registry(tmp_path / "registry")
    for name, path in (("remote", f"{url}/x.npy"), ("local", str(tmp_path / "x.npy"))):
        run = build_run_config({"name": name, "data": {"source": "npy", "path": path}, "model": {"kind": "mlp", "code_dim": 2, "hidden": [8]},
                                "train": {"epochs": 2, "batch_size": 32, "report": False}})
        train(run, registry, progress=False)
    assert registry.manifest("remote")["sha256"] == registry.manifest("local")["sha256"]  # the same rows, the same weights


def test_a_column_major_array_too_big_to_read_whole_is_refused(memory, monkeypatch):
    fs, url = memory
    fs.pipe(f"{url}/f.npy", npy_bytes(np.asfortranarray(np.ones((100, 4), np.float32))))
    monkeypatch.setattr(arrays, "REMOTE_WHOLE_BYTES", 100)
    with pytest.raises(DataError, match=r"f.npy: not a readable .npy array \(stored column-major .*np.ascontiguousarray"):
        load_dataset(DataConfig(source="npy", path=f"{url}/f.npy"))


def test_urls_that_name_nothing_or_a_folder_or_no_known_store_say_so(memory):
    fs, url = memory
    fs.pipe(f"{url}/folder/x.npy", npy_bytes(np.ones((4, 2), np.float32)))
    with pytest.raises(DataError, match=f"^{url}/nope.npy: file not found$"):
        load_dataset(DataConfig(source="npy", path=f"{url}/nope.npy"))
    with pytest.raises(DataError, match=f"^{url}/folder: is a directory; data.source 'npy' needs a file$"):
        load_dataset(DataConfig(source="npy", path=f"{url}/folder"))
    with pytest.raises(DataError, match=f"^{url}/folder/x.npy: is a file; data.source 'images' needs a folder"):
        load_dataset(DataConfig(source="images", path=f"{url}/folder/x.npy"))
    with pytest.raises(DataError, match="^nosuchstore://b/x.npy: cannot be read"):
        load_dataset(DataConfig(source="npy", path="nosuchstore://b/x.npy"))


def test_an_npy_from_s3_trains_and_has_the_local_files_fingerprint(s3, tmp_path):
    fs, bucket = s3
    x = np.random.default_rng(1).normal(size=(200, 8)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    fs.put(str(tmp_path / "x.npy"), f"{bucket}/arrays/x.npy")
    remote = load_dataset(DataConfig(source="npy", path=f"{bucket}/arrays/x.npy"))
    local = load_dataset(DataConfig(source="npy", path=str(tmp_path / "x.npy")))
    np.testing.assert_array_equal(remote.train_x, local.train_x)
    assert remote.fingerprint == local.fingerprint  # small: read whole, hashed as the local file is
    registry = Registry(tmp_path / "registry")
    run = build_run_config({"name": "x", "data": {"source": "npy", "path": f"{bucket}/arrays/x.npy"},
                            "model": {"kind": "mlp", "code_dim": 2, "hidden": [8]}, "train": {"epochs": 1, "batch_size": 32, "report": False}})
    assert train(run, registry, progress=False) == 1
    assert registry.manifest("x")["training"]["data"]["path"] == f"{bucket}/arrays/x.npy"


def test_npz_members_from_s3_stored_and_compressed(s3, tmp_path, monkeypatch):
    fs, bucket = s3
    x = np.random.default_rng(2).normal(size=(300, 5)).astype(np.float32)
    np.savez(tmp_path / "stored.npz", x=x, y=np.arange(300) % 3)
    np.savez_compressed(tmp_path / "packed.npz", x=x)
    fs.put(str(tmp_path / "stored.npz"), f"{bucket}/stored.npz")
    fs.put(str(tmp_path / "packed.npz"), f"{bucket}/packed.npz")
    monkeypatch.setattr(arrays, "REMOTE_WHOLE_BYTES", 1024)  # x is read rows on demand; y (2.4 KB) too
    stored = load_dataset(DataConfig(source="npz", path=f"{bucket}/stored.npz"))
    assert isinstance(stored.train_x, RemoteArray)
    np.testing.assert_array_equal(np.asarray(stored.test_x), x[270:])  # split as the local file is: the last rows
    np.testing.assert_array_equal(stored.train_y, np.arange(270) % 3)
    packed = load_dataset(DataConfig(source="npz", path=f"{bucket}/packed.npz"))  # deflated: read into memory whole
    local = load_dataset(DataConfig(source="npz", path=str(tmp_path / "packed.npz")))
    np.testing.assert_array_equal(packed.train_x, local.train_x)


def table_run(name, path, **data_keys):
    return build_run_config({"name": name, "data": {"source": "table", "path": path, "label": "is_big", "categorical": ["colour"], **data_keys},
                             "model": {"kind": "mlp", "code_dim": 2, "hidden": [8]}, "train": {"epochs": 1, "batch_size": 16, "report": False}})


def test_csv_and_parquet_tables_from_s3_train_as_the_local_files_do(s3, tmp_path):
    fs, bucket = s3
    csv = write_csv(tmp_path / "rows.csv", sep=";", bom=True, quote_numbers=True)
    local = load_dataset(table_run("t", str(csv)).data)
    pq.write_table(pa.table({"small": local.train_x[:, 0], "large": local.train_x[:, 1]}), tmp_path / "numbers.parquet", row_group_size=10)
    fs.put(str(csv), f"{bucket}/tables/rows.csv")
    fs.put(str(tmp_path / "numbers.parquet"), f"{bucket}/tables/numbers.parquet")
    remote = load_dataset(table_run("t", f"{bucket}/tables/rows.csv").data)
    np.testing.assert_array_equal(remote.train_x, local.train_x)
    assert remote.features == local.features and remote.fingerprint == local.fingerprint
    parquet = load_dataset(DataConfig(source="table", path=f"{bucket}/tables/numbers.parquet"))
    np.testing.assert_array_equal(np.sort(np.concatenate([parquet.train_x, parquet.test_x]), axis=0), np.sort(local.train_x[:, :2], axis=0))
    registry = Registry(tmp_path / "registry")
    assert train(table_run("rows", f"{bucket}/tables/rows.csv"), registry, progress=False) == 1
    assert train(build_run_config({"name": "numbers", "data": {"source": "table", "path": f"{bucket}/tables/numbers.parquet"},
                                   "model": {"kind": "pca", "code_dim": 1}, "train": {"report": False}}), registry, progress=False) == 1
    assert [f["name"] for f in registry.manifest("rows")["features"]] == ["small", "large", "colour"]


def test_a_bad_row_in_a_csv_on_s3_names_the_url_the_line_and_the_column(s3, tmp_path):
    fs, bucket = s3
    fs.put(str(write_csv(tmp_path / "rows.csv", blank=(40, 1, "lots"))), f"{bucket}/rows.csv")
    with pytest.raises(DataError, match=f"^{bucket}/rows.csv: line 42, column 'large': 'lots' is not a number; list the column in data.categorical"):
        load_dataset(table_run("t", f"{bucket}/rows.csv").data)
    fs.put(str(write_csv(tmp_path / "ragged.csv", blank=(9, 0, "0.05,7"))), f"{bucket}/ragged.csv")
    with pytest.raises(DataError, match=f"^{bucket}/ragged.csv: line 11 has 5 fields, the header 4"):
        load_dataset(table_run("t", f"{bucket}/ragged.csv").data)


def test_an_image_folder_on_s3_reads_as_the_local_folder_and_trains(s3, tmp_path):
    fs, bucket = s3
    folder = write_folder(tmp_path / "photos")
    fs.put(str(folder), f"{bucket}/photos", recursive=True)
    remote = load_dataset(DataConfig.from_dict({"source": "images", "path": f"{bucket}/photos/", "image_size": [8, 8]}))
    local = load_dataset(DataConfig.from_dict({"source": "images", "path": str(folder), "image_size": [8, 8]}))
    np.testing.assert_array_equal(remote.train_x, local.train_x)
    np.testing.assert_array_equal(remote.test_y, local.test_y)
    assert remote.facts == local.facts == {"labels": ["bright", "dark"], "image_size": [8, 8], "channels": 3, "files": 10, "skipped_files": 0}
    fs.pipe(f"{bucket}/photos/dark/broken.png", b"\x89PNG\r\n\x1a\nnot really a png")
    with pytest.raises(DataError, match=f"^{bucket}/photos/dark/broken.png: not a readable image"):
        load_dataset(DataConfig.from_dict({"source": "images", "path": f"{bucket}/photos", "image_size": [8, 8]}))
    registry = Registry(tmp_path / "registry")
    run = build_run_config({"name": "photos", "data": {"source": "images", "path": f"{bucket}/photos", "image_size": [8, 8], "skip_bad": True},
                            "model": {"kind": "conv", "code_dim": 2, "channels": [4]}, "train": {"epochs": 1, "batch_size": 4, "report": False}})
    assert train(run, registry, progress=False) == 1
    assert registry.manifest("photos")["training"]["skipped_files"] == 1


def test_train_data_picks_the_image_recipe_for_a_folder_at_a_url(s3, tmp_path, capsys, monkeypatch):
    from aeserve.cli import main

    fs, bucket = s3
    fs.put(str(write_folder(tmp_path / "photos")), f"{bucket}/photos", recursive=True)
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--data", f"{bucket}/photos", "--name", "photos", "--registry", str(tmp_path / "registry"), "--quiet",
                 "--set", "data.image_size=[8, 8]", "--set", "train.epochs=1", "--set", "model.channels=[4]", "--set", "train.report=false"]) == 0
    assert Registry(tmp_path / "registry").manifest("photos")["training"]["run_config"]["model"]["kind"] == "conv"
    assert main(["train", "--data", f"{bucket}/nothing-here.bin", "--registry", str(tmp_path / "registry")]) == 2
    assert "cannot tell the data's kind from the suffix '.bin'" in capsys.readouterr().err
