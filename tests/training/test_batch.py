"""aeserve encode: every source kind to Parquet, codes equal to the version's own, ids carried, compact forms as the
server answers them, metadata, nothing under the final name after a failure, a URL as the output, --since-version."""
import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest
from PIL import Image
from sklearn.datasets import load_digits

import aeserve.training.batch.inputs as inputs
from aeserve.cli import main
from aeserve.models.registry import Registry
from aeserve.service.codec import decode_images
from aeserve.service.tables import TableRows
from aeserve.training.batch import Encoder
from aeserve.training.batch.output import read_metadata
from aeserve.training.config import build_run_config
from aeserve.training.trainer import train
from tests.conftest import digits_run
from tests.servers import make_client, wait_ready


@pytest.fixture
def reg(trained_registry: Registry, tmp_path) -> Registry:
    """digits-mlp (version 1) and digits-conv in a private registry, so that tests may publish more versions."""
    root = tmp_path / "registry"
    for name in ("digits-mlp", "digits-conv"):
        shutil.copytree(trained_registry.root / name, root / name)
    return Registry(root)


@pytest.fixture(scope="module")
def digits_npy(tmp_path_factory) -> tuple[str, np.ndarray]:
    x = load_digits().images[:300].astype(np.float32)
    path = tmp_path_factory.mktemp("data") / "digits.npy"
    np.save(path, x)
    return str(path), x


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    """Blocks of 64 digits: several blocks and row groups from a few hundred rows."""
    monkeypatch.setattr(inputs, "BLOCK_BYTES", 64 * 64 * 4)


def encode(reg: Registry, target: str, *args: str) -> int:
    return main(["encode", target, "--registry", str(reg.root), "--quiet", *args])


def column(table: pa.Table, name: str) -> np.ndarray:
    return np.stack(table.column(name).to_numpy(zero_copy_only=False))


def test_an_npy_encodes_to_the_versions_own_codes_with_row_numbers_and_metadata(reg, digits_npy, tmp_path, capsys):
    path, x = digits_npy
    out = tmp_path / "codes.parquet"
    assert encode(reg, "digits-mlp", "--data", path, "--out", str(out)) == 0
    assert capsys.readouterr().out.startswith(f"wrote 300 codes of digits-mlp:1 to {out}")
    table = pq.read_table(out)
    version = reg.load("digits-mlp")
    assert table.schema.names == ["row", "code"] and table.schema.field("code").type == pa.list_(pa.float32(), 4)
    assert pq.ParquetFile(out).num_row_groups == 5  # 64 rows a block, each a row group
    assert table.column("row").to_pylist() == list(range(300))
    np.testing.assert_array_equal(column(table, "code"), version.encode(x))
    meta = read_metadata(str(out))
    assert meta == {"model": "digits-mlp", "version": 1, "code_dim": 4, "codes": "float", "sha256": version.manifest["sha256"],
                    "id": "row", "with": [], "data": path}
    assert json.loads(table.schema.metadata[b"aeserve"])["sha256"] == version.manifest["sha256"]


def test_an_integer_npy_gives_the_codes_of_the_same_values_as_floats(reg, digits_npy, tmp_path):
    """Integer rows (pixels) reach the model as they are and are made float32 by its scaling: the same codes."""
    path, x = digits_npy
    as_bytes = tmp_path / "digits-uint8.npy"
    np.save(as_bytes, x.astype(np.uint8))
    assert encode(reg, "digits-mlp", "--data", str(as_bytes), "--out", str(tmp_path / "uint8.parquet")) == 0
    assert encode(reg, "digits-mlp", "--data", path, "--out", str(tmp_path / "float.parquet")) == 0
    codes = column(pq.read_table(tmp_path / "uint8.parquet"), "code")
    np.testing.assert_array_equal(codes, column(pq.read_table(tmp_path / "float.parquet"), "code"))
    np.testing.assert_array_equal(codes, reg.load("digits-mlp").encode(x))


def test_int8_and_binary_codes_equal_the_servers(reg, digits_npy, tmp_path):
    path, x = digits_npy
    assert encode(reg, "digits-mlp", "--data", path, "--out", str(tmp_path / "int8.parquet"), "--codes", "int8") == 0
    assert encode(reg, "digits-mlp", "--data", path, "--out", str(tmp_path / "binary.parquet"), "--codes", "binary") == 0
    int8, binary = pq.read_table(tmp_path / "int8.parquet"), pq.read_table(tmp_path / "binary.parquet")
    assert int8.schema.field("code").type == pa.list_(pa.int8(), 4) and binary.schema.field("code").type == pa.binary(1)
    with make_client(reg) as client:
        wait_ready(client.get)
        served = {form: client.post(f"/v1/models/digits-mlp/encode?codes={form}", json={"inputs": x.reshape(300, -1).tolist()}).json()
                  for form in ("int8", "binary")}
    np.testing.assert_array_equal(column(int8, "code"), np.array(served["int8"]["outputs"], np.int8))
    packed = np.frombuffer(b"".join(binary.column("code").to_pylist()), np.uint8).reshape(300, 1)
    np.testing.assert_array_equal(packed, np.array(served["binary"]["outputs"], np.uint8))
    for form, key in (("int8", "scale"), ("binary", "threshold")):  # what reads the codes, as float32
        np.testing.assert_array_equal(np.float32(read_metadata(str(tmp_path / f"{form}.parquet"))[key]), np.float32(served[form][key]))


