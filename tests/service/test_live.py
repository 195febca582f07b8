"""A real uvicorn server on loopback, driven by the Python client (sync and async)."""
import io
import time

import httpx
import numpy as np
import pytest

from aeserve.service.client import AeserveError, AsyncClient, Client
from aeserve.service.operations import OPERATIONS
from aeserve.training.trainer import train
from tests.conftest import KIND_CONFIGS, digits_run
from tests.servers import DEVICE, LiveServer, Traffic, wait_for_metric

IMAGES = (np.random.default_rng(1).random((6, 8, 8)) * 16).astype(np.float32)


@pytest.fixture
def live(service_registry):
    with LiveServer(service_registry, poll_seconds=0.1) as server:
        yield server


def test_client_round_trip(live, service_registry):
    version = service_registry.load("digits-mlp")
    with Client(live.url) as client:
        assert client.ready()
        assert [m["name"] for m in client.models()] == sorted(f"digits-{kind}" for kind in KIND_CONFIGS)
        codes = client.encode("digits-mlp", IMAGES)
        assert (codes.model, codes.version) == ("digits-mlp", "1")
        np.testing.assert_allclose(codes.outputs, version.encode(IMAGES), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(client.decode("digits-mlp", codes.outputs).outputs, version.decode(codes.outputs), atol=1e-4)
        recon = client.reconstruct("digits-mlp", IMAGES, version=1)
        _, errors, percentiles = version.reconstruct(IMAGES)
        np.testing.assert_allclose(recon.errors, errors, rtol=1e-5)
        np.testing.assert_allclose(recon.percentiles, percentiles, atol=1e-3)
        assert client.project("digits-mlp", IMAGES, version="latest").outputs.shape == (6, 2)
        assert client.manifest("digits-mlp")["kind"] == "mlp"
        with pytest.raises(AeserveError) as error:
            client.encode("digits-mlp", np.zeros((2, 5)))
        assert error.value.status == 422 and "each row must be 64 numbers" in error.value.detail
        with pytest.raises(AeserveError) as error:
            client.encode("nope", IMAGES)
        assert error.value.status == 404


def test_a_big_npy_request_over_real_http(live, service_registry):
    """A 1.28 MB .npy body arrives in many messages: every row is answered in order, as the model answers it, and a
    NaN far into the body is refused by its row number."""
    version = service_registry.load("digits-mlp")
    many = (np.random.default_rng(2).random((5000, 64)) * 16).astype(np.float32)  # 1.28 MB
    with Client(live.url) as client:
        np.testing.assert_allclose(client.encode("digits-mlp", many).outputs, version.encode(many), rtol=1e-5, atol=1e-5)
        recon = client.reconstruct("digits-mlp", many)
        np.testing.assert_allclose(recon.errors, version.reconstruct(many)[1], rtol=1e-5)
        many[4321, 7] = np.nan
        with pytest.raises(AeserveError) as error:
            client.encode("digits-mlp", many)
        assert error.value.status == 422 and error.value.detail.startswith("row 4321 holds a NaN")


def test_small_integers_cross_as_they_are_and_answer_as_float32(live, service_registry):
    from aeserve_client.wire import NpyBody

    def sent(array):
        return np.load(io.BytesIO(b"".join(NpyBody(array))))

    pixels = np.random.default_rng(3).integers(0, 17, size=(7, 8, 8), dtype=np.uint8)
    assert sent(pixels).dtype == np.uint8  # a quarter of the float32 body
    assert sent(pixels.astype(np.int64)).dtype == np.float32
    assert sent(pixels.astype(np.float64)).dtype == np.float32
    assert sent(pixels.astype(bool)).dtype == np.float32
    version = service_registry.load("digits-mlp")
    with Client(live.url) as client:
        for sent in (pixels, pixels.astype(np.int16), pixels.astype(np.float16)):
            np.testing.assert_array_equal(client.encode("digits-mlp", sent).outputs,
                                          client.encode("digits-mlp", pixels.astype(np.float32)).outputs)
        np.testing.assert_allclose(client.encode("digits-mlp", pixels).outputs, version.encode(pixels.astype(np.float32)),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(5000, 64), (3, 8, 8), (0, 64)])
