"""Training: deterministic weights, honest metrics, configs from TOML with overrides."""
import numpy as np
import pytest

from models.registry import Registry
from tests.conftest import digits_run
from training.config import load_run_config, parse_override
from training.trainer import train


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
    with pytest.raises(ValueError, match=r"unknown TrainParams key\(s\) \['epoch'\]"):
        load_run_config("configs/digits-mlp8.toml", ["train.epoch=1"])
    with pytest.raises(ValueError, match="model.kind 'cnn' is not one of"):
        load_run_config("configs/digits-mlp8.toml", ["model.kind=cnn"])
    with pytest.raises(ValueError, match="nope.toml: config file not found"):
        load_run_config("nope.toml")