def test_with_reconstruct_and_project_adds_the_anomaly_answers_and_the_map(reg, digits_npy, tmp_path):
    path, x = digits_npy
    out = tmp_path / "codes.parquet"
    assert encode(reg, "digits-mlp", "--data", path, "--out", str(out), "--with", "reconstruct,project") == 0
    table = pq.read_table(out)
    version = reg.load("digits-mlp")
    _, errors, percentiles = version.reconstruct(x)
    assert table.schema.names[:2] == ["row", "code"] and {"errors", "percentiles", "coordinates"} <= set(table.schema.names)
    np.testing.assert_array_equal(table.column("errors").to_numpy(), errors)
    np.testing.assert_array_equal(table.column("percentiles").to_numpy(), percentiles)
    np.testing.assert_array_equal(column(table, "coordinates"), version.project(x))
    assert read_metadata(str(out))["with"] == ["reconstruct", "project"]


@pytest.fixture(scope="module")
def table_version(tmp_path_factory):
    """A table version (two numbers and a category) and a CSV of 150 rows with a string key column."""
    folder = tmp_path_factory.mktemp("table")
    rng = np.random.default_rng(0)
    small, large = rng.normal(0.05, 0.01, 150), rng.normal(2000, 400, 150)
    colour = rng.choice(["red", "green", "blue"], 150)
    lines = ["key,small,large,colour"] + [f"k{i:03d},{float(s)!r},{float(g)!r},{c}" for i, (s, g, c) in enumerate(zip(small, large, colour, strict=True))]
    path = folder / "rows.csv"
    path.write_text("\n".join(lines) + "\n")
    registry = Registry(folder / "registry")
    train(build_run_config({"name": "rows", "data": {"source": "table", "path": str(path), "exclude": ["key"], "categorical": ["colour"]},
                            "model": {"kind": "mlp", "code_dim": 2, "hidden": [16]}, "train": {"epochs": 2, "batch_size": 16, "report": False}}),
          registry, progress=False)
    objects = [{"small": float(s), "large": float(g), "colour": str(c)} for s, g, c in zip(small, large, colour, strict=True)]
    return registry, path, objects


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_a_table_carries_its_id_column_and_maps_columns_as_the_server_does(table_version, tmp_path, suffix):
    registry, csv_path, objects = table_version
    path = csv_path
    if suffix == ".parquet":
        path = tmp_path / "rows.parquet"
        pq.write_table(pa_csv.read_csv(csv_path), path, row_group_size=40)
    out = tmp_path / "codes.parquet"
    assert main(["encode", "rows", "--data", str(path), "--out", str(out), "--id", "key", "--registry", str(registry.root), "--quiet"]) == 0
    table = pq.read_table(out)
    assert table.schema.names == ["key", "code"] and table.column("key").to_pylist() == [f"k{i:03d}" for i in range(150)]
    version = registry.load("rows")
    rows, _, _ = TableRows.of(version.manifest).encode(objects, 1000)  # as the server maps a request's object rows
    np.testing.assert_array_equal(column(table, "code"), version.encode(rows))


def test_bad_input_is_one_line_naming_what_and_where(table_version, reg, digits_npy, tmp_path, capsys):
    registry, csv_path, _ = table_version
    out = tmp_path / "codes.parquet"
    assert main(["encode", "rows", "--data", str(csv_path), "--out", str(out), "--id", "sku", "--registry", str(registry.root)]) == 2
    assert capsys.readouterr().err == f"error: {csv_path}: no column 'sku' for --id; the header names ['key', 'small', 'large', 'colour']\n"
    bad = tmp_path / "bad.csv"
    bad.write_text(csv_path.read_text().replace(",red\n", ",purple\n", 1))
    assert main(["encode", "rows", "--data", str(bad), "--out", str(out), "--registry", str(registry.root)]) == 2
    line = next(i for i, text in enumerate(bad.read_text().splitlines(), 1) if "purple" in text)
    assert capsys.readouterr().err == (f"error: {bad}: line {line}, column 'colour': unknown category 'purple'; "
                                       f"this version knows ['blue', 'green', 'red']\n")
    path, _ = digits_npy
    out.write_bytes(b"already here")
    assert encode(reg, "digits-mlp", "--data", path, "--out", str(out)) == 2
    assert capsys.readouterr().err == f"error: {out}: exists; give --overwrite to replace it\n" and out.read_bytes() == b"already here"
    assert encode(reg, "digits-mlp", "--data", path, "--out", str(out), "--id", "key") == 2
    assert capsys.readouterr().err == f"error: --id names a table's column; the rows of an array are numbered ({path})\n"
    np.save(tmp_path / "wide.npy", np.zeros((3, 65), np.float32))
    assert encode(reg, "digits-mlp", "--data", str(tmp_path / "wide.npy"), "--out", str(tmp_path / "w.parquet")) == 2
    assert capsys.readouterr().err == (f"error: {tmp_path / 'wide.npy'}: rows of shape [65]; digits-mlp:1 takes [8, 8] (64 values a row)\n")


