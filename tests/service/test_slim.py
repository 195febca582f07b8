"""A server without torch (the slim install) answers every operation of every kind from the graphs stored with each
version, as the full install answers on torch; a version without graphs gets a clear refusal there and still serves
on the full install; a corrupted graphs file is refused like corrupted weights."""
from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess

import httpx
import numpy as np
import pytest

from aeserve.models.checkpoint import MANIFEST, CheckpointError, load_version
from aeserve.models.registry import Registry
from aeserve.models.served import NoGraphs, load_served
from aeserve.training.config import build_run_config
from aeserve.training.trainer import train
from tests.conftest import KIND_CONFIGS, strip_graphs
from tests.servers import make_client, serve_process, wait_ready, wait_until
from tests.training.data.test_images import write_folder
from tests.training.data.test_tables import write_csv

# What a slim install lacks: importing any of these in the server fails, as it would there.
BLOCKED = ("torch", "sklearn", "matplotlib", "openTSNE", "onnxscript", "onnx", "pyarrow", "scipy")
ROWS = (np.random.default_rng(3).random((3, 64)) * 16).round(2)
EVERY_OUTPUT = ("code", "reconstruction", "error", "score", "percentile", "coordinates", "feature_error")


def without_graphs(registry: Registry, name: str, source: Registry, source_name: str) -> None:
    """A copy of a version as published before graphs were stored."""
    shutil.copytree(source.version_dir(source_name, 1), registry.root / name / "1")
    strip_graphs(registry, name)
    manifest = json.loads((registry.version_dir(name, 1) / MANIFEST).read_text())
    (registry.version_dir(name, 1) / MANIFEST).write_text(json.dumps({**manifest, "name": name}))


@pytest.fixture(scope="module")
def registry(trained_registry, tmp_path_factory) -> Registry:
    """Every digits kind, a table version, an image version, and one published without graphs."""
    folder = tmp_path_factory.mktemp("slim")
    registry = Registry(folder / "registry")
    for kind in KIND_CONFIGS:
        shutil.copytree(trained_registry.root / f"digits-{kind}", registry.root / f"digits-{kind}")
    table = build_run_config({"name": "rows", "data": {"source": "table", "path": str(write_csv(folder / "rows.csv")), "label": "is_big",
                                                       "categorical": ["colour"]},
                              "model": {"kind": "mlp", "code_dim": 2, "hidden": [16]}, "train": {"epochs": 2, "batch_size": 16, "report": False}})
    images = build_run_config({"name": "photos", "data": {"source": "images", "path": str(write_folder(folder / "photos")), "image_size": [8, 8]},
                               "model": {"kind": "conv", "code_dim": 2, "channels": [4]}, "train": {"epochs": 1, "batch_size": 4, "report": False}})
    for run in (table, images):
        train(run, registry, progress=False)
    without_graphs(registry, "old-mlp", trained_registry, "digits-mlp")
    return registry


@pytest.fixture(scope="module")
def slim(registry, tmp_path_factory):
    """``aeserve serve`` where torch and the training stack cannot be imported, and its log."""
    blocker = tmp_path_factory.mktemp("blocker")
    (blocker / "sitecustomize.py").write_text(f"import sys\nfor name in {BLOCKED!r}:\n    sys.modules[name] = None\n")
    log = blocker / "serve.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocker), os.environ.get("PYTHONPATH", "")]), "AESERVE_ENGINE": "onnx"}
    with open(log, "wb") as stderr:
        process, url = serve_process("--registry", str(registry.root), "--poll-seconds", "0", "--no-access-log", env=env, stderr=stderr)
    try:
        wait_until(lambda: httpx.get(f"{url}/health/ready").status_code == 200 or process.poll() is not None, 60, "the slim server's readiness")
        assert process.poll() is None, log.read_text()[-3000:]
        with httpx.Client(base_url=url, timeout=30) as client:
            yield client, log
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def full(registry):
    with make_client(registry) as client:
        wait_ready(client.get)
        yield client


