"""Open Inference Protocol v2: a real client of the protocol (tritonclient's HTTP client) against a live server."""
import json

import httpx
import numpy as np
import pytest

from tests.servers import LiveServer

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
    assert [t["name"] for t in metadata["outputs"]] == ["code", "reconstruction", "error", "score", "percentile", "coordinates", "feature_error"]


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_infer_matches_the_model(client, trained_registry, binary):
    version = trained_registry.load("digits-mlp")
    request = httpclient.InferInput("input", list(IMAGES.shape), "FP32")
    request.set_data_from_numpy(IMAGES, binary_data=binary)
    outputs = [httpclient.InferRequestedOutput(name, binary_data=binary)
               for name in ("code", "reconstruction", "error", "score", "percentile", "coordinates", "feature_error")]
    result = client.infer("digits-mlp", [request], outputs=outputs, model_version="1")
    recon, errors, percentiles = version.reconstruct(IMAGES)
    np.testing.assert_allclose(result.as_numpy("code"), version.encode(IMAGES), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(result.as_numpy("reconstruction"), recon, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(result.as_numpy("error"), errors, rtol=1e-5)
    np.testing.assert_allclose(result.as_numpy("score"), version.scores(IMAGES), rtol=1e-5)
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
    allowed = "['code', 'reconstruction', 'error', 'score', 'percentile', 'coordinates', 'feature_error', 'stream']"
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


def infer(live, document, binary: bytes = b"", headers=None) -> httpx.Response:
    """POST ``document`` to digits-mlp's infer route; with ``binary``, as the JSON header followed by those bytes."""
    header = json.dumps(document).encode()
    headers = {"Content-Type": "application/json", **({"Inference-Header-Content-Length": str(len(header))} if binary else {}), **(headers or {})}
    return httpx.post(f"{live.url}/v2/models/digits-mlp/infer", content=header + binary, headers=headers)


def code(datatype, data, **parameters):
    return {"inputs": [{"name": "code", "shape": [1, 4], "datatype": datatype, "data": data}], "outputs": [{"name": "reconstruction"}], **parameters}


def test_header_length_must_be_ascii_digits(live):
    # the byte 0xb2 is '²' in latin-1: a digit to str.isdigit(), not to int()
    response = infer(live, code("FP32", [0.0] * 4), headers={"Inference-Header-Content-Length": b"\xb2"})
    assert response.status_code == 400
    assert response.json() == {"error": "inference-header-content-length must be a byte count within the body, got '²'"}


@pytest.mark.parametrize("datatype,data,message", [
    ("INT8", [1.7, 2.2, 0.5, -1.9], "data element 0, 1.7, is not an integer, as INT8 needs"),
    ("INT16", [[1, 2], [3, 4.5]], "data element 3, 4.5, is not an integer, as INT16 needs"),
    ("INT8", [1, 300, 0, 0], "data element 1, 300, is outside INT8's range [-128, 127]"),
    ("UINT8", [1, 2, -1, 0], "data element 2, -1, is outside UINT8's range [0, 255]"),
    ("FP32", ["1.5", "1e3", "2", "3"], "data must be numbers of datatype FP32; element 0 is the string '1.5'"),
    ("FP32", [1, 2, 3, "4"], "data must be numbers of datatype FP32; element 3 is the string '4'"),
    ("FP32", [True, False, True, True], "data must be numbers of datatype FP32; element 0 is the boolean true"),
    ("FP32", [1.0, 0.5, False, 2.0], "data must be numbers of datatype FP32; element 2 is the boolean false"),
    ("INT8", [1, 2, 3, True], "data must be numbers of datatype INT8; element 3 is the boolean true"),
    ("FP32", [1.0, None, 0.0, 0.0], "data must be numbers of datatype FP32; element 1 is null"),
    ("FP32", [[1.0, 2.0], [3.0]], "data is ragged or nested too deep: send one flat list, or lists of equal lengths nested as the shape"),
    ("FP32", "1,2,3,4", "data must be a list of numbers of datatype FP32, got the string '1,2,3,4'"),
], ids=["fraction", "nested-fraction", "int8-range", "uint8-negative", "strings", "one-string", "booleans", "one-boolean",
        "int-boolean", "null", "ragged", "not-a-list"])
def test_json_data_must_be_numbers_of_the_datatype(live, datatype, data, message):
    response = infer(live, code(datatype, data))
    assert response.status_code == 400
    assert response.json() == {"error": f"input 'code': {message}"}


def test_integer_datatypes_take_whole_numbers(live, trained_registry):
    whole = np.array([[1, 2, 0, -1]], np.float32)
    expected = trained_registry.load("digits-mlp").decode(whole)
    for datatype, data in [("INT8", [1, 2, 0, -1]), ("INT8", [[1.0, 2.0, 0.0, -1.0]]), ("INT64", [1, 2, 0, -1]), ("FP16", [1, 2, 0, -1])]:
        response = infer(live, code(datatype, data))
        assert response.status_code == 200, response.text
        np.testing.assert_allclose(np.reshape(response.json()["outputs"][0]["data"], expected.shape), expected, rtol=1e-5, atol=1e-5)
    assert infer(live, code("INT8", [1.5, 2, 0, -1])).status_code == 400  # the fraction a cast would truncate to the codes above


def bytes_input(size):
    return {"inputs": [{"name": "stream", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": size}}]}


@pytest.mark.parametrize("document,binary,message", [
    (bytes_input(-2), b"\x01\x00\x00\x00abc", "input 'stream': binary_data_size must be a non-negative integer (a byte count), got -2"),
    (bytes_input(True), b"\x00", "input 'stream': binary_data_size must be a non-negative integer (a byte count), got True"),
    (bytes_input(5), b"\x01\x00\x00\x00abc",
     "input 'stream': 2 bytes follow the tensor's data; binary_data_size must count every byte after the JSON header "
     "(inference-header-content-length {split})"),
    ({"inputs": [{"name": "code", "shape": [1, 4], "datatype": "FP32", "parameters": {"binary_data_size": 16}}]},
     np.zeros(4, "<f4").tobytes() + b"xyz",
     "input 'code': 3 bytes follow the tensor's data; binary_data_size must count every byte after the JSON header "
     "(inference-header-content-length {split})"),
    (code("FP32", [0.0] * 4), b"xy",
     "input 'code': 2 bytes follow the tensor's data; binary_data_size must count every byte after the JSON header "
     "(inference-header-content-length {split})"),
    ({"inputs": [{"name": "code", "shape": [1, 1], "datatype": "UINT8", "parameters": {"binary_data_size": True}}]}, b"\x01",
     "input 'code': binary_data_size must be a non-negative integer (a byte count), got True"),
], ids=["bytes-negative", "bytes-boolean", "bytes-leftover", "fp32-leftover", "json-leftover", "uint8-boolean"])
def test_binary_data_sizes_must_count_the_bytes_sent(live, document, binary, message):
    response = infer(live, document, binary)
    assert response.status_code == 400
    assert response.json() == {"error": message.format(split=len(json.dumps(document).encode()))}


def test_binary_data_parameters_are_booleans(live, trained_registry):
    answer = infer(live, {**code("FP32", [0.0] * 4), "outputs": [{"name": "reconstruction", "parameters": {"binary_data": False}}]})
    assert answer.status_code == 200 and answer.headers["content-type"] == "application/json"
    expected = trained_registry.load("digits-mlp").decode(np.zeros((1, 4), np.float32))
    np.testing.assert_allclose(np.reshape(answer.json()["outputs"][0]["data"], expected.shape), expected, rtol=1e-5, atol=1e-5)
    response = infer(live, {**code("FP32", [0.0] * 4), "outputs": [{"name": "reconstruction", "parameters": {"binary_data": "false"}}]})
    assert response.status_code == 400
    assert response.json() == {"error": "output 'reconstruction': binary_data must be true or false, got 'false'"}
    response = infer(live, code("FP32", [0.0] * 4, parameters={"binary_data_output": "false"}))
    assert response.status_code == 400
    assert response.json() == {"error": "the request parameter binary_data_output must be true or false, got 'false'"}


DATATYPES = "['BYTES', 'FP16', 'FP32', 'FP64', 'INT16', 'INT32', 'INT64', 'INT8', 'UINT16', 'UINT8']"


@pytest.mark.parametrize("tensor,message", [
    ({"name": "input", "shape": [1, 64], "datatype": {}, "data": [0.0] * 64}, f"input 'input': datatype {{}} is not one of {DATATYPES}"),
    ({"name": "code", "shape": [1, 4], "datatype": ["FP32"], "data": [0.0] * 4}, f"input 'code': datatype ['FP32'] is not one of {DATATYPES}"),
    ({"name": "code", "shape": [0, 2**40, 2**40], "datatype": "FP32", "data": []},
     "input 'code': shape [0, 1099511627776, 1099511627776] has more dimensions, or larger ones, than an array can have"),
    ({"name": "code", "shape": [0] * 70, "datatype": "FP32", "data": []},
     f"input 'code': shape {[0] * 70} has more dimensions, or larger ones, than an array can have"),
], ids=["datatype-object", "datatype-list", "huge-shape", "too-many-dimensions"])
def test_a_malformed_tensor_is_a_400_not_a_500(live, tensor, message):
    response = infer(live, {"inputs": [tensor]})
    assert (response.status_code, response.json()) == (400, {"error": message})


def test_the_document_admits_no_tensor_without_rows_or_values(live):
    jsonschema = pytest.importorskip("jsonschema")
    document = httpx.get(f"{live.url}/openapi.json").json()
    body = document["paths"]["/v2/models/{name}/infer"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    refused = {"inputs": [{"datatype": "FP16", "name": "code", "shape": []}]}  # a scalar: no rows, and no data
    response = infer(live, refused)
    assert (response.status_code, response.json()) == (400, {"error": "input 'code': data must be a list of numbers of datatype FP16, got null"})
    for tensor in ({"datatype": "FP16", "name": "code", "shape": []}, {"datatype": "FP16", "name": "code", "shape": [], "data": [0.0]},
                   {"datatype": "FP16", "name": "code", "shape": [0, 4], "data": []}, {"datatype": "FP16", "name": "code", "shape": [1, 4]}):
        assert not jsonschema.Draft202012Validator(body).is_valid({"inputs": [tensor]}), tensor
        assert infer(live, {"inputs": [tensor]}).status_code == 400
    admitted = {"inputs": [{"datatype": "FP16", "name": "code", "shape": [1, 4], "data": [0.0] * 4}]}
    assert jsonschema.Draft202012Validator(body).is_valid(admitted) and infer(live, admitted).status_code == 200
