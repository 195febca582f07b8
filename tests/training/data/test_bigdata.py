"""Bigger than memory: .npy and uncompressed .npz arrays are memory-mapped, and training reads them batch by batch."""
import hashlib

import numpy as np
import pytest
import torch

from aeserve.models.preprocessing import Preprocessing
from aeserve.models.registry import Registry
from aeserve.training import evaluate
from aeserve.training.config import build_run_config
from aeserve.training.data.config import DataConfig
from aeserve.training.data.dataset import DataError, Dataset, FileRows
from aeserve.training.data.rows import ModelRows
from aeserve.training.data.scaling import fit_scaling
from aeserve.training.data.sources import load_dataset
from aeserve.training.evaluate import pca_baseline
from aeserve.training.trainer import train

ROWS, FEATURES = 20_000, 16


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """A 20,000 x 16 float32 .npy (more rows than one chunk of 8,192), an uncompressed and a compressed .npz."""
    folder = tmp_path_factory.mktemp("big")
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(ROWS, 4)) @ rng.normal(size=(4, FEATURES)) * np.tile([1, 10], 8) + rng.normal(size=FEATURES)).astype(np.float32)
    np.save(folder / "x.npy", x)
    np.savez(folder / "x.npz", x=x, y=np.arange(ROWS) % 3)
    np.savez_compressed(folder / "small.npz", x=x[:100])
    return folder, x


def in_memory(dataset: Dataset) -> Dataset:
    """The same split as arrays in memory."""
    return Dataset(dataset.name, np.array(dataset.train_x), np.array(dataset.test_x), dataset.preprocessing, dataset.train_y, dataset.test_y)


def test_npy_is_memory_mapped_and_split_without_a_copy(big):
    folder, x = big
    data = load_dataset(DataConfig(source="npy", path=str(folder / "x.npy")))
    assert isinstance(data.train_x, np.memmap) and isinstance(data.test_x, np.memmap)
    assert data.train_x.dtype == np.float32 and not data.train_x.flags.writeable
    # Contiguous split: the last test_fraction rows are the test split.
    assert len(data.test_x) == 2000
    np.testing.assert_array_equal(data.train_x[-1], x[ROWS - 2001])
    np.testing.assert_array_equal(data.test_x, x[-2000:])
    # The fingerprint hashes chunk by chunk and equals the digest over the whole arrays' bytes.
    h = hashlib.sha256()
    for a in (x[:-2000], x[-2000:]):
        h.update(str((a.dtype.str, a.shape)).encode())
        h.update(a.tobytes())
    assert data.fingerprint == h.hexdigest()


def test_uncompressed_npz_members_are_memory_mapped_and_compressed_ones_read(big):
    folder, x = big
    data = load_dataset(DataConfig(source="npz", path=str(folder / "x.npz"), test_fraction=0.25))
    assert isinstance(data.train_x, np.memmap)
    np.testing.assert_array_equal(data.train_x, x[:15000])
    np.testing.assert_array_equal(data.test_y, np.arange(15000, ROWS) % 3)
    small = load_dataset(DataConfig(source="npz", path=str(folder / "small.npz")))
    assert not isinstance(small.train_x, np.memmap) and len(small.train_x) + len(small.test_x) == 100


@pytest.mark.parametrize("scaling", ["global", "minmax", "standard"])
def test_scaling_fitted_in_chunks_equals_the_whole_array_fit(big, scaling):
    _, x = big
    chunked = fit_scaling("x", x, scaling)  # 20,000 rows: three chunks
    flat = x.astype(np.float64)
    if scaling == "global":
        assert chunked.offset == float(x.min()) and chunked.scale == pytest.approx(1 / (float(x.max()) - float(x.min())), rel=1e-12)
    elif scaling == "minmax":
        np.testing.assert_array_equal(chunked.offset, flat.min(axis=0).astype(np.float32))
    else:
        np.testing.assert_allclose(chunked.offset, flat.mean(axis=0), rtol=1e-6)
        np.testing.assert_allclose(chunked.scale, 1 / flat.std(axis=0), rtol=1e-6)


def test_a_nan_in_a_later_chunk_is_found(tmp_path):
    x = np.ones((ROWS, 3), np.float32)
    x[15_000, 2] = np.nan
    x[19_000, 0] = np.inf
    np.save(tmp_path / "nan.npy", x)
    with pytest.raises(DataError, match=r"nan.npy: 2 row\(s\) hold NaN or infinite values, first at row 15000"):
        load_dataset(DataConfig(source="npy", path=str(tmp_path / "nan.npy")))


