"""Compact codes: int8 and binary codes from encode on v1 JSON, v1 .npy and v2, checked against the float codes."""
import io
import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save as save_safetensors

from aeserve.models.checkpoint import MANIFEST, WEIGHTS, sha256_bytes
from aeserve.models.outputs import CODE_FORMS, CodeQuantization
from aeserve.models.registry import Registry
from aeserve.training.config import build_run_config
from aeserve.training.trainer import train
from tests.conftest import digits_run
from tests.servers import LiveServer, make_client, wait_ready

NAMES = ("digits-mlp", "digits-pca12")  # code_dim 4 (one byte of bits, four unused) and 12 (two bytes)
rng = np.random.default_rng(1)
IMAGES = (rng.random((7, 8, 8)) * 16).astype(np.float32)


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def strip_quantization(registry: Registry, name: str) -> None:
    """Make version 1 of ``name`` look published before compact codes: no constants in its weights, no manifest note."""
    folder = registry.version_dir(name, 1)
    tensors = {k: v for k, v in load_safetensors((folder / WEIGHTS).read_bytes()).items() if not k.startswith("code_quantization.")}
    weights = save_safetensors(tensors)
    manifest = json.loads((folder / MANIFEST).read_text())
    del manifest["code_quantization"]
    manifest["sha256"] = sha256_bytes(weights)
    (folder / WEIGHTS).write_bytes(weights)
    (folder / MANIFEST).write_text(json.dumps(manifest))


@pytest.fixture(scope="module")
def codes_registry(tmp_path_factory: pytest.TempPathFactory) -> Registry:
    """digits-mlp and digits-pca12 as published now, and digits-old: digits-mlp as published before compact codes."""
    registry = Registry(tmp_path_factory.mktemp("codes") / "registry")
    train(digits_run("digits-mlp", "mlp", report=False), registry, progress=False)
    train(build_run_config({"name": "digits-pca12", "data": {"source": "digits", "limit": 400}, "model": {"kind": "pca", "code_dim": 12},
                            "train": {"report": False}}), registry, progress=False)
    shutil.copytree(registry.root / "digits-mlp", registry.root / "digits-old")
    manifest = json.loads((registry.version_dir("digits-old", 1) / MANIFEST).read_text())
    manifest["name"] = "digits-old"
    (registry.version_dir("digits-old", 1) / MANIFEST).write_text(json.dumps(manifest))
    strip_quantization(registry, "digits-old")
    return registry


@pytest.fixture(scope="module")
def api(codes_registry):
    with make_client(codes_registry) as client:
        wait_ready(client.get)
        yield client


