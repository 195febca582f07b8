"""aeserve index: an index over an encode run's codes (float, int8, binary) that finds what exact search finds, its
folder beside the codes, and bad codes files refused in one line with nothing left under the final name."""
import json

import faiss
import numpy as np
import pyarrow.parquet as pq
import pytest
from sklearn.datasets import load_digits

from aeserve.cli import main
from aeserve.models import index as code_index
from aeserve.models.index import CodeIndex
from aeserve.models.registry import Registry
from aeserve.training.batch.index import EXACT_ROWS, structure_for
from aeserve.training.config import build_run_config
from aeserve.training.trainer import train

NAME, ROWS, QUERIES, K = "digits-codes", 300, 40, 10


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    """A registry with NAME:1 (PCA, code_dim 12) and NAME:2 (code_dim 6), the digits as .npy, and NAME:1's codes of the
    first ROWS digits in each form: (registry, data path, {form: codes file}, folder)."""
    folder = tmp_path_factory.mktemp("index")
    registry = Registry(folder / "registry")
    for code_dim in (12, 6):
        train(build_run_config({"name": NAME, "data": {"source": "digits", "limit": 400}, "model": {"kind": "pca", "code_dim": code_dim},
                                "train": {"report": False}, "projector": {"kind": "pca"}}), registry, progress=False)
    data = folder / "digits.npy"
    np.save(data, load_digits().images[:ROWS].astype(np.float32))
    files = {}
    for form in ("float", "int8", "binary"):
        files[form] = folder / f"{form}.parquet"
        assert main(["encode", f"{NAME}:1", "--data", str(data), "--out", str(files[form]), "--codes", form, "--quiet",
                     "--registry", str(registry.root)]) == 0
    return registry, data, files, folder


def index_command(registry: Registry, *args: str) -> int:
    return main(["index", *args, "--registry", str(registry.root)])


def stored_codes(path) -> np.ndarray:
    column = pq.read_table(path).column("code")
    if str(column.type).startswith("fixed_size_binary"):
        return np.frombuffer(b"".join(column.to_pylist()), np.uint8).reshape(len(column), -1)
    return np.stack(column.to_numpy(zero_copy_only=False))


def exact(form: str, stored: np.ndarray, queries: np.ndarray, scale: np.ndarray | None) -> np.ndarray:
    """Distances (queries, rows) as each form's index measures them, between codes in that form (int8: scale * q)."""
    if form == "binary":
        return np.unpackbits(queries[:, None, :] ^ stored[None, :, :], axis=2).sum(axis=2).astype(np.float64)
    factor = scale.astype(np.float64) if form == "int8" else 1
    return np.sqrt(((queries.astype(np.float64)[:, None, :] * factor - stored.astype(np.float64)[None] * factor) ** 2).sum(axis=2))


