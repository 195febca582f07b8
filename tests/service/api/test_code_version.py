"""Codes that know their version: decode with code_version refuses codes of another version (409 naming both), on v1
(query string or JSON body, JSON and .npy bodies), on v2 (a request parameter) and through the Python client."""
import io

import numpy as np
import pytest

from aeserve.models.registry import Registry
from aeserve.training.trainer import train
from aeserve_client import Client, ConflictError
from tests.conftest import digits_run
from tests.servers import make_client, wait_ready

CODES = np.random.default_rng(2).normal(size=(3, 4)).astype(np.float32)
REFUSED = ("the codes are of digits-mlp version 1, this is version 2: their codes differ; decode them with version 1, or encode "
           "the data again with version 2")


@pytest.fixture
def two_versions(service_registry: Registry):
    """digits-mlp versions 1 and 2 (latest), served in-process."""
    train(digits_run("digits-mlp", "mlp", epochs=1, seed=4), service_registry, progress=False)
    with make_client(service_registry) as client:
        wait_ready(client.get)
        yield client


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def test_codes_of_another_version_are_refused_with_409_naming_both(two_versions):
    api = two_versions
    plain = api.post("/v1/models/digits-mlp/decode", json={"inputs": CODES.tolist()}).json()["outputs"]
    for url, body in (("/v1/models/digits-mlp/decode?code_version=1", {"inputs": CODES.tolist()}),
                      ("/v1/models/digits-mlp/decode", {"inputs": CODES.tolist(), "code_version": 1}),
                      ("/v1/models/digits-mlp/decode", {"inputs": CODES.tolist(), "code_version": "1"}),
                      ("/v1/models/digits-mlp/decode?code_version=2", {"inputs": CODES.tolist(), "code_version": "1"}),  # each given counts
                      ("/v1/models/digits-mlp/versions/latest/decode?code_version=1", {"inputs": CODES.tolist()})):
        response = api.post(url, json=body)
        assert (response.status_code, response.json()) == (409, {"detail": REFUSED})
    refused = api.post("/v1/models/digits-mlp/decode?code_version=1", content=npy(CODES), headers={"Content-Type": "application/x-npy"})
    assert (refused.status_code, refused.json()) == (409, {"detail": REFUSED})
    same = api.post("/v1/models/digits-mlp/decode?code_version=2", json={"inputs": CODES.tolist(), "code_version": 2.0})
    assert same.status_code == 200 and same.json()["outputs"] == plain and same.json()["version"] == "2"
    older = api.post("/v1/models/digits-mlp/versions/1/decode?code_version=1", json={"inputs": CODES.tolist()})
    assert older.status_code == 200 and older.json()["version"] == "1" and older.json()["outputs"] != plain


@pytest.mark.parametrize("query, body, message", [
    ("code_version=0", None, "code_version must be a version number (1, 2, 3, ...); got '0'"),
    ("code_version=latest", None, "code_version must be a version number (1, 2, 3, ...); got 'latest'"),
    ("code_version=1&code_version=2", None, "give code_version once; got ['1', '2']"),
    ("", 1.5, "code_version must be a version number (1, 2, 3, ...); got 1.5"),
    ("", True, "code_version must be a version number (1, 2, 3, ...); got True"),
])
def test_a_code_version_that_is_not_a_version_number_is_422(two_versions, query, body, message):
    document = {"inputs": CODES.tolist(), **({"code_version": body} if body is not None else {})}
    response = two_versions.post(f"/v1/models/digits-mlp/decode?{query}", json=document)
    assert (response.status_code, response.json()) == (422, {"detail": message})


def test_code_version_on_an_operation_that_takes_inputs_is_422(two_versions):
    response = two_versions.post("/v1/models/digits-mlp/encode?code_version=2", json={"inputs": np.zeros((1, 64)).tolist()})
    assert (response.status_code, response.json()) == (422, {"detail": "code_version applies to operations that take codes (decode); "
                                                                       "encode takes inputs"})


def test_v2_takes_code_version_as_a_request_parameter(two_versions):
    def infer(name: str, parameters: dict, shape=(3, 4), data=CODES):
        return two_versions.post("/v2/models/digits-mlp/infer", json={
            "inputs": [{"name": name, "shape": list(shape), "datatype": "FP32", "data": np.ravel(data).tolist()}], "parameters": parameters})

    refused = infer("code", {"code_version": 1})
    assert (refused.status_code, refused.json()) == (409, {"error": REFUSED})
    assert infer("code", {"code_version": "2"}).status_code == 200
    wrong = infer("input", {"code_version": 2}, (1, 64), np.zeros(64))
    assert (wrong.status_code, wrong.json()) == (400, {"error": "the code_version parameter applies to the input 'code' (codes to decode); "
                                                                "got input 'input'"})


def test_the_openapi_document_admits_code_version_and_lists_409(two_versions):
    document = two_versions.get("/openapi.json").json()
    route = document["paths"].get("/v1/models/digits-mlp/decode") or document["paths"]["/v1/models/{name}/decode"]
    (parameter,) = [p for p in route["post"]["parameters"] if p["name"] == "code_version"]
    assert parameter["in"] == "query" and parameter["schema"] == {"type": "integer", "minimum": 1}
    body = route["post"]["requestBody"]["content"]["application/json"]["schema"]["properties"]
    assert body["code_version"]["anyOf"] == [{"type": "integer", "minimum": 1}, {"type": "string", "pattern": "^[1-9][0-9]*$"}, {"type": "null"}]
    assert "409" in route["post"]["responses"]
    encode = document["paths"].get("/v1/models/digits-mlp/encode") or document["paths"]["/v1/models/{name}/encode"]
    assert "409" not in encode["post"]["responses"] and "code_version" not in str(encode["post"]["parameters"])
    assert "409" in document["paths"]["/v2/models/{name}/infer"]["post"]["responses"]


def test_the_client_sends_code_version(two_versions):
    client = Client(transport=two_versions._transport, base_url="http://testserver")
    codes = client.encode("digits-mlp", np.zeros((2, 8, 8), np.float32), version=1)
    assert codes.version == "1"
    with pytest.raises(ConflictError) as refused:
        client.decode("digits-mlp", codes.outputs, code_version=int(codes.version))
    assert (refused.value.status, refused.value.detail) == (409, REFUSED)
    assert client.decode("digits-mlp", codes.outputs, version=codes.version, code_version=int(codes.version)).version == "1"
