"""Every route in-process: answers checked against the models themselves, errors with exact codes and messages."""
import io
import re
import time

import numpy as np
import pytest

from aeserve.service.operations import OPERATIONS
from tests.conftest import KIND_CONFIGS
from tests.servers import DEVICE, LiveServer, make_client, wait_for_metric, wait_ready

NAMES = [f"digits-{kind}" for kind in KIND_CONFIGS]
rng = np.random.default_rng(0)
IMAGES = (rng.random((5, 8, 8)) * 16).astype(np.float32)


def npy(array) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def test_health_and_listing(api, service_registry):
    assert api.get("/health/live").status_code == 200
    ready = api.get("/health/ready")
    assert ready.status_code == 200 and ready.json()["models"] == sorted(NAMES)
    assert api.get("/v1/models").json() == {"models": [
        {"name": name, "versions": ["1"], "aliases": {"latest": "1"}} for name in sorted(NAMES)]}
    manifest = api.get("/v1/models/digits-mlp")
    assert manifest.json() == service_registry.manifest("digits-mlp")
    assert manifest.headers["X-Model-Version"] == "1"
    assert api.get("/v1/models/digits-mlp/versions/latest").json()["version"] == 1


@pytest.mark.parametrize("name", NAMES)
def test_operations_match_the_model(api, service_registry, name):
    version = service_registry.load(name)
    codes = version.encode(IMAGES)
    expected = {
        "encode": codes,
        "project": version.project(IMAGES),
        "reconstruct": version.reconstruct(IMAGES)[0],
    }
    for op, want in expected.items():
        response = api.post(f"/v1/models/{name}/{op}", json={"inputs": IMAGES.tolist()})
        assert response.status_code == 200, response.text
        body = response.json()
        assert (body["model"], body["version"]) == (name, "1")
        assert (response.headers["X-Model-Name"], response.headers["X-Model-Version"]) == (name, "1")
        np.testing.assert_allclose(np.asarray(body["outputs"]), want, rtol=1e-5, atol=1e-5)
    decoded = api.post(f"/v1/models/{name}/versions/1/decode", json={"inputs": codes.tolist()}).json()["outputs"]
    np.testing.assert_allclose(np.asarray(decoded), version.decode(codes), rtol=1e-5, atol=1e-4)
    assert np.asarray(decoded).shape == (5, 8, 8)


def test_reconstruct_errors_and_percentiles(api, service_registry):
    version = service_registry.load("digits-mlp")
    _, errors, percentiles = version.reconstruct(IMAGES)
    body = api.post("/v1/models/digits-mlp/reconstruct", json={"inputs": IMAGES.reshape(5, 64).tolist()}).json()
    np.testing.assert_allclose(body["errors"], errors, rtol=1e-5)
    np.testing.assert_allclose(body["percentiles"], percentiles, atol=1e-3)
    assert np.asarray(body["outputs"]).shape == (5, 64)  # flat rows in, flat rows out
    assert all(0 <= p <= 100 for p in body["percentiles"])
    # A blank image is a poor digit: its error sits high among the held-out errors.
    blank = api.post("/v1/models/digits-mlp/reconstruct", json={"inputs": [[16.0] * 64]}).json()
    assert blank["percentiles"][0] > 99


def test_npy_in_and_out(api, service_registry):
    version = service_registry.load("digits-pca")
    response = api.post("/v1/models/digits-pca/encode", content=npy(IMAGES),
                        headers={"Content-Type": "application/x-npy", "Accept": "application/x-npy"})
    assert response.status_code == 200 and response.headers["content-type"] == "application/x-npy"
    assert response.headers["X-Model-Name"] == "digits-pca" and response.headers["X-Model-Version"] == "1"
    np.testing.assert_allclose(np.load(io.BytesIO(response.content)), version.encode(IMAGES), rtol=1e-5, atol=1e-5)
    # int arrays are numbers too
    ints = api.post("/v1/models/digits-pca/project", content=npy(IMAGES.astype(np.int64)), headers={"Content-Type": "application/x-npy"})
    assert ints.status_code == 200