def assert_same(slim_answer, full_answer, where: str) -> None:
    """Equal JSON, numbers within float32 tolerance (ONNX Runtime's kernels against torch's), texts exactly."""
    if isinstance(full_answer, dict):
        assert isinstance(slim_answer, dict) and sorted(slim_answer) == sorted(full_answer), where
        for key in full_answer:
            assert_same(slim_answer[key], full_answer[key], f"{where}.{key}")
    elif isinstance(full_answer, list) and not numeric(full_answer):
        assert isinstance(slim_answer, list) and len(slim_answer) == len(full_answer), where
        for i, (a, b) in enumerate(zip(slim_answer, full_answer, strict=True)):
            assert_same(a, b, f"{where}[{i}]")
    elif isinstance(full_answer, list | float | int) and not isinstance(full_answer, bool):
        np.testing.assert_allclose(np.asarray(slim_answer, np.float64), np.asarray(full_answer, np.float64), rtol=1e-4, atol=1e-3, err_msg=where)
    else:
        assert slim_answer == full_answer, where


def numeric(value: list) -> bool:
    try:
        return np.asarray(value, np.float64).size > 0
    except (TypeError, ValueError):
        return False


def both(slim, full, method: str, path: str, **request) -> dict:
    """The same request to both servers: both 200, answers the same; the full install's answer."""
    slim_client, _ = slim
    a, b = slim_client.request(method, path, **request), full.request(method, path, **request)
    assert (a.status_code, b.status_code) == (200, 200), (path, a.text, b.text)
    assert_same(a.json(), b.json(), path)
    return b.json()


@pytest.mark.parametrize("kind", list(KIND_CONFIGS))
def test_every_operation_of_every_kind_answers_as_on_torch(slim, full, kind):
    base = f"/v1/models/digits-{kind}"
    codes = both(slim, full, "POST", f"{base}/encode", json={"inputs": ROWS.tolist()})["outputs"]
    both(slim, full, "POST", f"{base}/decode", json={"inputs": codes})
    answer = both(slim, full, "POST", f"{base}/reconstruct", json={"inputs": ROWS.tolist()})
    assert {"errors", "scores", "percentiles"} <= set(answer)
    both(slim, full, "POST", f"{base}/project", json={"inputs": ROWS.tolist()})
    infer = {"inputs": [{"name": "input", "shape": [3, 64], "datatype": "FP32", "data": ROWS.ravel().tolist()}],
             "outputs": [{"name": name} for name in EVERY_OUTPUT]}
    both(slim, full, "POST", f"/v2/models/digits-{kind}/infer", json=infer)
    npy = io.BytesIO()
    np.save(npy, ROWS.astype(np.float32))
    a = slim[0].post(f"{base}/encode", content=npy.getvalue(), headers={"Content-Type": "application/x-npy", "Accept": "application/x-npy"})
    b = full.post(f"{base}/encode", content=npy.getvalue(), headers={"Content-Type": "application/x-npy", "Accept": "application/x-npy"})
    np.testing.assert_allclose(np.load(io.BytesIO(a.content)), np.load(io.BytesIO(b.content)), rtol=1e-4, atol=1e-4)


def test_compressed_streams_are_the_same_bytes_and_decompress_alike(slim, full):
    streams = both(slim, full, "POST", "/v1/models/digits-rd/compress", json={"inputs": ROWS.tolist()})["outputs"]
    assert all(base64.b64decode(s)[0] == 0xA1 for s in streams)
    both(slim, full, "POST", "/v1/models/digits-rd/decompress", json={"inputs": streams})


