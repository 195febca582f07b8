"""Training: deterministic weights, honest metrics, configs from TOML with overrides."""
import glob
from pathlib import Path

import numpy as np
import pytest

from aeserve.models.registry import Registry
from aeserve.training.config import build_run_config, load_run_config, parse_override
from aeserve.training.data.dataset import DataError
from aeserve.training.trainer import train
from tests.conftest import digits_run


def test_same_seed_gives_same_weights_sha256(tmp_path):
    a, b = Registry(tmp_path / "a"), Registry(tmp_path / "b")
    for registry in (a, b):
        train(digits_run("m", "mlp", epochs=2), registry, progress=False)
    assert a.manifest("m")["sha256"] == b.manifest("m")["sha256"]
    train(digits_run("m", "mlp", epochs=2, seed=1), b, progress=False)
    assert b.manifest("m", 2)["sha256"] != a.manifest("m")["sha256"]


def test_metrics_compare_with_closed_form_pca(tmp_path):
    registry = Registry(tmp_path)
    train(digits_run("pca", "pca"), registry, progress=False)
    m = registry.manifest("pca")["metrics"]
    # A PCA model's own error is the PCA baseline at the same code size.
    assert m["test_sq_err"] == pytest.approx(m["pca_sq_err"], rel=1e-5)
    assert m["test_mse"] == pytest.approx(m["test_sq_err"] / 64)
    q = np.asarray(m["error_quantiles"])
    assert len(q) == 1001 and np.all(np.diff(q) >= 0)


def test_mlp_training_lowers_validation_error(tmp_path):
    registry = Registry(tmp_path)
    train(digits_run("mlp", "mlp", epochs=15), registry, progress=False)
    history = registry.manifest("mlp")["training"]["history"]
    assert len(history) == 15
    assert history[-1]["val_sq_err"] < 0.7 * history[0]["val_sq_err"]
    assert history[-1]["train_loss"] < history[0]["train_loss"]


def test_trains_on_fashion_mnist_idx_files(fmnist_dir, tmp_path):
    registry = Registry(tmp_path / "registry")
    config = load_run_config("configs/fmnist-mlp30.toml", [f"data.path={fmnist_dir}", "train.epochs=1", "model.hidden=[16]"])
    version = train(config, registry, progress=False)
    manifest = registry.manifest("fmnist-mlp30", version)
    assert manifest["input_shape"] == [28, 28] and manifest["code_dim"] == 30
    assert manifest["training"]["n_train"] == 180 and manifest["metrics"]["n_test"] == 50


def test_overrides_are_typed():
    assert parse_override("train.epochs=5") == (["train", "epochs"], 5)
    assert parse_override("train.lr=1e-3") == (["train", "lr"], 1e-3)
    assert parse_override("model.hidden=[8, 4]") == (["model", "hidden"], [8, 4])
    assert parse_override("data.path=/tmp/x") == (["data", "path"], "/tmp/x")
    with pytest.raises(ValueError, match="--set expects section.key=value, got 'epochs'"):
        parse_override("epochs")


def test_config_errors_name_the_bad_value():
    with pytest.raises(ValueError, match="train.epochs must be >= 0, got -1"):
        load_run_config("configs/digits-mlp8.toml", ["train.epochs=-1"])
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['train.epoch'\]; allowed: \['batch_size', 'epochs', 'lr', 'patience', "
                                         r"'pca_fallback', 'report', 'schedule', "):
        load_run_config("configs/digits-mlp8.toml", ["train.epoch=1"])
    with pytest.raises(ValueError, match="model.kind 'cnn' is not one of"):
        load_run_config("configs/digits-mlp8.toml", ["model.kind=cnn"])
    with pytest.raises(ValueError, match="nope.toml: config file not found"):
        load_run_config("nope.toml")


def test_map_metrics_are_measured_for_labelled_data(trained_registry):
    metrics = trained_registry.manifest("digits-mlp")["metrics"]
    assert 0.5 < metrics["map_trustworthiness"] <= 1
    assert 0.1 < metrics["map_knn5_accuracy"] <= 1  # ten digit classes: chance is 0.1


