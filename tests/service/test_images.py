"""An image version takes an image file as the body for encode, reconstruct and project, decoded by the rule its
training images went through; other versions, decode and unreadable files get exact errors."""
import io

import numpy as np
import pytest
from PIL import Image

from aeserve.models.images import open_image, to_pixels
from aeserve.models.registry import Registry
from aeserve.training.config import build_run_config
from aeserve.training.trainer import train
from tests.service.conftest import make_client, wait_ready
from tests.training.test_images import write_folder


@pytest.fixture(scope="module")
def image_registry(tmp_path_factory) -> Registry:
    folder = tmp_path_factory.mktemp("images")
    registry = Registry(folder / "registry")
    run = build_run_config({"name": "photos", "data": {"source": "images", "path": str(write_folder(folder / "photos")), "image_size": [8, 8]},
                            "model": {"kind": "conv", "code_dim": 2, "channels": [4]}, "train": {"epochs": 1, "batch_size": 4, "report": False}})
    train(run, registry, progress=False)
    return registry


def image_bytes(array: np.ndarray, format: str, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode).save(buffer, format=format)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def client(image_registry):
    with make_client(image_registry) as client:
        wait_ready(client.get)
        yield client


@pytest.mark.parametrize("format,media,shape", [("PNG", "image/png", (10, 12, 3)), ("JPEG", "image/jpeg", (8, 8, 3)),
                                                ("WEBP", "image/webp", (16, 16)), ("BMP", "image/bmp", (8, 8, 3))])