def test_table_object_rows_and_image_bodies_answer_as_on_torch(slim, full):
    objects = [{"small": 0.05, "large": 2100.0, "colour": "red"}, {"small": 0.07, "large": 1500.0, "colour": "blue"}]
    answer = both(slim, full, "POST", "/v1/models/rows/reconstruct", json={"inputs": objects})
    assert "feature_errors" in answer and isinstance(answer["outputs"][0], dict)
    from PIL import Image

    png = io.BytesIO()
    Image.fromarray((np.random.default_rng(0).random((8, 8, 3)) * 255).astype(np.uint8)).save(png, format="PNG")
    for op in ("encode", "reconstruct", "project"):
        both(slim, full, "POST", f"/v1/models/photos/{op}", content=png.getvalue(), headers={"Content-Type": "image/png"})


def test_a_version_without_graphs_is_refused_without_torch_and_serves_with_it(slim, full):
    client, log = slim
    response = client.post("/v1/models/old-mlp/encode", json={"inputs": ROWS.tolist()})
    assert response.status_code == 503 and "Retry-After" not in response.headers
    detail = response.json()["detail"]
    assert detail.startswith("old-mlp:1 cannot be served here:") and "no ONNX graphs stored (it was published before versions stored them)" in detail
    assert "full install" in detail and "publish it again" in detail
    v2 = client.post("/v2/models/old-mlp/versions/1/infer", json={"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [0.0] * 64}]})
    assert v2.status_code == 503 and "full install" in v2.json()["error"]
    assert "refused old-mlp:1" in log.read_text() and "this server has no torch to run it" in log.read_text()
    assert full.post("/v1/models/old-mlp/encode", json={"inputs": ROWS.tolist()}).status_code == 200


def test_small_calls_run_in_the_engine_process_on_the_stored_graphs(slim):
    client, _ = slim
    assert "aeserve_engine_process_versions 9.0" in client.get("/metrics").text  # every version that loaded: 7 kinds, rows, photos


def test_a_corrupted_graphs_file_is_refused_on_load_like_corrupted_weights(trained_registry, tmp_path):
    registry = Registry(tmp_path / "registry")
    shutil.copytree(trained_registry.root / "digits-mlp", registry.root / "digits-mlp")
    graph = registry.version_dir("digits-mlp", 1) / "graphs" / "encode.onnx"
    data = bytearray(graph.read_bytes())
    data[-1] ^= 0xFF
    graph.write_bytes(bytes(data))
    for load in (load_served, load_version):
        with pytest.raises(CheckpointError, match=r"graphs/encode.onnx: sha256 [0-9a-f]{64} does not match the manifest's [0-9a-f]{64}; the file was changed"):
            load(registry.version_dir("digits-mlp", 1))
    graph.unlink()
    with pytest.raises(CheckpointError, match=r"graphs/encode.onnx: file is missing"):
        load_served(registry.version_dir("digits-mlp", 1))


def test_a_version_whose_graphs_failed_says_why_where_torch_is_missing(trained_registry, tmp_path):
    registry = Registry(tmp_path / "registry")
    without_graphs(registry, "failed", trained_registry, "digits-mlp")
    manifest = json.loads((registry.version_dir("failed", 1) / MANIFEST).read_text())
    (registry.version_dir("failed", 1) / MANIFEST).write_text(json.dumps({**manifest, "graphs": {"error": "encode differs from torch by up to 0.5"}}))
    with pytest.raises(NoGraphs, match=r"no ONNX graphs stored \(its graphs did not export or match torch: encode differs from torch by up to 0.5\)"):
        load_served(registry.version_dir("failed", 1))
    assert load_version(registry.version_dir("failed", 1)).graphs == {}


def test_serve_imports_no_torch(registry, tmp_path):
    """``aeserve serve --help`` and the app's import, with the blocked modules absent: none of them is imported."""
    code = ("import sys; import aeserve.cli, aeserve.service.app; sys.argv = ['aeserve', 'serve', '--help']\n"
            "try:\n    aeserve.cli.main()\nexcept SystemExit:\n    pass\n"
            f"print(sorted(m for m in {BLOCKED!r} if m in sys.modules and sys.modules[m] is not None))")
    done = subprocess.run([os.sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"