def test_map_metrics_on_a_perfect_and_a_useless_map():
    from aeserve.training.evaluate import map_metrics

    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 30)
    centres = np.array([[0, 0], [10, 0], [0, 10]], np.float32)
    coords = centres[labels] + rng.normal(scale=0.1, size=(90, 2)).astype(np.float32)
    perfect = map_metrics(coords, labels, coords, coords, labels)
    assert perfect["map_knn5_accuracy"] == 1.0 and perfect["map_trustworthiness"] == pytest.approx(1.0)
    shuffled = map_metrics(coords, labels, coords, coords[rng.permutation(90)], labels)
    assert shuffled["map_knn5_accuracy"] < 0.6 and shuffled["map_trustworthiness"] < 0.7


@pytest.mark.parametrize("n", [7, 10, 11, 30])
def test_map_metrics_on_few_held_out_rows(n):
    """A table of 70-110 rows holds out 7-11: trustworthiness (k=5) needs 11 or more, and is left out below that."""
    from aeserve.training.evaluate import map_metrics

    rng = np.random.default_rng(0)
    inputs, labels = rng.random((n, 4)).astype(np.float32), np.arange(n) % 2
    metrics = map_metrics(inputs[:, :2], labels, inputs, inputs[:, :2], labels)
    assert ("map_trustworthiness" in metrics) == (n > 10) and 0 <= metrics["map_knn5_accuracy"] <= 1


def test_a_run_with_nothing_held_out_is_refused_before_training(registry):
    run = build_run_config({"name": "none-held-out", "data": {"source": "digits", "limit": 400, "test_fraction": 0},
                            "model": {"kind": "pca", "code_dim": 4}, "train": {"epochs": 1}})
    with pytest.raises(DataError, match="no rows are held out for testing"):
        train(run, registry, progress=False)
    assert registry.names() == []


@pytest.mark.parametrize("path", sorted(glob.glob("configs/*.toml")))
def test_shipped_configs_are_valid(path):
    assert load_run_config(path).name == Path(path).stem


def test_progress_bars_only_on_a_terminal_elsewhere_one_line_per_epoch(capsys, monkeypatch):
    import sys

    import torch

    from aeserve.models.kinds import build_model
    from aeserve.training.trainer import fit

    config = digits_run("bars", "mlp", epochs=2)
    x = torch.rand(200, 64)

    def trained_output(terminal: bool) -> str:
        monkeypatch.setattr(sys.stderr, "isatty", lambda: terminal)
        fit(build_model("mlp", config.model, (8, 8)), x[:160], x[160:], config, progress=True)
        return capsys.readouterr().err

    lines = trained_output(False).splitlines()
    assert [line.split("  ")[0] for line in lines] == ["epoch 1/2", "epoch 2/2"]
    assert all(line.split("  ")[1].startswith("train_loss ") and "\r" not in line for line in lines)
    on_terminal = trained_output(True)
    assert "\r" in on_terminal and "it/s" in on_terminal  # the bar, redrawn in place
    assert "epoch 1/2  train_loss " in on_terminal and "epoch 2/2  train_loss " in on_terminal


def test_time_left_is_the_mean_epoch_times_the_epochs_left():
    from aeserve.training.trainer import time_left

    assert time_left(30.0, 3, 4) == "  about 40 s left"
    assert time_left(60.0, 2, 10) == "  about 5 min left"
    assert time_left(60.0, 2, 0) == ""


def test_bad_data_writes_no_registry_entry(tmp_path):
    (tmp_path / "ragged.csv").write_text("1,2\n3\n")
    registry = Registry(tmp_path / "registry")
    config = build_run_config({"name": "x", "data": {"source": "csv", "path": str(tmp_path / "ragged.csv")}, "model": {"kind": "pca", "code_dim": 1}})
    with pytest.raises(DataError):
        train(config, registry, progress=False)
    assert registry.names() == [] and not (registry.root / "x").exists()
