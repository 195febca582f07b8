"""System test: ``pip install ./client`` into a fresh virtual environment brings no torch, and the client installed
there talks to a live server, answering what the model computes in-process."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from aeserve.training.trainer import train
from tests.conftest import digits_run
from tests.servers import LiveServer

CLIENT_SOURCE = Path(__file__).resolve().parents[2] / "client"

# Runs inside the light environment: 10 rows through a client that sends at most 4 per request (the server's limit).
SCRIPT = """
import sys
import numpy as np
from aeserve_client import Client, NotFoundError

url, folder = sys.argv[1], sys.argv[2]
x = np.load(folder + "/inputs.npy")
with Client(url, max_rows=4) as client:
    codes = client.encode("digits-mlp", x)
    back = client.reconstruct("digits-mlp", x)
    try:
        client.encode("nope", x)
        missing = 0
    except NotFoundError as error:
        missing = error.status
np.savez(folder + "/answers.npz", codes=codes.outputs, outputs=back.outputs, errors=back.errors,
         percentiles=back.percentiles, version=int(codes.version), missing=missing)
"""


def run(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    return subprocess.run(args, capture_output=True, text=True, env=env, **kwargs)


@pytest.mark.slow
def test_the_light_client_installs_without_torch_and_answers_like_the_model(registry, tmp_path):
    # The environment: a fresh venv and `pip install ./client`, from a copy so no build files land in the repository.
    shutil.copytree(CLIENT_SOURCE, tmp_path / "client", ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    venv = tmp_path / "venv"
    made = run([sys.executable, "-m", "venv", str(venv)], timeout=300)
    assert made.returncode == 0, made.stderr
    python = str(venv / "bin" / "python")
    installed = run([python, "-m", "pip", "install", "--disable-pip-version-check", "-q", str(tmp_path / "client")], timeout=600)
    assert installed.returncode == 0, installed.stderr
    listed = run([python, "-m", "pip", "list", "--format=freeze", "--disable-pip-version-check"], timeout=120).stdout.lower()
    assert "aeserve-client==" in listed and "httpx==" in listed and "numpy==" in listed
    for absent in ("torch", "aeserve"):
        probe = run([python, "-I", "-c", f"import {absent}"], timeout=60)
        assert probe.returncode != 0 and f"No module named '{absent}'" in probe.stderr

    # The server, and what the model answers in-process.
    train(digits_run("digits-mlp", "mlp"), registry, progress=False)
    version = registry.load("digits-mlp")
    x = (np.random.default_rng(7).random((10, 8, 8)) * 16).astype(np.float32)
    np.save(tmp_path / "inputs.npy", x)
    (tmp_path / "script.py").write_text(SCRIPT)
    with LiveServer(registry, poll_seconds=0, max_rows=4) as live:
        ran = run([python, "-I", str(tmp_path / "script.py"), live.url, str(tmp_path)], timeout=120, cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr

    answers = np.load(tmp_path / "answers.npz")
    outputs, errors, percentiles = version.reconstruct(x)
    assert answers["codes"].shape == (10, 4) and answers["outputs"].shape == (10, 8, 8)
    np.testing.assert_allclose(answers["codes"], version.encode(x), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(answers["outputs"], outputs, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(answers["errors"], errors, rtol=1e-5)
    np.testing.assert_allclose(answers["percentiles"], percentiles, atol=1e-3)
    assert int(answers["version"]) == 1 and int(answers["missing"]) == 404