def test_model_rows_scale_each_batch_like_the_whole_array(big):
    _, x = big
    pre = Preprocessing(input_shape=(FEATURES,), offset=x.mean(axis=0), scale=1 / x.std(axis=0), scaling="standard")
    index = np.random.default_rng(1).permutation(ROWS)[:5000]
    rows = ModelRows(x, pre).subset(index)
    whole = torch.from_numpy(pre.to_model(x))[index]
    assert torch.equal(rows[torch.arange(100, 400)], whole[100:400])
    assert torch.equal(rows[10:20], whole[10:20]) and rows.shape == (5000, FEATURES)


def test_streamed_pca_baseline_equals_the_closed_form(big, monkeypatch):
    _, x = big
    pre = Preprocessing(input_shape=(FEATURES,), offset=0.0, scale=0.01)
    rows = ModelRows(x, pre).subset(np.random.default_rng(2).permutation(ROWS))
    exact = pca_baseline(rows, 3)  # fits WHOLE_ELEMENTS: one tensor, principal_components
    monkeypatch.setattr(evaluate, "WHOLE_ELEMENTS", 1000)
    streamed = pca_baseline(rows, 3)
    torch.testing.assert_close(streamed.mean, exact.mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(streamed.components, exact.components, rtol=1e-4, atol=1e-5)


def config(folder, **train):
    return build_run_config({"name": "big", "data": {"source": "npy", "path": str(folder / "x.npy")},
                             "model": {"kind": "mlp", "code_dim": 3, "hidden": [8]},
                             "train": {"epochs": 2, "batch_size": 512, "report": False, **train}})


def test_training_on_a_memory_map_matches_the_same_rows_in_memory(big, tmp_path):
    folder, _ = big
    mapped = load_dataset(DataConfig(source="npy", path=str(folder / "x.npy")))
    a, b = Registry(tmp_path / "a"), Registry(tmp_path / "b")
    train(config(folder), a, progress=False, dataset=mapped)
    train(config(folder), b, progress=False, dataset=in_memory(mapped))
    assert a.manifest("big")["sha256"] == b.manifest("big")["sha256"]
    assert a.manifest("big")["metrics"] == b.manifest("big")["metrics"]
    assert a.manifest("big")["training"]["sample_rows"] == 16_200  # every training row (18,000 less 10 % validation)


def test_a_training_set_beyond_the_bound_is_never_scaled_whole(big, tmp_path, monkeypatch):
    """With the bounds set low, no step turns more than a batch or a sample of rows into floats at once."""
    folder, _ = big
    monkeypatch.setattr(evaluate, "WHOLE_ELEMENTS", 4000 * FEATURES)
    monkeypatch.setattr(evaluate, "SAMPLE_ELEMENTS", 3000 * FEATURES)
    largest = []
    to_model = Preprocessing.to_model
    monkeypatch.setattr(Preprocessing, "to_model", lambda self, x: largest.append(len(x)) or to_model(self, x))
    registry = Registry(tmp_path / "r")
    train(config(folder, epochs=1), registry, progress=False)
    manifest = registry.manifest("big")
    assert manifest["training"]["sample_rows"] == 3000 and manifest["training"]["n_train"] == 16_200
    assert manifest["training"]["map_metric_rows"] == 2000
    assert max(largest) <= evaluate.EVAL_BATCH
    # Training reads the same batches either way; only the PCA baseline's summation order differs (streamed).
    monkeypatch.undo()
    whole = Registry(tmp_path / "whole")
    train(config(folder, epochs=1), whole, progress=False)
    metrics, exact = manifest["metrics"], whole.manifest("big")["metrics"]
    assert metrics["test_sq_err"] == exact["test_sq_err"] and metrics["n_test"] == exact["n_test"] == 2000
    assert metrics["pca_sq_err"] == pytest.approx(exact["pca_sq_err"], rel=1e-4)


def test_an_image_folder_decoded_lazily_goes_the_way_of_a_big_array(tmp_path, monkeypatch):
    """Beyond the bounds a lazy folder is sampled and streamed as a memory-mapped array is, with the same results as
    the same folder decoded into memory: the held-out errors, the PCA baseline, the quantiles and the map."""
    from PIL import Image

    folder = tmp_path / "photos"
    rng = np.random.default_rng(0)
    for label in range(3):
        (folder / str(label)).mkdir(parents=True)
        for i in range(100):
            Image.fromarray((rng.integers(0, 64, (8, 8)) + 64 * label).astype(np.uint8)).save(folder / str(label) / f"{i}.png")
    monkeypatch.setattr(evaluate, "WHOLE_ELEMENTS", 100 * 64)
    monkeypatch.setattr(evaluate, "SAMPLE_ELEMENTS", 80 * 64)
    manifests = {}
    for decode in ("lazy", "memory"):
        registry = Registry(tmp_path / decode)
        train(build_run_config({"name": "photos", "data": {"source": "images", "path": str(folder), "decode": decode, "workers": 2},
                                "model": {"kind": "conv", "code_dim": 2, "channels": [4]},
                                "train": {"epochs": 1, "batch_size": 32, "report": False}}), registry, progress=False)
        manifests[decode] = registry.manifest("photos")
    lazy, memory = manifests["lazy"], manifests["memory"]
    assert lazy["training"]["sample_rows"] == 80 and lazy["training"]["n_train"] == 243  # 300 less 30 test, less 27 validation
    assert lazy["training"]["map_metric_rows"] == 30 and lazy["metrics"]["error_quantiles_rows"] == 57
    assert lazy["sha256"] == memory["sha256"] and lazy["metrics"] == memory["metrics"]
    assert {k: v for k, v in lazy["training"].items() if k not in ("seconds", "data_fingerprint", "data", "run_config")} == \
        {k: v for k, v in memory["training"].items() if k not in ("seconds", "data_fingerprint", "data", "run_config")}


def test_eval_of_a_version_beyond_the_bound_reads_batches_and_samples(big, tmp_path, monkeypatch, capsys):
    """aeserve eval re-measures the held-out error batch by batch and the map on a sample, as training did."""
    from aeserve.cli import main

    folder, _ = big
    monkeypatch.setattr(evaluate, "WHOLE_ELEMENTS", 4000 * FEATURES)
    monkeypatch.setattr(evaluate, "SAMPLE_ELEMENTS", 3000 * FEATURES)
    registry = Registry(tmp_path / "r")
    train(config(folder, epochs=1), registry, progress=False)
    largest = []
    to_model = Preprocessing.to_model
    monkeypatch.setattr(Preprocessing, "to_model", lambda self, x: largest.append(len(x)) or to_model(self, x))
    assert main(["eval", "big", "--registry", str(registry.root), "--out", str(tmp_path / "report")]) == 0
    out = capsys.readouterr().out
    assert max(largest) <= evaluate.EVAL_BATCH  # the 16,200 training and 2,000 test rows are never scaled whole
    stored = float(next(line for line in out.splitlines() if "test_sq_err (stored)" in line).split()[-1])
    measured = float(next(line for line in out.splitlines() if "test_sq_err (re-measured)" in line).split()[-1])
    assert measured == pytest.approx(stored, rel=1e-6)


def test_rows_drawn_at_random_from_a_memory_map_are_read_by_pread_and_equal_the_maps_rows(big):
    folder, x = big
    for name in ("x.npy", "x.npz"):  # an .npz member lies at an offset in its archive
        dataset = load_dataset(DataConfig(source=name.split(".")[1], path=str(folder / name)))
        rows = ModelRows(dataset.train_x, Preprocessing((FEATURES,))).subset(np.arange(5, 15_000))  # a view, then a subset
        draw = np.array([14_994, 0, 7, 7, 10_000, 3])
        np.testing.assert_array_equal(rows[torch.from_numpy(draw)].numpy(), np.asarray(dataset.train_x)[draw + 5])
        assert isinstance(rows._file, FileRows)  # read through the file, not the mapping
    assert FileRows.of(np.load(folder / "x.npy", mmap_mode="r")[:, ::2]) is None  # a column slice: rows not whole in the file
    assert FileRows.of(x) is None  # an array in memory


def test_a_truncated_file_is_named_when_a_row_cannot_be_read(tmp_path):
    path = tmp_path / "x.npy"
    np.save(path, np.ones((100, 4), np.float32))
    mapped = np.load(path, mmap_mode="r")
    reader = FileRows.of(mapped)
    with open(path, "r+b") as f:
        f.truncate(128 + 50 * 16)  # the header, then 50 of the 100 rows
    with pytest.raises(DataError, match=r"x.npy: row 70 could not be read whole"):
        reader[np.array([1, 70])]
