"""The images that .ci/container builds: a version trained inside the full image from its own working directory, then
served by each image as uid 10001 on a read-only root filesystem with the registry mounted read-only. Readiness, encode
and reconstruct (against the same version run in this process), the image's HEALTHCHECK, and SIGTERM: readiness goes
503 while requests are still answered, then the container exits 0.

Runs where the images are named: AESERVE_TEST_IMAGE (the full image) and AESERVE_TEST_SERVE_IMAGE (the slim `serve`
target). .ci/container builds them and runs this file with ``-s``, which shows each image's size and start-to-ready
time.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import httpx
import numpy as np
import pytest

from aeserve.models.registry import Registry
from tests.containers import Container, image_size_mb, train_in
from tests.servers import wait_until

ROOT = Path(__file__).resolve().parents[2]
IMAGES = {target: image for target, image in (("full", os.environ.get("AESERVE_TEST_IMAGE")),
                                              ("serve", os.environ.get("AESERVE_TEST_SERVE_IMAGE"))) if image}
IMAGE_USER = 10001
MODEL = "digits-mlp8"
DRAIN_GRACE = 5  # seconds of readiness 503 after SIGTERM, while requests are still answered: room for a busy machine

pytestmark = [pytest.mark.slow, pytest.mark.skipif("full" not in IMAGES, reason="no image named in AESERVE_TEST_IMAGE; .ci/container builds "
                                                   "the images and runs this file")]


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """digits-mlp8 for three epochs, trained inside the full image into a registry its user may write."""
    root = tmp_path_factory.mktemp("registry")
    os.chown(root, IMAGE_USER, 0)
    result = train_in(IMAGES["full"], root, ROOT / "configs" / f"{MODEL}.toml", "--set", "train.epochs=3")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert f"published {MODEL}:1 in /registry" in result.stdout + result.stderr
    return root


def test_training_in_the_image_publishes_a_version(registry: Path) -> None:
    manifest = json.loads((registry / MODEL / "1" / "manifest.json").read_text())
    assert (manifest["name"], manifest["version"], manifest["training"]["epochs_run"]) == (MODEL, 1, 3)
    assert (registry / MODEL / "1" / "weights.safetensors").stat().st_uid == IMAGE_USER


@pytest.mark.parametrize("target", sorted(IMAGES))
def test_image_serves_a_read_only_registry_and_drains(target: str, registry: Path) -> None:
    image = IMAGES[target]
    rows = np.random.default_rng(0).integers(0, 17, size=(5, 64)).astype(np.float32)  # digits: 8x8 pixels, 0..16
    version = Registry(registry).load(MODEL)
    codes = version.encode(rows.reshape(5, 8, 8))
    reconstructions, errors, _ = version.reconstruct(rows.reshape(5, 8, 8))
    run_args = ("--read-only", "--user", str(IMAGE_USER), "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
                "-v", f"{registry}:/registry:ro", "-e", f"AESERVE_DRAIN_GRACE_SECONDS={DRAIN_GRACE}")
    with Container(image, *run_args) as container, httpx.Client(base_url=container.url, timeout=30) as client:
        seconds = container.start()
        assert client.get("/health/ready").json() == {"status": "ready", "models": [MODEL]}

        encoded = client.post(f"/v1/models/{MODEL}/encode", json={"inputs": rows.tolist()})
        assert encoded.status_code == 200, encoded.text
        assert (encoded.json()["model"], encoded.json()["version"]) == (MODEL, "1")
        np.testing.assert_allclose(encoded.json()["outputs"], codes, rtol=1e-4, atol=1e-5)

        reconstructed = client.post(f"/v1/models/{MODEL}/reconstruct", json={"inputs": rows.tolist()})
        assert reconstructed.status_code == 200, reconstructed.text
        np.testing.assert_allclose(reconstructed.json()["outputs"], reconstructions.reshape(5, 64), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(reconstructed.json()["errors"], errors, rtol=1e-4)

        health = container.healthcheck()
        assert health.returncode == 0, health.stdout + health.stderr

        container.signal("TERM")
        wait_until(lambda: client.get("/health/ready").status_code == 503, DRAIN_GRACE, "readiness 503 after SIGTERM")
        assert client.post(f"/v1/models/{MODEL}/encode", json={"inputs": rows.tolist()}).status_code == 200
        status = container.wait(DRAIN_GRACE + 30)
        assert status == 0, container.output()[-4000:]
    print(f"\n{target} image {image}: {image_size_mb(image):.0f} MB, start to ready {seconds:.2f} s")
