"""The images' files, offline: deploy/compose.yaml passes the Compose specification's schema (and the check can fail)
and agrees with the Dockerfile and the server; deploy/container/requirements.py gives each image the lists it should;
the Kubernetes and KServe manifests run the slim image.

Building and running the images is .ci/container's (tests/system/test_container.py).
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from aeserve.service.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "deploy" / "compose.yaml"
REQUIREMENTS = ROOT / "deploy" / "container" / "requirements.py"
DOCKERFILE = ROOT / "Dockerfile"
IMAGE_USER = "10001"


def compose_check(path: Path) -> subprocess.CompletedProcess:
    """check-jsonschema against the Compose specification's schema that it ships (offline)."""
    return subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec", str(path)],
                          capture_output=True, text=True, timeout=60)


def services() -> dict[str, dict]:
    return yaml.safe_load(COMPOSE.read_text())["services"]


def requirements(*args: str) -> list[str]:
    result = subprocess.run([sys.executable, str(REQUIREMENTS), str(ROOT / "pyproject.toml"), *args], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def test_compose_passes_the_compose_schema() -> None:
    result = compose_check(COMPOSE)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("change, expected", [
    (("    read_only: true", "    readonly: true"), "'readonly' was unexpected"),
    (("    cap_drop: [ALL]", "    cap_drop: ALL"), "'ALL' is not of type 'array'"),
], ids=["misspelled key", "wrong type"])
def test_compose_check_rejects_a_bad_file(tmp_path: Path, change: tuple[str, str], expected: str) -> None:
    text = COMPOSE.read_text()
    assert change[0] in text
    bad = tmp_path / "compose.yaml"
    bad.write_text(text.replace(change[0], change[1], 1))
    result = compose_check(bad)
    assert result.returncode == 1 and expected in result.stdout, result.stdout + result.stderr


def test_compose_builds_the_dockerfile_targets() -> None:
    targets = {line.split()[-1] for line in DOCKERFILE.read_text().splitlines() if line.startswith("FROM ")}
    built = {name: service["build"]["target"] for name, service in services().items() if "build" in service}
    assert built == {"serve": "serve", "train": "full"}
    assert set(built.values()) <= targets
    # The last stage is what a plain `docker build .` gives: the full image.
    assert [line for line in DOCKERFILE.read_text().splitlines() if line.startswith("FROM ")][-1] == "FROM runtime AS full"


def test_compose_servers_run_read_only_as_the_image_user() -> None:
    drain = Settings.model_fields["drain_grace_seconds"].default + Settings.model_fields["drain_seconds"].default
    for name in ("serve", "serve-s3"):
        service = services()[name]
        assert (service["user"], service["read_only"], service["tmpfs"], service["cap_drop"]) == (IMAGE_USER, True, ["/tmp"], ["ALL"]), name
        assert service["ports"][0].endswith(":8000"), name  # the images' AESERVE_PORT
        assert float(service["stop_grace_period"].removesuffix("s")) > drain, f"{name}: stopped before the drain ends"
    assert services()["serve"]["volumes"] == ["registry:/registry:ro"]
    assert "registry:/registry" in services()["train"]["volumes"]
    assert f"USER {IMAGE_USER}" in DOCKERFILE.read_text()


def test_requirements_split_the_full_image_around_torch() -> None:
    assert requirements("dependencies", "--only", "torch") == ["torch==2.13.0"]
    rest = requirements("dependencies", "s3", "gcs", "--drop", "torch")
    assert "torch==2.13.0" not in rest and "s3fs>=2024.12" in rest and "gcsfs>=2024.12" in rest
    assert len(rest) == len(requirements("dependencies", "s3", "gcs")) - 1


def test_requirements_of_the_slim_image_leave_torch_and_training_out() -> None:
    names = {line.split(";")[0].split(">")[0].split("=")[0].strip().lower() for line in requirements("serve", "s3", "gcs")}
    assert {"onnxruntime", "fastapi", "uvicorn", "numpy", "s3fs", "gcsfs"} <= names
    assert not names & {"torch", "scikit-learn", "matplotlib", "pyarrow", "opentsne", "onnx", "onnxscript"}


def test_requirements_name_an_unknown_group() -> None:
    result = subprocess.run([sys.executable, str(REQUIREMENTS), str(ROOT / "pyproject.toml"), "serv"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "no group 'serv' in pyproject.toml; there are: dependencies, serve," in result.stderr


@pytest.mark.parametrize("path", ["k8s/deployment.yaml", "kserve/servingruntime.yaml"])
def test_manifests_run_the_slim_image(path: str) -> None:
    text = (ROOT / "deploy" / path).read_text()
    assert "image: aeserve-serve:0.1.0" in text and "image: aeserve:" not in text