ROW = [1.0] * 64
ERRORS = [
    ({"inputs": [[1.0, 2.0]]}, 422, "each row must be 64 numbers or nested shape [8, 8]; got rows of shape [2]"),
    ({"inputs": [ROW, ROW[:10]]}, 422, "inputs are ragged: every row must have the same shape"),
    ({"inputs": [["a"] * 64]}, 422, "inputs must be numbers, got strings"),
    ({"inputs": [["NaN"] + ROW[1:]]}, 422, "inputs must be numbers, got strings"),
    ({"inputs": [[True] * 64]}, 422, "inputs must be numbers, got booleans"),
    ({"inputs": [ROW[:-1] + [1e39]]}, 422, "row 0 holds a NaN, an infinity or a value that overflows float32; all inputs must be finite"),
    ({"inputs": [ROW, ROW[:-1] + [10**400]]}, 422, "row 1 holds a number that overflows float32"),
    ({"inputs": [ROW, ROW[:-1] + [-2e7]]}, 422, "row 1 holds a value beyond ±1.6e+07, a million times the range of the training data"),
    ({"inputs": [ROW, [None] * 64]}, 422, "row 1 holds null; inputs must be numbers"),
    ({"inputs": []}, 422, "inputs must hold at least one row"),
    ({"inputs": 3}, 422, "inputs must be a list of rows, got int"),
    ({"rows": []}, 422, 'the JSON body must be an object {"inputs": [row, ...]}'),
]