async def test_the_client_sends_what_np_save_writes_with_its_length(shape):
    """The client sends the array's memory in pieces (no copy of a big batch before the socket); the server must
    still see one .npy body, as np.save writes it, with a Content-Length and no chunked framing, sync and async."""
    from aeserve_client.wire import PIECE_BYTES

    array = np.random.default_rng(4).random(shape)  # float64: crosses as float32
    expected = io.BytesIO()
    np.save(expected, array.astype(np.float32))
    seen = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append((request.headers, request.content))
        return httpx.Response(200, content=expected.getvalue(), headers={"Content-Type": "application/x-npy"})

    with Client("http://test", transport=httpx.MockTransport(answer)) as client:
        np.testing.assert_array_equal(client.encode("m", array).outputs, array.astype(np.float32))
    async with AsyncClient("http://test", transport=httpx.MockTransport(answer)) as client:
        np.testing.assert_array_equal((await client.encode("m", array)).outputs, array.astype(np.float32))
    for headers, content in seen:
        assert content == expected.getvalue()
        assert headers["Content-Length"] == str(len(content)) and "Transfer-Encoding" not in headers
    assert (len(expected.getvalue()) > 4 * PIECE_BYTES) == (shape[0] == 5000)  # the first shape spans many pieces


async def test_the_client_learns_the_servers_row_limit(service_registry, monkeypatch):
    """Behind AESERVE_MAX_ROWS=100, a client built with no options encodes 250 rows: the server's 413 names its limit
    (X-Max-Rows), and the client sends the rows again in slices of 100, sync and async."""
    monkeypatch.setenv("AESERVE_MAX_ROWS", "100")
    version = service_registry.load("digits-mlp")
    rows = (np.random.default_rng(5).random((250, 64)) * 16).astype(np.float32)
    one_by_one = np.concatenate([version.encode(row[None]) for row in rows])
    with LiveServer(service_registry, poll_seconds=0, models="digits-mlp") as server:
        refused = httpx.post(f"{server.url}/v1/models/digits-mlp/encode", json={"inputs": rows.tolist()})
        assert (refused.status_code, refused.headers["X-Max-Rows"]) == (413, "100")
        assert refused.json() == {"detail": "250 rows exceed the limit of 100 rows per request"}
        with Client(server.url) as client:
            codes = client.encode("digits-mlp", rows)
        async with AsyncClient(server.url) as client:
            async_codes = await client.encode("digits-mlp", rows)
    for result in (codes, async_codes):
        assert (result.model, result.version) == ("digits-mlp", "1")
        np.testing.assert_allclose(result.outputs, one_by_one, rtol=1e-5, atol=1e-5)


async def test_async_client(live, service_registry):
    expected = service_registry.load("digits-pca").project(IMAGES)
    async with AsyncClient(live.url) as client:
        result = await client.project("digits-pca", IMAGES)
        np.testing.assert_allclose(result.outputs, expected, rtol=1e-5, atol=1e-5)
        assert result.version == "1"
        many = (np.random.default_rng(2).random((5000, 64)) * 16).astype(np.float32)  # 1.28 MB, many pieces
        np.testing.assert_allclose((await client.encode("digits-pca", many)).outputs,
                                   service_registry.load("digits-pca").encode(many), rtol=1e-5, atol=1e-5)


def test_hot_reload_while_requests_flow(live, service_registry):
    """A version published mid-traffic is picked up without a restart; no request fails."""
    with Traffic(live.url, "digits-mlp", IMAGES[:2]) as traffic:
        train(digits_run("digits-mlp", "mlp", epochs=1), service_registry, progress=False)
        with Client(live.url) as client:
            for _ in range(200):
                if client.encode("digits-mlp", IMAGES[:1]).version == "2":
                    break
                time.sleep(0.05)
        settled = traffic.versions_after_settling()
    assert traffic.failures == []
    assert traffic.versions[0] == "1" and "2" in traffic.versions
    assert settled == {"2"}  # once switched, answers stay on the new version


@pytest.mark.slow
@pytest.mark.skipif(DEVICE != "cpu", reason="the engine process serves the CPU only")
def test_hot_reload_into_the_engine_process_while_requests_flow(service_registry):
    """With the engine process: a version published mid-traffic serves on torch, then moves into the child once
    exported, and no request fails on the way; the version before stays in the child."""
    with LiveServer(service_registry, engine="onnx", models="digits-mlp", poll_seconds=0.1) as server:
        get, deadline = (lambda path: httpx.get(server.url + path)), time.monotonic() + 240
        wait_for_metric(get, "aeserve_engine_process_versions 1.0", deadline)
        with Traffic(server.url, "digits-mlp", IMAGES[:2]) as traffic:
            train(digits_run("digits-mlp", "mlp", epochs=1), service_registry, progress=False)
            wait_for_metric(get, "aeserve_engine_process_versions 2.0", deadline)
            settled = traffic.versions_after_settling()
        store, process = server.app.state.store, server.app.state.engines.process
        assert all(process.serves(store.get("digits-mlp", ref), OPERATIONS["encode"].call) for ref in ("1", "2"))  # both in the child
    assert traffic.failures == []
    assert traffic.versions[0] == "1" and settled == {"2"}