def test_a_failed_run_leaves_nothing_under_the_final_name_nor_beside_it(reg, digits_npy, tmp_path, monkeypatch):
    path, _ = digits_npy
    out = tmp_path / "out" / "codes.parquet"
    calls = []
    real = Encoder.columns

    def failing(self, rows):
        calls.append(sorted(p.name for p in out.parent.iterdir()))
        if len(calls) == 3:
            raise RuntimeError("the model failed")
        return real(self, rows)

    monkeypatch.setattr(Encoder, "columns", failing)
    assert encode(reg, "digits-mlp", "--data", path, "--out", str(out)) == 2
    assert len(calls) == 3 and all(len(files) == 1 and files[0].startswith(".codes.parquet.tmp-") for files in calls)
    assert list(out.parent.iterdir()) == []


def test_an_image_folder_is_decoded_as_the_server_decodes_images_with_paths_as_ids(reg, tmp_path):
    folder = tmp_path / "images"
    digits = load_digits().images[:70]
    files = []
    for i, image in enumerate(digits):
        sub = folder / ("a" if i % 2 else "b")
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray((image * 15).astype(np.uint8), "L").resize((16, 16)).save(sub / f"{i:02d}.png")
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.png"))
    out = tmp_path / "codes.parquet"
    assert encode(reg, "digits-conv", "--data", str(folder), "--out", str(out)) == 0
    table = pq.read_table(out)
    assert table.schema.names == ["path", "code"] and table.column("path").to_pylist() == files
    version = reg.load("digits-conv")
    pixels = decode_images([(folder / f).read_bytes() for f in files], version.manifest, files)  # the server's rule
    # Bit for bit over the same blocks of rows (64 here): a convolution's last bits may depend on the batch's size.
    np.testing.assert_array_equal(column(table, "code"), np.concatenate([version.encode(pixels[:64]), version.encode(pixels[64:])]))


def test_urls_in_and_out_through_s3(reg, digits_npy, s3_bucket, tmp_path):
    import s3fs

    path, x = digits_npy
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.put(path, f"{s3_bucket}/in/digits.npy")
    out = f"{s3_bucket}/codes/digits.parquet"
    assert encode(reg, "digits-mlp", "--data", f"{s3_bucket}/in/digits.npy", "--out", out, "--codes", "int8") == 0
    assert fs.ls(f"{s3_bucket}/codes") == [out.removeprefix("s3://")]  # the temporary key is gone
    with fs.open(out, "rb") as f:
        table = pq.read_table(f)
    version = reg.load("digits-mlp")
    np.testing.assert_array_equal(column(table, "code"), version.code_quantization.int8(version.encode(x)))
    assert read_metadata(out)["codes"] == "int8"
    assert encode(reg, "digits-mlp", "--data", path, "--out", out) == 2  # exists, no --overwrite


def test_since_version_re_encodes_a_store_with_its_ids_form_and_columns(reg, digits_npy, tmp_path, capsys):
    path, x = digits_npy
    store = tmp_path / "store.parquet"
    assert encode(reg, "digits-mlp:1", "--data", path, "--out", str(store), "--codes", "int8", "--with", "reconstruct") == 0
    train(digits_run("digits-mlp", "mlp", seed=7), reg, progress=False)  # version 2
    assert encode(reg, "digits-mlp", "--since-version", "1", "--out", str(store)) == 0  # --data as the store names it
    assert "(re-encoded from version 1)" in capsys.readouterr().out
    table, v2 = pq.read_table(store), reg.load("digits-mlp", 2)
    meta = read_metadata(str(store))
    assert (meta["version"], meta["codes"], meta["with"], meta["sha256"]) == (2, "int8", ["reconstruct"], v2.manifest["sha256"])
    np.testing.assert_array_equal(column(table, "code"), v2.code_quantization.int8(v2.encode(x)))
    assert table.column("row").to_pylist() == list(range(300)) and "errors" in table.schema.names
    assert encode(reg, "digits-mlp", "--since-version", "1", "--out", str(store)) == 0  # already there: nothing to do
    assert capsys.readouterr().err == f"{store}: already written by digits-mlp:2; nothing to re-encode\n"
    assert encode(reg, "digits-mlp:1", "--since-version", "1", "--out", str(store)) == 2
    assert capsys.readouterr().err == (f"error: {store}: written by digits-mlp:2, after --since-version 1; "
                                       f"give --since-version 2 to re-encode it\n")


