"""An image version takes an image file as the body for encode, reconstruct and project, decoded by the rule its
training images went through; other versions, decode and unreadable files get exact errors."""
import io
import json

import numpy as np
import pytest
from PIL import Image

from aeserve.models.images import open_image, to_pixels
from aeserve.models.registry import Registry
from aeserve.training.config import build_run_config
from aeserve.training.trainer import train
from tests.servers import make_client, wait_ready
from tests.training.data.test_images import write_folder


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


def header_only_png(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height RGB pixels, with almost no pixel data: what a decompression bomb
    looks like before it is decoded."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 100)) + chunk(b"IEND", b""))


def test_images_declaring_more_pixels_than_allowed_are_refused_before_decoding(client):
    bomb = client.post("/v1/models/photos/encode", files=[("images", ("ok.png", image_bytes(np.zeros((8, 8), np.uint8), "PNG"))),
                                                          ("images", ("scan.png", header_only_png(13000, 13000)))])
    assert bomb.status_code == 413
    assert bomb.json()["detail"] == ("part 2 ('scan.png') declares 13000x13000 pixels (169.0 megapixels), more than the 25 megapixels "
                                     "an image may have; send it smaller (this version takes 8x8 pixels)")
    # Beyond twice Image.MAX_IMAGE_PIXELS Pillow refuses the header itself, without its width and height.
    huge = client.post("/v1/models/photos/encode", content=header_only_png(30000, 30000), headers={"Content-Type": "image/png"})
    assert huge.status_code == 413
    assert huge.json()["detail"] == ("the body declares 900.0 megapixels, more than the 25 megapixels an image may have; "
                                     "send it smaller (this version takes 8x8 pixels)")
    import base64

    v2 = client.post("/v2/models/photos/infer", json={
        "inputs": [{"name": "input", "shape": [1], "datatype": "BYTES", "data": [base64.b64encode(header_only_png(6000, 5000)).decode()]}]})
    assert v2.status_code == 413 and v2.json()["error"].startswith("element 0 of input 'input' declares 6000x5000 pixels (30.0 megapixels), ")


def test_the_images_of_one_request_share_a_pixel_budget(client, image_registry, monkeypatch):
    from aeserve.service import codec

    monkeypatch.setattr(codec, "MAX_IMAGE_PIXELS", 150)
    monkeypatch.setattr(codec, "MAX_REQUEST_PIXELS", 250)
    files = [("images", (f"{i}.png", image_bytes(np.full((10, 10), 50 * i, np.uint8), "PNG"))) for i in range(3)]
    within = client.post("/v1/models/photos/encode", files=files[:2])
    assert within.status_code == 200, within.text
    over = client.post("/v1/models/photos/encode", files=files)
    assert over.status_code == 413
    assert over.json()["detail"] == ("part 3 ('2.png') declares 10x10 pixels (0.0 megapixels), which brings this request's images to "
                                     "0.0 megapixels, more than the 0.00025 megapixels a request may have; send fewer images a request, "
                                     "or smaller ones (this version takes 8x8 pixels)")


def test_more_images_than_the_row_limit_are_refused_before_any_is_read(image_registry):
    from aeserve.service.api.errors import V1, status_of
    from aeserve.service.codec import decode_images, image_rows
    from aeserve.service.errors import TooManyRows

    manifest = image_registry.load("photos").manifest
    part = b'--xx\r\nContent-Disposition: form-data; name="images"; filename="a.png"\r\n\r\nnot an image\r\n'
    with pytest.raises(TooManyRows) as refused:  # three unreadable parts, and no closing delimiter the parser would refuse
        image_rows(part * 3, manifest, "inputs", "multipart/form-data; boundary=xx", max_rows=2)
    assert (status_of(refused.value, V1), refused.value.message) == (413, "3 rows exceed the limit of 2 rows per request")
    with pytest.raises(TooManyRows) as refused:
        decode_images([b"not an image"] * 3, manifest, ["element 0", "element 1", "element 2"], max_rows=2, where="input 'input': ")
    assert (status_of(refused.value, V1), refused.value.message) == (413, "input 'input': 3 rows exceed the limit of 2 rows per request")
    within = image_rows(part.replace(b"not an image", image_bytes(np.zeros((8, 8), np.uint8), "PNG")) * 2 + b"--xx--\r\n", manifest,
                        "inputs", "multipart/form-data; boundary=xx", max_rows=2)
    assert within.shape == (2, 3, 8, 8) and within.dtype == np.uint8


def test_the_routes_count_images_against_the_row_limit_before_reading_them(image_registry):
    """Three unreadable images to a server taking two rows a request: the row limit answers, not the first image."""
    import base64

    part = b'--xx\r\nContent-Disposition: form-data; name="images"; filename="a.png"\r\n\r\nnot an image\r\n'
    tensor = {"name": "input", "shape": [3], "datatype": "BYTES", "data": [base64.b64encode(b"not an image").decode()] * 3}
    with make_client(image_registry, max_rows=2) as limited:
        wait_ready(limited.get)
        v1 = limited.post("/v1/models/photos/encode", content=part * 3 + b"--xx--\r\n",
                          headers={"Content-Type": "multipart/form-data; boundary=xx"})
        v2 = limited.post("/v2/models/photos/infer", json={"inputs": [tensor]})
    assert (v1.status_code, v1.json()["detail"]) == (413, "3 rows exceed the limit of 2 rows per request")
    assert (v2.status_code, v2.json()["error"]) == (413, "input 'input': 3 rows exceed the limit of 2 rows per request")


@pytest.mark.parametrize("binary", [False, True])
def test_an_empty_bytes_tensor_is_refused_as_no_rows(client, binary):
    tensor = {"name": "input", "shape": [0], "datatype": "BYTES"}
    if binary:
        header = json.dumps({"inputs": [{**tensor, "parameters": {"binary_data_size": 0}}]}).encode()
        answer = client.post("/v2/models/photos/infer", content=header, headers={"Inference-Header-Content-Length": str(len(header))})
    else:
        answer = client.post("/v2/models/photos/infer", json={"inputs": [{**tensor, "data": []}]})
    assert answer.status_code == 400
    assert answer.json()["error"] == "input 'input': inputs must hold at least one row"


def test_a_file_in_no_format_it_takes_is_named_not_the_stream_object(client):
    answer = client.post("/v1/models/photos/encode", files=[("images", ("notes.png", b"hello"))])
    assert answer.status_code == 400
    assert answer.json()["detail"] == "part 1 ('notes.png') is not a readable image (format not recognised); send PNG, JPEG, WebP or BMP files"


@pytest.mark.parametrize("mode,values,key", [("L", [[0, 100]], 0), ("RGB", [[[0, 0, 0], [10, 20, 30]]], (0, 0, 0)),
                                             ("I;16", [[0, 60000]], 0)])
def test_a_single_transparent_colour_is_laid_on_white_as_alpha_is(mode, values, key):
    """A PNG's tRNS colour key (``save(..., transparency=key)``) makes those pixels transparent, as an alpha of 0 does."""
    array = np.asarray(values, np.uint16 if mode == "I;16" else np.uint8)
    image = open_image(image_bytes_with(Image.fromarray(array), transparency=key))
    gray, rgb = to_pixels(image, (1, 2), 1), to_pixels(image, (1, 2), 3)
    kept = {"L": [100, 100, 100], "RGB": [10, 20, 30], "I;16": [233, 233, 233]}[mode]  # 60000 of 65535 is 233 of 255
    np.testing.assert_array_equal(rgb[:, 0, 0], [255, 255, 255])
    np.testing.assert_array_equal(rgb[:, 0, 1], kept)
    assert gray[0, 0] == 255 and gray[0, 1] == round(0.299 * kept[0] + 0.587 * kept[1] + 0.114 * kept[2])


def test_a_transparent_colour_survives_the_exif_orientation():
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees clockwise
    image = open_image(image_bytes_with(Image.fromarray(np.array([[0, 100]], np.uint8)), transparency=0, exif=exif.tobytes()))
    assert image.size == (1, 2)
    np.testing.assert_array_equal(to_pixels(image, (2, 1), 1)[:, 0], [255, 100])


def test_open_image_refuses_above_its_pixel_limit_only_when_given_one():
    """Serving passes a limit; training (open_image(path)) decodes a photo of any size Pillow takes."""
    from aeserve.models.images import ImageTooLarge

    data = image_bytes(np.zeros((100, 120), np.uint8), "PNG")
    assert open_image(data).size == (120, 100) and open_image(data, 12_000).size == (120, 100)
    with pytest.raises(ImageTooLarge) as refused:
        open_image(data, 11_999)
    assert (refused.value.pixels, refused.value.size) == (12_000, (120, 100))


def image_bytes_with(image: Image.Image, **save) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **save)
    return buffer.getvalue()
