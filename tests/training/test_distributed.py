"""Data-parallel training: two CPU processes (gloo) train one model and publish exactly one version."""
import pytest

from aeserve.cli import main
from aeserve.models.registry import Registry

pytestmark = pytest.mark.slow  # two training processes

QUICK = ["--quiet", "--set", "data.limit=320", "--set", "train.epochs=3", "--set", "train.batch_size=64", "--set", "train.report=false"]


def test_two_processes_publish_one_version_that_matches_one_process(tmp_path):
    single, parallel = Registry(tmp_path / "single"), Registry(tmp_path / "ddp")
    assert main(["train", "configs/digits-mlp8.toml", "--registry", str(single.root), *QUICK]) == 0
    assert main(["train", "configs/digits-mlp8.toml", "--registry", str(parallel.root), "--nproc", "2", *QUICK]) == 0
    assert parallel.versions("digits-mlp8") == [1]
    manifest = parallel.manifest("digits-mlp8")
    assert manifest["training"]["world_size"] == 2
    parallel.load("digits-mlp8")  # a complete, valid version
    # Each rank takes half of every batch and DDP averages the gradients: the same optimisation up to float sums.
    expected = single.manifest("digits-mlp8")["metrics"]["test_sq_err"]
    assert manifest["metrics"]["test_sq_err"] == pytest.approx(expected, rel=1e-3)


def test_nproc_must_be_positive(tmp_path, capsys):
    assert main(["train", "configs/digits-mlp8.toml", "--registry", str(tmp_path), "--nproc", "0"]) == 2
    assert "--nproc must be >= 1, got 0" in capsys.readouterr().err
