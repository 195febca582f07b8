"""compress and decompress over v1 and the Open Inference Protocol: round trips, refusals, BYTES with tritonclient."""
from __future__ import annotations

import base64

import numpy as np
import pytest

from aeserve.training.trainer import train
from tests.conftest import digits_run
from tests.servers import LiveServer, make_client, wait_ready

ROWS = (np.random.default_rng(0).random((5, 64)) * 16).astype(np.float32)


@pytest.fixture
def rd_api(service_registry):
    with make_client(service_registry) as client:
        wait_ready(client.get)
        yield client


def compress(client, rows=ROWS, path="/v1/models/digits-rd/compress"):
    answer = client.post(path, json={"inputs": rows.tolist()})
    assert answer.status_code == 200, answer.text
    return answer.json()["outputs"]


def test_compress_then_decompress_gives_back_what_reconstruct_shows(rd_api, service_registry):
    streams = compress(rd_api)
    assert len(streams) == len(ROWS) and all(isinstance(s, str) for s in streams)
    raw = [base64.b64decode(s) for s in streams]
    assert all(r[0] == 0xA1 and len(r) > 7 for r in raw)
    back = rd_api.post("/v1/models/digits-rd/decompress", json={"inputs": streams})
    assert back.status_code == 200 and back.headers["X-Model-Version"] == "1"
    decompressed = np.asarray(back.json()["outputs"], dtype=np.float32)
    shown = np.asarray(rd_api.post("/v1/models/digits-rd/reconstruct", json={"inputs": ROWS.tolist()}).json()["outputs"], dtype=np.float32)
    np.testing.assert_allclose(decompressed.reshape(len(ROWS), -1), shown, rtol=1e-5, atol=1e-4)  # encode rounds: same integers
    version = service_registry.load("digits-rd")
    codes = version.encode(ROWS)
    np.testing.assert_array_equal(np.stack([version.streams.unpack(r) for r in raw]), codes)


def test_decompress_refuses_another_versions_and_damaged_streams(rd_api, service_registry):
    old = compress(rd_api)
    train(digits_run("digits-rd", "rd", epochs=1), service_registry, progress=False)
    assert rd_api.post("/v1/reload").status_code == 200
    refused = rd_api.post("/v1/models/digits-rd/decompress", json={"inputs": old})
    assert refused.status_code == 422
    assert refused.json()["detail"] == ("row 0: the stream was made by version 1 of 'digits-rd', not version 2; "
                                        "decompress it with /v1/models/digits-rd/versions/1/decompress")
    assert rd_api.post("/v1/models/digits-rd/versions/1/decompress", json={"inputs": old}).status_code == 200

    raw = base64.b64decode(old[1])
    for damaged, why in ((raw[:-1], "corrupt or truncated"), (raw[:5], "truncated"), (raw[:7] + bytes([raw[7] ^ 1]) + raw[8:], "corrupt"),
                         (b"\x89PNG\r\n", "not an aeserve stream")):
        answer = rd_api.post("/v1/models/digits-rd/versions/1/decompress", json={"inputs": [old[0], base64.b64encode(damaged).decode()]})
        assert answer.status_code == 422 and answer.json()["detail"].startswith("row 1: ") and why in answer.json()["detail"]
    for bad, detail in (({"inputs": ["%%%"]}, "row 0: not base64"), ({"inputs": [3]}, "row 0: a compressed stream must be a base64 string"),
                        ({"inputs": []}, "non-empty list of compressed streams")):
        answer = rd_api.post("/v1/models/digits-rd/decompress", json=bad)
        assert answer.status_code == 422 and detail in answer.json()["detail"]


def test_versions_without_an_entropy_model_and_options_that_do_not_apply_get_4xx(rd_api):
    for op, body in (("compress", {"inputs": ROWS.tolist()}), ("decompress", {"inputs": ["oQ=="]})):
        answer = rd_api.post(f"/v1/models/digits-mlp/{op}", json=body)
        assert answer.status_code == 422
        assert answer.json()["detail"].startswith(f"version digits-mlp:1 (kind mlp) has no entropy model, so it cannot {op}")
    assert rd_api.post("/v1/models/digits-rd/compress?codes=int8", json={"inputs": ROWS.tolist()}).status_code == 422
    npy = rd_api.post("/v1/models/digits-rd/decompress", content=b"\x93NUMPY", headers={"Content-Type": "application/x-npy"})
    assert npy.status_code == 415
    # compress answers JSON even when .npy is accepted: streams have no .npy form
    assert rd_api.post("/v1/models/digits-rd/compress", json={"inputs": ROWS.tolist()},
                       headers={"Accept": "application/x-npy"}).headers["content-type"] == "application/json"


