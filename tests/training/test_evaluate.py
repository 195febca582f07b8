"""The held-out error quantiles behind the anomaly percentiles: validation and test rows together, counted."""
import numpy as np
import torch

from aeserve.models.checkpoint import N_QUANTILES
from aeserve.training.config import build_run_config
from aeserve.training.data.sources import load_dataset
from aeserve.training.evaluate import reconstruction_errors
from aeserve.training.trainer import split_validation, train


def test_quantiles_come_from_validation_and_test_rows_at_least_1000_where_the_data_has_them(registry):
    config = build_run_config({"name": "many", "data": {"source": "digits", "val_fraction": 0.4, "test_fraction": 0.4},
                               "model": {"kind": "pca", "code_dim": 4}, "train": {"report": False}})
    train(config, registry, progress=False)
    manifest = registry.manifest("many")
    m = manifest["metrics"]
    # 1,797 digits: 719 test rows, and 431 of the other 1,078 held out for validation.
    assert (m["n_test"], manifest["training"]["n_val"], m["error_quantiles_rows"]) == (719, 431, 1150)

    dataset, model = load_dataset(config.data), registry.load("many").model
    x_all = torch.from_numpy(dataset.preprocessing.to_model(dataset.train_x))
    train_index, val_index = split_validation(len(x_all), config.data.val_fraction, config.train.seed)
    x_test = torch.from_numpy(dataset.preprocessing.to_model(dataset.test_x))
    held_out = np.concatenate([reconstruction_errors(model, x_all[val_index]), reconstruction_errors(model, x_test)])
    levels = np.linspace(0, 1, N_QUANTILES)
    assert len(m["error_quantiles"]) == N_QUANTILES
    np.testing.assert_allclose(m["error_quantiles"], np.quantile(held_out, levels), rtol=1e-12)
    # Neither the test rows alone nor any training row.
    test_only = np.quantile(reconstruction_errors(model, x_test), levels)
    with_training = np.quantile(np.concatenate([held_out, reconstruction_errors(model, x_all[train_index])]), levels)
    assert not np.allclose(m["error_quantiles"], test_only, rtol=1e-3) and not np.allclose(m["error_quantiles"], with_training, rtol=1e-3)
    assert m["val_sq_err"] == float(held_out[:431].mean())


def test_fewer_held_out_rows_are_counted_in_the_manifest(registry):
    train(build_run_config({"name": "few", "data": {"source": "digits", "limit": 400}, "model": {"kind": "pca", "code_dim": 4},
                            "train": {"report": False}}), registry, progress=False)
    m = registry.manifest("few")["metrics"]
    assert m["error_quantiles_rows"] == 40 + 180 == m["n_test"] + registry.manifest("few")["training"]["n_val"]
