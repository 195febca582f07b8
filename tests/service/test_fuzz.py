"""Schemathesis against a live server, with every check: no 5xx, answers fit the schema, the schema admits exactly
what the server accepts, undeclared methods get 405.

Seeded and bounded for CI; a larger run: AESERVE_FUZZ_EXAMPLES=300 pytest tests/service/test_fuzz.py
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from aeserve.models.registry import Registry
from aeserve.training.trainer import train
from tests.conftest import digits_run
from tests.service.conftest import LiveServer

pytestmark = pytest.mark.slow  # two schemathesis runs against a live server

pytest.importorskip("schemathesis")

EXAMPLES = os.environ.get("AESERVE_FUZZ_EXAMPLES", "25")
# JSON Schema cannot tie an Open Inference Protocol tensor's data length to its shape, so the two data-acceptance
# checks cannot hold for v2 inference; every other check runs there too.
V2_INFER = "^/v2/models/.*/infer$"


def schemathesis(url: str, *options: str) -> subprocess.CompletedProcess:
    command = [str(Path(sys.executable).parent / "schemathesis"), "run", f"{url}/openapi.json", "--checks", "all",
               "--max-examples", EXAMPLES, "--generation-deterministic", "--no-color", "--workers", "1", *options]
    return subprocess.run(command, capture_output=True, text=True, timeout=600)


def table_run(folder):
    from aeserve.training.config import build_run_config
    from tests.training.test_tables import write_csv

    return build_run_config({"name": "rows", "data": {"source": "table", "path": str(write_csv(folder / "rows.csv")), "label": "is_big",
                                                      "categorical": ["colour"]},
                             "model": {"kind": "mlp", "code_dim": 2, "hidden": [16]}, "train": {"epochs": 2, "report": False}})


@pytest.mark.parametrize("data", ["digits", "table"])
def test_schemathesis_with_every_check_finds_nothing(tmp_path, data):
    registry = Registry(tmp_path / "registry")
    train(digits_run("digits-pca", "pca") if data == "digits" else table_run(tmp_path), registry, progress=False)
    with LiveServer(registry, poll_seconds=0) as server:  # one loaded model: the schema's names and versions are real
        everything_else = schemathesis(server.url, "--exclude-path-regex", V2_INFER)
        assert everything_else.returncode == 0, everything_else.stdout[-6000:]
        assert "API Operations:" in everything_else.stdout and "Tested: 23" in everything_else.stdout, everything_else.stdout[-3000:]
        v2_infer = schemathesis(server.url, "--include-path-regex", V2_INFER,
                                "--exclude-checks", "positive_data_acceptance,negative_data_rejection")
        assert v2_infer.returncode == 0, v2_infer.stdout[-6000:]
        assert "Tested: 2" in v2_infer.stdout, v2_infer.stdout[-3000:]