def check_agreement(quantization: CodeQuantization, floats: np.ndarray, q: np.ndarray, bits: np.ndarray) -> None:
    """int8: scale * q within scale / 2 of the float code (saturated at ±127 beyond 127.5 * scale);
    binary: bit d is float code d > threshold d, packed 8 per byte, dimension 0 in the first byte's high bit."""
    n, d = floats.shape
    assert q.shape == (n, d) and q.dtype == np.int8 and bits.shape == (n, -(-d // 8)) and bits.dtype == np.uint8
    scale = quantization.scale
    inside = np.abs(floats) <= 127.5 * scale
    assert np.all(np.abs(quantization.dequantize(q) - floats)[inside] <= (scale / 2 * (1 + 1e-5) + 1e-7)[np.nonzero(inside)[1]])
    assert np.array_equal(q[~inside], np.sign(floats[~inside]).astype(np.int8) * 127)
    unpacked = np.unpackbits(bits, axis=1)
    assert np.array_equal(unpacked[:, :d], floats > quantization.threshold)
    assert not unpacked[:, d:].any()


def test_fit_on_known_codes():
    codes = np.zeros((1001, 11), dtype=np.float32)
    codes[:, 0] = np.linspace(-2.0, 1.0, 1001)  # |code| 0.999 quantile: 1.997
    codes[:, 1] = np.arange(1001) % 2  # 501 zeros and 500 ones: the median is 0
    codes[:, 2:] = np.linspace(0, 1, 1001)[:, None] * np.arange(9)  # dimension 2 is 0 throughout: scale 1
    quantization = CodeQuantization.fit(codes)
    assert quantization.scale.dtype == np.float32 and quantization.scale.shape == (11,)
    np.testing.assert_allclose(quantization.scale[0], np.quantile(np.abs(codes[:, 0].astype(np.float64)), 0.999) / 127, rtol=1e-6)
    assert quantization.scale[2] == 1.0 and quantization.threshold[1] == 0.0 and quantization.threshold[2] == 0.0
    q, bits = quantization.int8(codes), quantization.binary(codes)
    check_agreement(quantization, codes, q, bits)
    assert q[0, 0] == -127 and q[-1, 0] == round(1.0 / quantization.scale[0])  # -2 saturates
    assert bits.shape == (1001, 2) and bits[-1, 1] == 0b1110_0000  # dimensions 8, 9, 10 above their medians, 5 bits unused


def test_published_versions_carry_the_constants(codes_registry):
    manifest = codes_registry.manifest("digits-mlp")
    note = manifest["code_quantization"]
    assert note == {"tensors": ["code_quantization.scale", "code_quantization.threshold"], "scale_quantile": 0.999,
                    "threshold": "median", "rows": manifest["training"]["n_train"]}
    version = codes_registry.load("digits-mlp")
    assert version.code_quantization.scale.shape == (4,) and np.all(version.code_quantization.scale > 0)
    assert codes_registry.load("digits-old").code_quantization is None


@pytest.mark.parametrize("name", NAMES)
def test_v1_json_and_npy(api, codes_registry, name):
    version = codes_registry.load(name)
    quantization, floats = version.code_quantization, version.encode(IMAGES)
    answers = {}
    for form in CODE_FORMS:
        response = api.post(f"/v1/models/{name}/encode?codes={form}", json={"inputs": IMAGES.tolist()})
        assert response.status_code == 200, response.text
        body = response.json()
        answers[form] = body["outputs"]
        assert all(isinstance(v, int) for row in body["outputs"] for v in row) or form == "float"
        assert set(body) - {"model", "version", "outputs"} == {"int8": {"scale"}, "binary": {"threshold"}}.get(form, set())
        as_npy = api.post(f"/v1/models/{name}/versions/1/encode?codes={form}", content=npy(IMAGES),
                          headers={"Content-Type": "application/x-npy", "Accept": "application/x-npy"})
        assert as_npy.status_code == 200, as_npy.text
        array = np.load(io.BytesIO(as_npy.content))
        assert array.dtype == {"float": np.float32, "int8": np.int8, "binary": np.uint8}[form]
        np.testing.assert_array_equal(array, np.asarray(body["outputs"], dtype=array.dtype))
    np.testing.assert_allclose(answers["float"], floats, rtol=1e-5, atol=1e-5)
    q, bits = np.asarray(answers["int8"], dtype=np.int8), np.asarray(answers["binary"], dtype=np.uint8)
    assert np.all((0 <= np.asarray(answers["binary"])) & (np.asarray(answers["binary"]) <= 255))
    check_agreement(quantization, floats, q, bits)
    body = api.post(f"/v1/models/{name}/encode?codes=int8", json={"inputs": IMAGES.tolist()}).json()
    np.testing.assert_array_equal(np.asarray(body["scale"], dtype=np.float32), quantization.scale)
    body = api.post(f"/v1/models/{name}/encode?codes=binary", json={"inputs": IMAGES.tolist()}).json()
    np.testing.assert_array_equal(np.asarray(body["threshold"], dtype=np.float32), quantization.threshold)


@pytest.mark.parametrize("binary_output", [False, True])
def test_v2(api, codes_registry, binary_output):
    version = codes_registry.load("digits-pca12")
    floats = version.encode(IMAGES)
    tensors = {}
    for form in CODE_FORMS:
        request = {"inputs": [{"name": "input", "shape": [7, 64], "datatype": "FP32", "data": IMAGES.ravel().tolist()}],
                   "outputs": [{"name": "code"}, {"name": "error"}], "parameters": {"codes": form, "binary_data_output": binary_output}}
        response = api.post("/v2/models/digits-pca12/infer", json=request)
        assert response.status_code == 200, response.text
        if binary_output:
            split = int(response.headers["Inference-Header-Content-Length"])
            header, rest = json.loads(response.content[:split]), response.content[split:]
        else:
            header, rest = response.json(), b""
        outputs, offset = {}, 0
        for out in header["outputs"]:
            dtype = {"FP32": np.float32, "INT8": np.int8, "UINT8": np.uint8}[out["datatype"]]
            if binary_output:
                size = out["parameters"]["binary_data_size"]
                outputs[out["name"]] = (out["datatype"], np.frombuffer(rest[offset:offset + size], dtype=dtype).reshape(out["shape"]))
                offset += size
            else:
                outputs[out["name"]] = (out["datatype"], np.asarray(out["data"], dtype=dtype).reshape(out["shape"]))
        tensors[form] = outputs
    assert list(tensors["float"]) == ["code", "error"]
    assert tensors["int8"]["code"][0] == "INT8" and tensors["int8"]["code"][1].shape == (7, 12)
    assert tensors["binary"]["code"][0] == "UINT8" and tensors["binary"]["code"][1].shape == (7, 2)
    assert tensors["int8"]["code_scale"][0] == "FP32" and list(tensors["int8"]) == ["code", "error", "code_scale"]
    assert list(tensors["binary"]) == ["code", "error", "code_threshold"]
    np.testing.assert_array_equal(tensors["int8"]["code_scale"][1], version.code_quantization.scale)
    np.testing.assert_array_equal(tensors["binary"]["code_threshold"][1], version.code_quantization.threshold)
    np.testing.assert_allclose(tensors["float"]["code"][1], floats, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(tensors["int8"]["error"][1], tensors["float"]["error"][1])
    check_agreement(version.code_quantization, floats, tensors["int8"]["code"][1], tensors["binary"]["code"][1])


def test_openapi_lists_the_option(api):
    document = api.get("/openapi.json").json()
    # digits-old answers float codes only, so each name has its own encode routes, with the forms its versions have
    for name, forms in (("digits-mlp", ["float", "int8", "binary"]), ("digits-old", ["float"])):
        for path in (f"/v1/models/{name}/encode", f"/v1/models/{name}/versions/{{version}}/encode"):
            (codes,) = [p for p in document["paths"][path]["post"]["parameters"] if p["name"] == "codes"]
            assert codes["in"] == "query" and not codes["required"]
            assert codes["schema"] == {"type": "string", "enum": forms, "default": "float"}
            answer = document["paths"][path]["post"]["responses"]["200"]["content"]["application/json"]["schema"]["properties"]
            assert {"scale", "threshold"} <= set(answer)
    for op, query in (("decode", ["code_version"]), ("reconstruct", []), ("project", [])):
        route = document["paths"].get(f"/v1/models/digits-mlp/{op}") or document["paths"][f"/v1/models/{{name}}/{op}"]
        assert [p["name"] for p in route["post"]["parameters"] if p["in"] == "query"] == query
    body = document["paths"]["/v2/models/{name}/infer"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body["properties"]["parameters"]["properties"]["codes"]["enum"] == ["float", "int8", "binary"]


def test_a_version_without_the_constants(api, tmp_path, codes_registry):
    for form in ("int8", "binary"):
        response = api.post(f"/v1/models/digits-old/encode?codes={form}", json={"inputs": IMAGES.tolist()})
        assert response.status_code == 422
        assert response.json()["detail"] == ("version digits-old:1 has no code quantization (it was published before int8 and binary "
                                             f"codes); retrain it to get {form} codes, or ask for codes=float")
        v2 = api.post("/v2/models/digits-old/infer", json={"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32",
                                                                       "data": IMAGES[0].ravel().tolist()}], "parameters": {"codes": form}})
        assert v2.status_code == 400 and "has no code quantization" in v2.json()["error"]
    assert api.post("/v1/models/digits-old/encode?codes=float", json={"inputs": IMAGES.tolist()}).status_code == 200
    # With only such versions loaded, the document offers float alone.
    registry = Registry(tmp_path / "registry")
    shutil.copytree(codes_registry.root / "digits-old", registry.root / "digits-old")
    with make_client(registry) as client:
        wait_ready(client.get)
        (codes,) = [p for p in client.get("/openapi.json").json()["paths"]["/v1/models/{name}/encode"]["post"]["parameters"]
                    if p["name"] == "codes"]
        assert codes["schema"]["enum"] == ["float"]


@pytest.mark.parametrize("query, message", [
    ("codes=int4", "codes must be one of float, int8, binary; got 'int4'"),
    ("codes=", "codes must be one of float, int8, binary; got ''"),
    ("codes=int8&codes=binary", "give codes once, one of float, int8, binary; got ['int8', 'binary']"),
])
def test_unknown_or_repeated_option(api, query, message):
    response = api.post(f"/v1/models/digits-mlp/encode?{query}", json={"inputs": IMAGES.tolist()})
    assert (response.status_code, response.json()) == (422, {"detail": message})


def test_option_on_other_calls(api):
    response = api.post("/v1/models/digits-mlp/reconstruct?codes=int8", json={"inputs": IMAGES.tolist()})
    assert (response.status_code, response.json()) == (
        422, {"detail": "codes=int8 applies to the codes that encode answers; this call answers reconstruction, error, score, percentile"})
    assert api.post("/v1/models/digits-mlp/reconstruct?codes=float&other=1", json={"inputs": IMAGES.tolist()}).status_code == 200
    for parameters, status, message in (({"codes": "int4"}, 400, "codes must be one of float, int8, binary; got 'int4'"),
                                        ({"codes": 8}, 400, "codes must be one of float, int8, binary; got 8")):
        v2 = api.post("/v2/models/digits-mlp/infer", json={"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32",
                                                                       "data": IMAGES[0].ravel().tolist()}], "parameters": parameters})
        assert (v2.status_code, v2.json()) == (status, {"error": message})