def test_since_version_keeps_a_stores_subset_of_ids_and_refuses_ids_the_data_lacks(table_version, tmp_path, capsys):
    registry, csv_path, objects = table_version
    registry = Registry(shutil.copytree(registry.root, tmp_path / "registry"))
    full = tmp_path / "full.parquet"
    assert main(["encode", "rows", "--data", str(csv_path), "--out", str(full), "--id", "key", "--registry", str(registry.root), "--quiet"]) == 0
    table = pq.read_table(full)
    store = tmp_path / "store.parquet"
    pq.write_table(table.filter(pc.is_in(table.column("key"), pa.array(["k010", "k003", "k149"]))), store)
    train(build_run_config({**registry.manifest("rows")["training"]["run_config"], "train": {"epochs": 1, "seed": 5, "report": False}}),
          registry, progress=False)
    assert main(["encode", "rows", "--since-version", "1", "--out", str(store), "--registry", str(registry.root), "--quiet"]) == 0
    migrated = pq.read_table(store)
    assert migrated.column("key").to_pylist() == ["k003", "k010", "k149"]  # in the data's order
    version = registry.load("rows", 2)
    rows, _, _ = TableRows.of(version.manifest).encode([objects[3], objects[10], objects[149]], 10)
    np.testing.assert_array_equal(column(migrated, "code"), version.encode(rows))
    short = tmp_path / "short.csv"
    short.write_text("".join(csv_path.read_text().splitlines(keepends=True)[:100]))
    old = tmp_path / "old.parquet"
    pq.write_table(table, old)
    assert main(["encode", "rows:2", "--since-version", "1", "--out", str(old), "--data", str(short), "--registry", str(registry.root)]) == 2
    assert capsys.readouterr().err == (f"error: {short}: 51 of the store's 150 ids are not in the data (ids 'k099', 'k100', 'k101' ...); "
                                       f"re-encode from the data the store was made from\n")
    assert pq.read_table(old).equals(table)  # the store is untouched


def test_a_value_beyond_float32_is_named_by_line_and_column(table_version, tmp_path, capsys):
    registry, csv_path, _ = table_version
    bad = tmp_path / "bad.csv"
    lines = csv_path.read_text().splitlines()
    fields = lines[5].split(",")
    lines[5] = ",".join([fields[0], fields[1], "1e300", fields[3]])
    bad.write_text("\n".join(lines) + "\n")
    assert main(["encode", "rows", "--data", str(bad), "--out", str(tmp_path / "c.parquet"), "--registry", str(registry.root)]) == 2
    assert capsys.readouterr().err == f"error: {bad}: line 6, column 'large': the value is not finite as float32\n"


def test_a_table_with_filled_fields_and_dates_encodes_as_the_server_reads_its_rows(tmp_path):
    from tests.training.data.test_tables import PENGUIN_COLUMNS, penguins_rows, write_penguins

    path = write_penguins(tmp_path / "penguins.csv")
    registry = Registry(tmp_path / "registry")
    config = build_run_config({"name": "birds", "data": {"source": "table", "path": str(path), "label": "species",
                                                          "exclude": ["rowid", "Name", "comment"], "categorical": ["island", "sex"],
                                                          "dates": ["observed"], "missing": "median"},
                               "model": {"kind": "pca", "code_dim": 3}, "train": {"report": False}})
    train(config, registry, progress=False)
    out = tmp_path / "codes.parquet"
    assert main(["encode", "birds", "--data", str(path), "--out", str(out), "--id", "rowid", "--registry", str(registry.root), "--quiet"]) == 0
    version = registry.load("birds")
    numbers = ("bill_length_mm", "body_mass_g", "year")
    objects = [{name: float(value) if name in numbers and value not in ("", "NA") else value
                for name, value in zip(PENGUIN_COLUMNS, row, strict=True)} for row in penguins_rows()]  # as JSON sends them
    rows, _, imputed = TableRows.of(version.manifest).encode(objects, 1000)  # as the server reads the same rows
    assert sum(map(len, imputed)) > 0  # the table has empty and NA fields, filled as in training
    table = pq.read_table(out)
    assert table.column("rowid").to_pylist() == [str(i) for i in range(1, 121)]  # a CSV field as its text
    np.testing.assert_allclose(column(table, "code"), version.encode(rows), rtol=1e-6, atol=1e-5)