@pytest.mark.parametrize("form", ["float", "int8", "binary"])
@pytest.mark.parametrize("structure", ["hnsw", "flat"])
def test_an_index_finds_what_exact_search_finds(stored, form, structure, tmp_path, capsys):
    registry, _, files, _ = stored
    out = tmp_path / f"{form}.index"
    flags = ["--exact"] if structure == "flat" else ["--approximate"]
    assert index_command(registry, f"{NAME}:1", "--codes", str(files[form]), "--out", str(out), *flags) == 0
    metric = "hamming" if form == "binary" else "l2"
    assert capsys.readouterr().out.startswith(f"indexed {ROWS} {form} codes of {NAME}:1 ({metric}, {structure}) into {out} in ")
    assert sorted(p.name for p in out.iterdir()) == ["ids.npy", "index.faiss", "index.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]  # no temporary folder left beside it
    info = json.loads((out / "index.json").read_text())
    meta = json.loads(pq.read_schema(files[form]).metadata[b"aeserve"])
    assert {key: info[key] for key in ("model", "version", "code_dim", "codes", "sha256", "rows", "structure", "id_column")} == {
        "model": NAME, "version": 1, "code_dim": 12, "codes": form, "sha256": meta["sha256"], "rows": ROWS, "structure": structure, "id_column": "row"}
    codes = stored_codes(files[form])
    scale = np.asarray(meta.get("scale", 1.0), np.float32)
    index = CodeIndex(out)
    ids, distances = index.search(codes[:QUERIES], form, K)  # queries: stored codes, in the index's form
    truth = exact(form, codes, codes[:QUERIES], scale)
    np.testing.assert_allclose(distances, np.sort(truth, axis=1)[:, :K], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.take_along_axis(truth, np.array(ids), axis=1), distances, rtol=1e-5, atol=1e-5)
    if form != "binary":  # Hamming distances tie: only the distances are the exact search's
        assert ids == np.argsort(truth, axis=1, kind="stable")[:, :K].tolist()
    version = registry.load(NAME, 1)
    floats = version.encode(load_digits().images[:QUERIES].astype(np.float32))
    ids, distances = index.search(floats, "float", K)  # queries: float codes, as encode answers them
    if form == "binary":
        truth = exact(form, codes, version.code_quantization.binary(floats), None)
    else:
        truth = np.sqrt(((floats[:, None, :].astype(np.float64) - codes.astype(np.float64)[None] * (scale if form == "int8" else 1)) ** 2).sum(axis=2))
    np.testing.assert_allclose(distances, np.sort(truth, axis=1)[:, :K], rtol=1e-5, atol=1e-5)


def test_without_a_flag_small_stores_and_binary_codes_get_exact_search_and_large_float_stores_hnsw(stored, tmp_path, capsys):
    registry, _, files, _ = stored
    for form in ("float", "binary"):
        assert index_command(registry, f"{NAME}:1", "--codes", str(files[form]), "--out", str(tmp_path / form)) == 0
        assert json.loads((tmp_path / form / "index.json").read_text())["structure"] == "flat"  # ROWS codes: few
    assert [structure_for(rows, form) for rows, form in [(EXACT_ROWS, "float"), (EXACT_ROWS + 1, "float"), (EXACT_ROWS + 1, "int8"),
                                                         (10**7, "binary")]] == ["flat", "hnsw", "hnsw", "flat"]
    with pytest.raises(SystemExit):
        index_command(registry, f"{NAME}:1", "--codes", str(files["float"]), "--out", str(tmp_path / "both"), "--exact", "--approximate")
    assert "not allowed with argument" in capsys.readouterr().err


def test_int8_codes_are_stored_as_the_versions_own_quantization(stored, tmp_path):
    registry, _, files, _ = stored
    out = tmp_path / "int8.index"
    assert index_command(registry, f"{NAME}:1", "--codes", str(files["int8"]), "--out", str(out), "--exact") == 0
    index = CodeIndex(out).index
    meta = json.loads(pq.read_schema(files["int8"]).metadata[b"aeserve"])
    q = stored_codes(files["int8"])
    np.testing.assert_array_equal(faiss.vector_to_array(index.codes).reshape(ROWS, 12),
                                  q.astype(np.int16) + 127)  # one byte a value: q + 127, no quantizer of faiss's own
    scale = np.float32(meta["scale"])  # read back as scale * q, within float32 rounding: 1e-4 of a step
    np.testing.assert_allclose(index.reconstruct_n(0, ROWS), q * scale, rtol=0, atol=float(scale.max()) * 1e-4)


def test_text_ids_come_back_as_the_codes_file_holds_them(tmp_path):
    info = code_index.IndexInfo(model="m", version=1, code_dim=2, codes="float", sha256="x", rows=4, structure="flat", ids="text")
    index = code_index.build(info)
    code_index.add(index, info, np.array([[0, 0], [1, 0], [5, 5], [0, 2]], np.float32))
    code_index.write(tmp_path / "i", info, index, ["cats/001.png", "dogs/é.png", "", "x" * 300])
    ids, distances = CodeIndex(tmp_path / "i").search(np.array([[0.9, 0], [5, 4]], np.float32), "float", 2)
    assert ids == [["dogs/é.png", "cats/001.png"], ["", "x" * 300]]
    np.testing.assert_allclose(distances, [[0.1, 0.9], [1, np.hypot(5, 2)]], rtol=1e-6)


def test_bad_codes_files_are_one_line_and_leave_nothing_under_the_final_name(stored, tmp_path, capsys, monkeypatch):
    registry, _, files, _ = stored
    out = tmp_path / "out" / "codes.index"
    codes = str(files["float"])

    def refused(target: str, path: str, message: str) -> None:
        assert index_command(registry, target, "--codes", path, "--out", str(out)) == 2
        assert capsys.readouterr().err == f"error: {message}\n"
        assert not out.exists() and (not out.parent.exists() or list(out.parent.iterdir()) == [])

    refused(NAME, codes, f"{codes}: its codes were written by {NAME}:1, not by {NAME}:2: their codes differ; index them as {NAME}:1, "
                         f"or re-encode them with aeserve encode {NAME}:2 --since-version 1 --out {codes}")
    table = pq.read_table(codes)
    plain = tmp_path / "plain.parquet"
    pq.write_table(table.replace_schema_metadata(None), plain)
    refused(f"{NAME}:1", str(plain), f"{plain}: no aeserve metadata in its schema; it was not written by aeserve encode")
    meta = json.loads(table.schema.metadata[b"aeserve"])
    wide = tmp_path / "wide.parquet"  # codes and metadata agree, the version has another code_dim
    pq.write_table(table.replace_schema_metadata({b"aeserve": json.dumps({**meta, "version": 2}).encode()}), wide)
    refused(f"{NAME}:2", str(wide), f"{wide}: code_dim 12 in its metadata, {NAME}:2 has code_dim 6")
    lying = tmp_path / "lying.parquet"  # metadata that says another code_dim than the column holds
    pq.write_table(table.replace_schema_metadata({b"aeserve": json.dumps({**meta, "code_dim": 6}).encode()}), lying)
    refused(f"{NAME}:1", str(lying), f"{lying}: its code column holds 12 values a row (fixed_size_list<element: float>[12]), its metadata says code_dim 6")
    other = tmp_path / "other.parquet"
    pq.write_table(table.replace_schema_metadata({b"aeserve": json.dumps({**meta, "sha256": "0" * 64}).encode()}), other)
    refused(f"{NAME}:1", str(other), f"{other}: written with weights of sha256 {'0' * 64}, {NAME}:1's weights are {meta['sha256']}: "
                                     "another registry's version 1? encode the data again with this one")

    def failing(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("faiss.write_index", failing)  # the disk fills while the index is written
    assert index_command(registry, f"{NAME}:1", "--codes", codes, "--out", str(out)) == 2
    assert capsys.readouterr().err == "error: No space left on device\n"
    assert list(out.parent.iterdir()) == []  # neither the index nor its temporary folder
    out.mkdir()
    assert index_command(registry, f"{NAME}:1", "--codes", codes, "--out", str(out)) == 2
    assert capsys.readouterr().err == f"error: {out}: exists; give --overwrite to replace it\n"