@pytest.mark.parametrize("binary_data", [False, True], ids=["json", "binary"])
def test_tritonclient_reads_int8_and_binary_codes(codes_registry, binary_data):
    """A real client of the protocol (tritonclient's HTTP client) takes the INT8 and UINT8 tensors and the extra one."""
    httpclient = pytest.importorskip("tritonclient.http")

    version = codes_registry.load("digits-pca12")
    floats = version.encode(IMAGES)
    with LiveServer(codes_registry, poll_seconds=0) as server:
        client = httpclient.InferenceServerClient(url=f"127.0.0.1:{server.port}")
        try:
            answers = {}
            for form in ("int8", "binary"):
                request = httpclient.InferInput("input", list(IMAGES.shape), "FP32")
                request.set_data_from_numpy(IMAGES, binary_data=binary_data)
                answers[form] = client.infer("digits-pca12", [request], outputs=[httpclient.InferRequestedOutput("code", binary_data=binary_data)],
                                             parameters={"codes": form})
        finally:
            client.close()
    q, bits = answers["int8"].as_numpy("code"), answers["binary"].as_numpy("code")
    assert answers["int8"].get_output("code")["datatype"] == "INT8" and answers["binary"].get_output("code")["datatype"] == "UINT8"
    np.testing.assert_array_equal(answers["int8"].as_numpy("code_scale"), version.code_quantization.scale)
    np.testing.assert_array_equal(answers["binary"].as_numpy("code_threshold"), version.code_quantization.threshold)
    check_agreement(version.code_quantization, floats, q, bits)