def test_an_image_body_is_decoded_as_the_training_images_were(client, image_registry, format, media, shape):
    body = image_bytes(np.random.default_rng(3).integers(0, 256, shape, dtype=np.uint8), format)
    pixels = to_pixels(open_image(body), (8, 8), 3)[None]  # another size centre-cropped and resized; gray to three channels
    version = image_registry.load("photos")
    encoded = client.post("/v1/models/photos/encode", content=body, headers={"Content-Type": media})
    assert encoded.status_code == 200, encoded.text
    np.testing.assert_allclose(encoded.json()["outputs"], version.encode(pixels), rtol=1e-4, atol=1e-5)
    answer = client.post("/v1/models/photos/reconstruct", content=body, headers={"Content-Type": media}).json()
    recon, errors, percentiles = version.reconstruct(pixels)
    assert np.asarray(answer["outputs"]).shape == (1, 3, 8, 8)
    np.testing.assert_allclose(answer["outputs"], recon, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(answer["errors"], errors, rtol=1e-4)
    np.testing.assert_allclose(answer["percentiles"], percentiles, rtol=1e-4, atol=1e-4)
    projected = client.post("/v1/models/photos/versions/1/project", content=body, headers={"Content-Type": media})
    np.testing.assert_allclose(projected.json()["outputs"], version.project(pixels), rtol=1e-4, atol=1e-5)


def test_an_image_body_answers_npy_when_asked(client, image_registry):
    body = image_bytes(np.full((8, 8, 4), 200, np.uint8), "PNG", "RGBA")  # alpha 200: laid on white, 200 * 200/255 + 55 = 212
    answer = client.post("/v1/models/photos/encode", content=body, headers={"Content-Type": "image/png", "Accept": "application/x-npy"})
    assert answer.headers["content-type"] == "application/x-npy" and answer.headers["x-model-version"] == "1"
    np.testing.assert_allclose(np.load(io.BytesIO(answer.content)), image_registry.load("photos").encode(np.full((1, 3, 8, 8), 212.0)),
                               rtol=1e-4, atol=1e-5)


def test_image_bodies_that_cannot_be_taken_get_exact_errors(client, trained_registry):
    png = image_bytes(np.zeros((8, 8), np.uint8), "PNG")
    broken = client.post("/v1/models/photos/encode", content=b"\x89PNG\r\n\x1a\nbroken", headers={"Content-Type": "image/png"})
    assert broken.status_code == 400
    assert broken.json()["detail"].startswith("the body is not a readable image (") and "send PNG, JPEG, WebP or BMP files" in broken.json()["detail"]
    codes = client.post("/v1/models/photos/decode", content=png, headers={"Content-Type": "image/png"})
    assert codes.status_code == 415
    assert codes.json()["detail"] == "this operation takes codes, not an image; send application/json or application/x-npy"
    gif = client.post("/v1/models/photos/encode", content=b"GIF89a", headers={"Content-Type": "image/gif"})
    assert gif.status_code == 415
    assert gif.json()["detail"] == ("unsupported Content-Type 'image/gif'; send application/json or application/x-npy, or to a version "
                                    "trained on images one image as image/png, image/jpeg, image/webp, image/bmp")
    with make_client(trained_registry) as digits:
        wait_ready(digits.get)
        name = digits.get("/v1/models").json()["models"][0]["name"]
        other = digits.post(f"/v1/models/{name}/encode", content=png, headers={"Content-Type": "image/png"})
    assert other.status_code == 415
    assert other.json()["detail"] == ("this version takes application/json or application/x-npy; image bodies are for versions trained "
                                      "on an image folder (data.source = 'images')")


def test_the_openapi_document_admits_image_bodies_where_an_image_version_is_loaded(client):
    paths = client.get("/openapi.json").json()["paths"]
    assert set(paths["/v1/models/{name}/encode"]["post"]["requestBody"]["content"]) == {
        "application/json", "image/png", "image/jpeg", "image/webp", "image/bmp", "multipart/form-data"}
    assert set(paths["/v1/models/{name}/decode"]["post"]["requestBody"]["content"]) == {"application/json"}


def test_several_images_as_multipart_form_data_are_rows_in_order(client, image_registry):
    rng = np.random.default_rng(5)
    arrays = [rng.integers(0, 256, shape, dtype=np.uint8) for shape in ((8, 8, 3), (12, 10, 3), (8, 8))]
    files = [image_bytes(a, f) for a, f in zip(arrays, ("PNG", "JPEG", "WEBP"), strict=True)]
    pixels = np.stack([to_pixels(open_image(f), (8, 8), 3) for f in files])
    version = image_registry.load("photos")
    answer = client.post("/v1/models/photos/reconstruct", files=[("images", (f"{i}.img", f)) for i, f in enumerate(files)])
    assert answer.status_code == 200, answer.text
    np.testing.assert_allclose(answer.json()["errors"], version.reconstruct(pixels)[1], rtol=1e-4)
    encoded = client.post("/v1/models/photos/encode", files=[("images", ("a.png", files[0])), ("images", ("b.png", files[1]))])
    np.testing.assert_allclose(encoded.json()["outputs"], version.encode(pixels[:2]), rtol=1e-4, atol=1e-5)

    broken = client.post("/v1/models/photos/encode", files=[("images", ("ok.png", files[0])), ("images", ("shoe.png", b"\x89PNG broken"))])
    assert broken.status_code == 400 and broken.json()["detail"].startswith("part 2 ('shoe.png') is not a readable image (")
    no_parts = client.post("/v1/models/photos/encode", content=b"nothing", headers={"Content-Type": "multipart/form-data; boundary=xyz"})
    assert no_parts.status_code == 400 and "no parts" in no_parts.json()["detail"]


def test_image_files_as_a_bytes_tensor_on_the_open_inference_protocol(client, image_registry):
    import base64

    files = [image_bytes(np.full((8, 8, 3), v, np.uint8), "PNG") for v in (10, 200)]
    pixels = np.stack([to_pixels(open_image(f), (8, 8), 3) for f in files])
    answer = client.post("/v2/models/photos/infer", json={
        "inputs": [{"name": "input", "shape": [2], "datatype": "BYTES", "data": [base64.b64encode(f).decode() for f in files]}],
        "outputs": [{"name": "code"}]})
    assert answer.status_code == 200, answer.text
    np.testing.assert_allclose(np.reshape(answer.json()["outputs"][0]["data"], (2, -1)), image_registry.load("photos").encode(pixels),
                               rtol=1e-4, atol=1e-5)
    bad = client.post("/v2/models/photos/infer", json={"inputs": [{"name": "input", "shape": [1], "datatype": "BYTES", "data": ["AAAA"]}]})
    assert bad.status_code == 400 and bad.json()["error"].startswith("element 0 of input 'input' is not a readable image")