def test_the_openapi_document_lists_compress_and_decompress_with_their_bodies(rd_api):
    paths = rd_api.get("/openapi.json").json()["paths"]
    decompress = paths["/v1/models/{name}/decompress"]["post"]
    inputs = decompress["requestBody"]["content"]["application/json"]["schema"]["properties"]["inputs"]
    assert inputs["items"]["contentEncoding"] == "base64"
    compress = paths["/v1/models/{name}/versions/{version}/compress"]["post"]
    answer = compress["responses"]["200"]["content"]
    assert set(answer) == {"application/json"} and answer["application/json"]["schema"]["properties"]["outputs"]["items"]["type"] == "string"
    assert not any(p["name"] == "codes" for p in compress["parameters"])


def test_v2_streams_as_base64_json_round_trip(rd_api):
    metadata = rd_api.get("/v2/models/digits-rd").json()
    stream = {"name": "stream", "datatype": "BYTES", "shape": [-1]}
    assert stream in metadata["inputs"] and stream in metadata["outputs"]
    assert stream not in rd_api.get("/v2/models/digits-mlp").json()["inputs"]
    answer = rd_api.post("/v2/models/digits-rd/infer", json={
        "inputs": [{"name": "input", "shape": list(ROWS.shape), "datatype": "FP32", "data": ROWS.ravel().tolist()}],
        "outputs": [{"name": "stream"}]})
    assert answer.status_code == 200, answer.text
    tensor = answer.json()["outputs"][0]
    assert (tensor["name"], tensor["datatype"], tensor["shape"]) == ("stream", "BYTES", [len(ROWS)])
    assert tensor["data"] == compress(rd_api)
    back = rd_api.post("/v2/models/digits-rd/infer", json={"inputs": [{"name": "stream", "shape": [len(ROWS)], "datatype": "BYTES",
                                                                        "data": tensor["data"]}]})
    assert back.status_code == 200
    out = back.json()["outputs"][0]
    assert out["name"] == "reconstruction" and out["shape"][0] == len(ROWS)
    bad = rd_api.post("/v2/models/digits-rd/infer", json={"inputs": [{"name": "stream", "shape": [1], "datatype": "BYTES", "data": ["oQ=="]}]})
    assert bad.status_code == 400 and "truncated" in bad.json()["error"]
    mixed = rd_api.post("/v2/models/digits-rd/infer", json={
        "inputs": [{"name": "input", "shape": list(ROWS.shape), "datatype": "FP32", "data": ROWS.ravel().tolist()}],
        "outputs": [{"name": "stream"}, {"name": "code"}]})
    assert mixed.status_code == 400 and "comes alone" in mixed.json()["error"]


def test_tritonclient_sends_and_receives_bytes_tensors(service_registry):
    """A real client of the protocol: compress to a BYTES output and decompress a BYTES input, with the binary extension."""
    httpclient = pytest.importorskip("tritonclient.http")
    version = service_registry.load("digits-rd")
    with LiveServer(service_registry, poll_seconds=0) as server:
        client = httpclient.InferenceServerClient(url=f"127.0.0.1:{server.port}")
        try:
            request = httpclient.InferInput("input", list(ROWS.shape), "FP32")
            request.set_data_from_numpy(ROWS)
            compressed = client.infer("digits-rd", [request], outputs=[httpclient.InferRequestedOutput("stream", binary_data=True)])
            streams = compressed.as_numpy("stream")
            assert compressed.get_output("stream")["datatype"] == "BYTES" and streams.shape == (len(ROWS),)
            np.testing.assert_array_equal(np.stack([version.streams.unpack(bytes(s)) for s in streams]), version.encode(ROWS))
            back_in = httpclient.InferInput("stream", [len(streams)], "BYTES")
            back_in.set_data_from_numpy(streams, binary_data=True)
            back = client.infer("digits-rd", [back_in], outputs=[httpclient.InferRequestedOutput("reconstruction", binary_data=True)])
        finally:
            client.close()
    np.testing.assert_allclose(back.as_numpy("reconstruction").reshape(len(ROWS), -1), version.reconstruct(ROWS)[0].reshape(len(ROWS), -1),
                               rtol=1e-5, atol=1e-4)


async def test_the_python_client_compresses_and_decompresses_from_the_version_a_stream_names(service_registry):
    from aeserve_client import AsyncClient, Client

    version = service_registry.load("digits-rd")
    with LiveServer(service_registry, poll_seconds=0) as server:
        with Client(server.url, max_rows=2) as client:  # 5 rows: three requests each way, joined in order
            streams = client.compress("digits-rd", ROWS).outputs
            assert [bytes(s) for s in streams] == [version.streams.pack(c) for c in version.encode(ROWS)]
            train(digits_run("digits-rd", "rd", epochs=1), service_registry, progress=False)
            client._http.post("/v1/reload")
            back = client.decompress("digits-rd", streams)  # latest is 2 now: the streams name version 1
            assert back.version == "1"
            np.testing.assert_allclose(back.outputs.reshape(len(ROWS), -1), version.reconstruct(ROWS)[0].reshape(len(ROWS), -1),
                                       rtol=1e-5, atol=1e-4)
        async with AsyncClient(server.url) as client:
            again = await client.decompress("digits-rd", streams)
            assert again.version == "1" and again.outputs.shape == back.outputs.shape