@pytest.mark.parametrize("body,status,message", ERRORS)
def test_bad_json_inputs(api, body, status, message):
    response = api.post("/v1/models/digits-mlp/encode", json=body)
    assert response.status_code == status
    assert response.json()["detail"].startswith(message)


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_json_literals(api, literal):
    body = '{"inputs": [[' + ",".join(["1"] * 63 + [literal]) + "]]}"
    response = api.post("/v1/models/digits-mlp/encode", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 422
    assert "all inputs must be finite" in response.json()["detail"]


def test_malformed_bodies(api):
    response = api.post("/v1/models/digits-mlp/encode", content=b'{"inputs": [[1,', headers={"Content-Type": "application/json"})
    assert response.status_code == 400 and response.json()["detail"].startswith("malformed JSON body")
    response = api.post("/v1/models/digits-mlp/encode", content=b"\x93NUMPY garbage", headers={"Content-Type": "application/x-npy"})
    assert response.status_code == 400 and response.json()["detail"].startswith("malformed .npy body")
    response = api.post("/v1/models/digits-mlp/encode", content=npy(np.array(["a"])), headers={"Content-Type": "application/x-npy"})
    assert response.status_code == 422 and "must hold numbers" in response.json()["detail"]
    response = api.post("/v1/models/digits-mlp/encode", content=b"x", headers={"Content-Type": "text/csv"})
    assert response.status_code == 415
    assert response.json()["detail"] == "unsupported Content-Type 'text/csv'; send application/json or application/x-npy"


@pytest.mark.parametrize("path,message", [
    ("/v1/models/nope/encode", f"unknown model 'nope'; available: {sorted(NAMES)}"),
    ("/v1/models/digits-mlp/versions/9/encode", "model 'digits-mlp' has no loaded version or alias '9'; versions: [1], aliases: ['latest']"),
    ("/v1/models/digits-mlp/versions/prod/encode", "model 'digits-mlp' has no loaded version or alias 'prod'"),
    ("/v1/models/digits-mlp/versions/%C2%B2/encode", "model 'digits-mlp' has no loaded version or alias '²'"),  # isdigit, not int
    ("/v1/models/digits-mlp/versions/%EF%BC%91/encode", "model 'digits-mlp' has no loaded version or alias '１'"),  # int reads 1
    ("/v1/models/digits-mlp/explode", "unknown operation 'explode'; allowed: encode, decode, reconstruct, project"),
    ("/v1/models/%2e%2e/encode", "unknown model '..': model names are letters, digits, '_', '.', '-'"),
    ("/v1/models/..%2fetc/encode", "no route POST"),
    ("/v1/models/a/b/c/encode", "no route POST"),
])
def test_not_found(api, path, message):
    response = api.post(path, json={"inputs": [ROW]})
    assert response.status_code == 404
    assert response.json()["detail"].startswith(message)


def test_body_and_row_limits(service_registry):
    with make_client(service_registry, max_body_bytes=2000, max_rows=3) as client:
        wait_ready(client.get)
        big = client.post("/v1/models/digits-mlp/encode", json={"inputs": [ROW] * 40})
        assert big.status_code == 413
        assert big.json()["detail"].startswith("request body of ") and "exceeds the limit of 2000 bytes" in big.json()["detail"]
        rows = client.post("/v1/models/digits-mlp/encode", json={"inputs": [[1] * 64] * 4})
        assert rows.status_code == 413 and rows.json()["detail"] == "4 rows exceed the limit of 3 rows per request"
        assert client.post("/v1/models/digits-mlp/encode", json={"inputs": [[1] * 64] * 3}).status_code == 200


def test_api_key(service_registry):
    with make_client(service_registry, api_key="s3cret") as client:
        wait_ready(client.get)
        assert client.get("/health/live").status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            response = client.get("/v1/models", headers=headers)
            assert response.status_code == 401
            assert response.json()["detail"] == "missing or wrong API key: send 'Authorization: Bearer KEY'"
        assert client.get("/metrics").status_code == 401
        assert client.get("/v2/health/live").json() == {"live": True}
        v2 = client.get("/v2/models/digits-mlp")
        assert v2.status_code == 401 and v2.json() == {"error": "missing or wrong API key: send 'Authorization: Bearer KEY'"}
        ok = client.post("/v1/models/digits-mlp/encode", json={"inputs": [ROW]}, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200


def test_metrics_count_requests_by_model_version_op_status(api):
    api.post("/v1/models/digits-mlp/encode", json={"inputs": [ROW]})
    api.post("/v1/models/digits-mlp/encode", json={"inputs": [ROW[:3]]})
    text = api.get("/metrics").text
    assert 'aeserve_requests_total{model="digits-mlp",op="encode",status="200",version="1"} 1.0' in text
    assert 'aeserve_requests_total{model="digits-mlp",op="encode",status="422",version="1"} 1.0' in text
    assert f"aeserve_loaded_versions {float(len(NAMES))}" in text
    assert "aeserve_onnx_engine_versions 0.0" in text  # the tests' servers run torch only
    assert "aeserve_batch_rows_count 1.0" in text and "aeserve_queue_depth 0.0" in text
    assert "aeserve_model_call_seconds_count 1.0" in text  # the 422 never reached the model
    assert float(re.search(r"^aeserve_model_call_seconds_sum (\S+)", text, re.M).group(1)) > 0


def test_reload_picks_up_new_versions_and_refuses_corrupt_ones(api, service_registry):
    from aeserve.training.trainer import train
    from tests.conftest import digits_run

    train(digits_run("digits-pca", "pca"), service_registry, progress=False)
    train(digits_run("digits-pca", "pca"), service_registry, progress=False)
    weights = service_registry.version_dir("digits-pca", 3) / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x00")
    body = api.post("/v1/reload").json()
    assert body["loaded"] == ["digits-pca:2"]
    assert "sha256" in body["refused"]["digits-pca:3"]
    response = api.post("/v1/models/digits-pca/encode", json={"inputs": [ROW]})
    assert response.json()["version"] == "2"  # the corrupt version 3 never replaces the good one
    assert api.post("/v1/models/digits-pca/versions/1/encode", json={"inputs": [ROW]}).json()["version"] == "1"
    assert api.get("/v1/models/digits-pca/versions/3").status_code == 404


def test_openapi_documents_every_operation(api):
    paths = api.get("/openapi.json").json()["paths"]
    for op in ("encode", "decode", "reconstruct", "project"):
        assert "requestBody" in paths[f"/v1/models/{{name}}/{op}"]["post"]
        assert f"/v1/models/{{name}}/versions/{{version}}/{op}" in paths


def test_npy_edge_cases(api, service_registry):
    version = service_registry.load("digits-pca")
    fortran = np.asfortranarray(IMAGES.reshape(5, 64))
    response = api.post("/v1/models/digits-pca/encode", content=npy(fortran), headers={"Content-Type": "application/x-npy"})
    np.testing.assert_allclose(response.json()["outputs"], version.encode(IMAGES), rtol=1e-5, atol=1e-5)
    truncated = npy(IMAGES)[:-7]
    response = api.post("/v1/models/digits-pca/encode", content=truncated, headers={"Content-Type": "application/x-npy"})
    assert response.status_code == 400
    assert response.json()["detail"] == "malformed .npy body: the header says shape [5, 8, 8] of float32 (1280 bytes), the body holds 1273"
    for bad in (npy(np.array([[1 + 2j] * 64])), npy(np.array([[True] * 64]))):
        response = api.post("/v1/models/digits-pca/encode", content=bad, headers={"Content-Type": "application/x-npy"})
        assert response.status_code == 422 and "must hold numbers" in response.json()["detail"]
    # An object array (which .npy stores as a pickle) is refused from its header alone.
    header = b"{'descr': '|O', 'fortran_order': False, 'shape': (1,), }".ljust(117) + b"\n"
    objects = b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header + b"\x80\x04pickle bytes"
    response = api.post("/v1/models/digits-pca/encode", content=objects, headers={"Content-Type": "application/x-npy"})
    assert response.status_code == 422 and response.json()["detail"] == "the .npy array must hold numbers (float or int), got dtype object"


def test_latency_histogram_buckets_are_cumulative():
    from prometheus_client import generate_latest

    from aeserve.service.metrics import Metrics

    metrics = Metrics()
    for seconds in (0.0004, 0.003, 0.003, 20.0):
        metrics.observe_request("m", "1", "encode", 200, seconds)
    text = generate_latest(metrics.registry).decode()
    labels = 'model="m",op="encode",status="200",version="1"'
    assert f'aeserve_request_seconds_bucket{{le="0.0005",{labels}}} 1.0' in text
    assert f'aeserve_request_seconds_bucket{{le="0.002",{labels}}} 1.0' in text
    assert f'aeserve_request_seconds_bucket{{le="0.005",{labels}}} 3.0' in text
    assert f'aeserve_request_seconds_bucket{{le="10.0",{labels}}} 3.0' in text
    assert f'aeserve_request_seconds_bucket{{le="+Inf",{labels}}} 4.0' in text
    assert f"aeserve_request_seconds_count{{{labels}}} 4.0" in text
    assert f"aeserve_requests_total{{{labels}}} 4.0" in text



@pytest.mark.slow
@pytest.mark.skipif(DEVICE != "cpu", reason="the ONNX engine serves the CPU only")
def test_small_batches_are_served_by_the_engine_process_by_torch_when_it_dies_then_by_a_new_one(service_registry, monkeypatch):
    import httpx

    from aeserve.service.client import Client
    from aeserve.service.runtime import engines as engines_module

    monkeypatch.setattr(engines_module, "RESTART_S", (1.0, 60.0))  # a second before the new child starts
    with LiveServer(service_registry, engine="onnx", models="digits-mlp", poll_seconds=0) as server, Client(server.url) as client:
        get, deadline = (lambda path: httpx.get(server.url + path)), time.monotonic() + 240
        wait_for_metric(get, "aeserve_engine_process_versions 1.0", deadline)
        version = server.app.state.store.get("digits-mlp")
        process, rows_sent = server.app.state.engines.process, []
        assert server.app.state.engines.small is process
        run = process.run
        process.run = lambda version, call, rows: rows_sent.append(len(rows)) or run(version, call, rows)
        codes = client.encode("digits-mlp", IMAGES).outputs
        np.testing.assert_allclose(codes, version.encode(IMAGES), atol=1e-4)
        reconstructed = client.reconstruct("digits-mlp", IMAGES)
        for got, want in zip((reconstructed.outputs, reconstructed.errors, reconstructed.percentiles), version.reconstruct(IMAGES), strict=True):
            np.testing.assert_allclose(got, want, atol=1e-3, rtol=1e-4)
        np.testing.assert_allclose(client.decode("digits-mlp", codes).outputs, version.decode(codes), atol=1e-3)
        np.testing.assert_allclose(client.project("digits-mlp", IMAGES).outputs, version.project(IMAGES), atol=1e-4)
        assert rows_sent == [5, 5, 5, 5]
        many = np.repeat(IMAGES, 26, axis=0)  # 130 rows: torch, in the server
        np.testing.assert_array_equal(client.encode("digits-mlp", many).outputs, version.encode(many))
        assert rows_sent == [5, 5, 5, 5]

        process._child.kill()
        process._child.wait()
        for _ in range(5):  # the first may find the socket not yet known to be closed: retried on torch all the same
            np.testing.assert_array_equal(client.encode("digits-mlp", IMAGES).outputs, version.encode(IMAGES))
        metrics = httpx.get(f"{server.url}/metrics").text
        assert "aeserve_engine_process_versions 0.0" in metrics and "aeserve_onnx_engine_versions 0.0" in metrics

        wait_for_metric(get, "aeserve_engine_process_versions 1.0", deadline)  # exported again, into a new child
        assert process._child.poll() is None
        np.testing.assert_allclose(client.encode("digits-mlp", IMAGES).outputs, codes, atol=1e-6)
        assert rows_sent == [5, 5, 5, 5, 5]


@pytest.mark.slow
@pytest.mark.skipif(DEVICE != "cpu", reason="the ONNX engine serves the CPU only")
def test_small_batches_are_served_by_the_onnx_engine_in_the_server(service_registry):
    with make_client(service_registry, engine="onnx", engine_process=False, models="digits-mlp") as client:
        wait_ready(client.get)
        version = client.app.state.store.get("digits-mlp")
        wait_for_metric(client.get, "aeserve_onnx_engine_versions 1.0", time.monotonic() + 120)
        small = client.app.state.engines.small
        assert small.serves(version, OPERATIONS["encode"].call) and client.app.state.engines.process is None
        answer = client.post("/v1/models/digits-mlp/encode", json={"inputs": IMAGES.tolist()})
        assert answer.status_code == 200, answer.text
        codes = np.array(answer.json()["outputs"], dtype=np.float32)
        engine = small._versions[id(version)].onnx
        np.testing.assert_array_equal(codes, engine.graph("encode", version.preprocessing.to_model(IMAGES)))
        np.testing.assert_allclose(codes, version.encode(IMAGES), atol=1e-4)
        many = np.repeat(IMAGES, 26, axis=0)  # 130 rows: torch
        answer = client.post("/v1/models/digits-mlp/encode", content=npy(many),
                             headers={"Content-Type": "application/x-npy", "Accept": "application/x-npy"})
        np.testing.assert_array_equal(np.load(io.BytesIO(answer.content)), version.encode(many))
        assert "aeserve_onnx_engine_versions 1.0" in client.get("/metrics").text


def test_the_access_log_writes_one_json_line_per_request(service_registry):
    import orjson

    with make_client(service_registry, access_log=True) as client:
        wait_ready(client.get)
        log = client.app.state.access_log
        log.flush()  # the readiness polls so far
        log.stream = io.StringIO()
        assert client.post("/v1/models/digits-mlp/encode", json={"inputs": IMAGES.tolist()}).status_code == 200
        assert client.post("/v1/models/digits-mlp/encode", json={"inputs": [[1.0]]}).status_code == 422
        assert client.get("/v1/models").status_code == 200
        log.flush()
        lines = [orjson.loads(line) for line in log.stream.getvalue().splitlines()]
    assert [(line["method"], line["path"], line["status"]) for line in lines] == [
        ("POST", "/v1/models/digits-mlp/encode", 200), ("POST", "/v1/models/digits-mlp/encode", 422), ("GET", "/v1/models", 200)]
    assert lines[0]["op"] == "encode" and lines[0]["model"] == "digits-mlp" and lines[0]["version"] == "1"
    assert all(line["ms"] > 0 and line["ts"] > 1.7e9 for line in lines)
