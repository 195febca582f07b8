"""Open Inference Protocol v2: a real client of the protocol (tritonclient's HTTP client) against a live server."""
import numpy as np
import pytest

from tests.service.conftest import LiveServer

httpclient = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402

IMAGES = (np.random.default_rng(3).random((4, 8, 8)) * 16).astype(np.float32)


@pytest.fixture(scope="module")
def live(trained_registry):
    with LiveServer(trained_registry, poll_seconds=0) as server:
        yield server


@pytest.fixture
def client(live):
    client = httpclient.InferenceServerClient(url=f"127.0.0.1:{live.port}")
    yield client
    client.close()


def test_health_and_metadata(client, trained_registry):
    assert client.is_server_live() and client.is_server_ready()
    assert client.get_server_metadata()["name"] == "aeserve"
    assert client.is_model_ready("digits-mlp") and client.is_model_ready("digits-mlp", "1")
    assert not client.is_model_ready("nope")
    metadata = client.get_model_metadata("digits-mlp")
    assert metadata["versions"] == ["1"]
    assert {t["name"]: t["shape"] for t in metadata["inputs"]} == {"input": [-1, 8, 8], "code": [-1, 4]}
    assert [t["name"] for t in metadata["outputs"]] == ["code", "reconstruction", "error", "percentile", "coordinates", "feature_error"]


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_infer_matches_the_model(client, trained_registry, binary):
    version = trained_registry.load("digits-mlp")
    request = httpclient.InferInput("input", list(IMAGES.shape), "FP32")
    request.set_data_from_numpy(IMAGES, binary_data=binary)
    outputs = [httpclient.InferRequestedOutput(name, binary_data=binary)
               for name in ("code", "reconstruction", "error", "percentile", "coordinates", "feature_error")]
    result = client.infer("digits-mlp", [request], outputs=outputs, model_version="1")
    recon, errors, percentiles = version.reconstruct(IMAGES)
    np.testing.assert_allclose(result.as_numpy("code"), version.encode(IMAGES), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(result.as_numpy("reconstruction"), recon, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(result.as_numpy("error"), errors, rtol=1e-5)
    np.testing.assert_allclose(result.as_numpy("percentile"), percentiles, atol=1e-3)
    np.testing.assert_allclose(result.as_numpy("coordinates"), version.project(IMAGES), rtol=1e-5, atol=1e-5)
    scaled = version.preprocessing.to_model
    np.testing.assert_allclose(result.as_numpy("feature_error"), (scaled(recon) - scaled(IMAGES)) ** 2, rtol=1e-4, atol=1e-6)
    assert result.get_response()["model_version"] == "1"


def test_decode_from_codes_and_flat_rows(client, trained_registry):
    version = trained_registry.load("digits-pca")
    codes = version.encode(IMAGES)
    request = httpclient.InferInput("code", list(codes.shape), "FP32")
    request.set_data_from_numpy(codes, binary_data=True)
    result = client.infer("digits-pca", [request], outputs=[httpclient.InferRequestedOutput("reconstruction")])
    np.testing.assert_allclose(result.as_numpy("reconstruction"), version.decode(codes), atol=1e-4)
    flat = IMAGES.reshape(4, 64)
    request = httpclient.InferInput("input", [4, 64], "FP32")
    request.set_data_from_numpy(flat)
    result = client.infer("digits-pca", [request], outputs=[httpclient.InferRequestedOutput("code")])
    np.testing.assert_allclose(result.as_numpy("code"), codes, rtol=1e-5, atol=1e-5)


def test_errors_use_the_protocols_error_body(client, live):
    import httpx

    request = httpclient.InferInput("input", [2, 5], "FP32")
    request.set_data_from_numpy(np.zeros((2, 5), np.float32))
    with pytest.raises(InferenceServerException, match=r"input 'input': each row must be 64 numbers or nested shape \[8, 8\]; got rows of shape \[5\]"):
        client.infer("digits-mlp", [request])
    with pytest.raises(InferenceServerException, match="unknown model 'nope'"):
        client.infer("nope", [request])
    response = httpx.post(f"{live.url}/v2/models/digits-mlp/infer",
                          json={"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [1.0] * 64}],
                                "outputs": [{"name": "logits"}]})
    assert response.status_code == 400
    allowed = "['code', 'reconstruction', 'error', 'percentile', 'coordinates', 'feature_error', 'stream']"
    assert response.json() == {"error": f"unknown output(s) ['logits']; allowed: {allowed}"}
    response = httpx.post(f"{live.url}/v2/models/digits-mlp/infer", content=b"{", headers={"Inference-Header-Content-Length": "9"})
    assert response.status_code == 400 and "must be a byte count within the body" in response.json()["error"]
    odd = {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [1.0] * 64, "parameters": [1]}], "parameters": "x"}
    assert httpx.post(f"{live.url}/v2/models/digits-mlp/infer", json=odd).status_code == 200
    assert httpx.get(f"{live.url}/v2/nothing").json() == {"error": "no route GET /v2/nothing; see /docs for the API"}
    nan = {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [float("nan")] * 64}]}
    response = httpx.post(f"{live.url}/v2/models/digits-mlp/infer", content=orjson_nan(nan), headers={"Content-Type": "application/json"})
    assert response.status_code == 400


def orjson_nan(document) -> bytes:
    import json

    return json.dumps(document).encode()  # Python's json writes NaN literals
