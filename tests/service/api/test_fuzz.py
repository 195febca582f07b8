"""Schemathesis against a live server holding an MLP, a table and a version of kind rd, with every check: no 5xx,
answers fit the schema, the schema admits exactly what the server accepts, undeclared methods get 405.

One run per model, with its real name and version as the path parameters, so that requests reach the model instead of
404ing. Seeded; a larger run: AESERVE_FUZZ_EXAMPLES=300 pytest tests/service/api/test_fuzz.py -m slow
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from aeserve.models.registry import Registry
from aeserve.training.recipes import recipe_run_config
from aeserve.training.trainer import train
from tests.conftest import digits_run
from tests.servers import LiveServer
from tests.training.data.test_tables import write_penguins

pytestmark = pytest.mark.slow  # four schemathesis runs against a live server: about a minute each

pytest.importorskip("schemathesis")

EXAMPLES = os.environ.get("AESERVE_FUZZ_EXAMPLES", "100")
# An MLP, a table, a table trained with no config (its empty fields filled, a date, columns left out), a version with an
# entropy model (compress, decompress).
MODELS = ("digits-mlp", "rows", "penguins", "digits-rd")
# The checks left out, where JSON Schema cannot say a rule, so that a request the document admits may still be refused:
# positive_data_acceptance only. Each refusal is still checked: a documented 4xx (never 5xx), in the declared form.
LEFT_OUT = {
    # A tensor's data holds the product of its shape's values, in rows of the version's input or code shape.
    "^/v2/models/.*/infer$": "positive_data_acceptance",
    # Which byte strings are streams this version made: a header naming it, then a coded code that must decode.
    "^/v1/models/.*/decompress$": "positive_data_acceptance",
}


def table_run(folder):
    from aeserve.training.config import build_run_config
    from tests.training.data.test_tables import write_csv

    return build_run_config({"name": "rows", "data": {"source": "table", "path": str(write_csv(folder / "rows.csv")), "label": "is_big",
                                                      "categorical": ["colour"]},
                             "model": {"kind": "mlp", "code_dim": 2, "hidden": [16]}, "train": {"epochs": 2, "report": False}})


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz")
    registry = Registry(folder / "registry")
    for run in (digits_run("digits-mlp", "mlp"), table_run(folder), digits_run("digits-rd", "rd")):
        train(run, registry, progress=False)
    config, dataset = recipe_run_config(str(write_penguins(folder / "penguins.csv")), "species", ["train.epochs=2", "train.report=false"])
    train(config, registry, progress=False, dataset=dataset, state_dir=folder / "state")
    with LiveServer(registry, poll_seconds=0) as live:
        yield live


def operations_for(document: dict, name: str, everything_else: bool) -> list[str]:
    """The paths a run for ``name`` tests: those whose ``{name}`` admits it, its own, and (``everything_else``) the
    model-free routes (health, metrics, listings)."""
    paths = []
    for path, item in document["paths"].items():
        names = [p["schema"].get("enum", [name]) for op in item.values() for p in op.get("parameters", []) if p["in"] == "path" and p["name"] == "name"]
        if path.startswith(f"/v1/models/{name}/") or any(name in n for n in names) or (everything_else and not names and "/models/" not in path):
            paths.append(path)
    return paths


def schemathesis(url: str, config: Path, paths: list[str]) -> subprocess.CompletedProcess:
    command = [str(Path(sys.executable).parent / "schemathesis"), "--config-file", str(config), "run", f"{url}/openapi.json",
               "--max-examples", EXAMPLES, "--generation-deterministic", "--no-color", "--workers", "1",
               "--include-path-regex", "^(" + "|".join(re.escape(p) for p in paths) + ")$"]
    return subprocess.run(command, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("name", MODELS)
def test_schemathesis_with_every_check_finds_nothing(server, tmp_path, name):
    document = httpx.get(f"{server.url}/openapi.json").json()
    paths = operations_for(document, name, everything_else=name == MODELS[0])
    # Every check is on unless the config turns it off (the command line's --checks would override these).
    config = tmp_path / "schemathesis.toml"
    config.write_text("\n".join([
        "[parameters]", f'"path.name" = "{name}"', '"path.version" = "1"', '"path.path" = "map/sample.json"',
        *(f'[[operations]]\ninclude-path-regex = "{regex}"\nchecks.{check}.enabled = false' for regex, check in LEFT_OUT.items())]) + "\n")
    result = schemathesis(server.url, config, paths)
    assert result.returncode == 0, result.stdout[-8000:]
    tested = sum(len(document["paths"][p]) for p in paths)
    assert f"Tested: {tested}" in result.stdout, result.stdout[-3000:]
    assert "Examples" in result.stdout and "Coverage" in result.stdout and "Fuzzing" in result.stdout and "Stateful" in result.stdout
