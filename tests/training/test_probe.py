"""The linear probe of ``aeserve eval``: codes, PCA codes and inputs as features for a classifier, on the digits."""
import numpy as np
import pytest
import torch

from aeserve.cli import main
from aeserve.models.registry import Registry
from aeserve.training.config import build_run_config
from aeserve.training.data.sources import load_dataset
from aeserve.training.evaluate import PROBE_PER_CLASS, linear_probe, per_class_sample
from aeserve.training.trainer import train


@pytest.fixture(scope="module")
def digits_version(tmp_path_factory):
    """An 8-D MLP on all 1,797 digits (about 160 training rows per class), and its data."""
    registry = Registry(tmp_path_factory.mktemp("probe") / "registry")
    config = build_run_config({"name": "digits-probe", "data": {"source": "digits"}, "model": {"kind": "mlp", "code_dim": 8, "hidden": [64]},
                               "train": {"epochs": 10, "batch_size": 64, "lr": 3e-3, "report": False}})
    train(config, registry, progress=False)
    return registry, registry.load("digits-probe"), load_dataset(config.data)


def test_per_class_sample_takes_exactly_that_many_of_each_class():
    labels = np.repeat(np.arange(5), [150, 100, 120, 30, 101])
    chosen = per_class_sample(labels, 100, seed=0)
    assert np.array_equal(np.bincount(labels[chosen]), [100, 100, 100, 30, 100])  # a class of 30 gives all of its rows
    assert len(np.unique(chosen)) == len(chosen) and np.array_equal(chosen, np.sort(chosen))
    assert np.array_equal(chosen, per_class_sample(labels, 100, seed=0))
    assert not np.array_equal(chosen, per_class_sample(labels, 100, seed=1))


def test_probe_on_digits(digits_version):
    _, version, data = digits_version
    x_train = torch.from_numpy(version.preprocessing.to_model(data.train_x))
    x_test = torch.from_numpy(version.preprocessing.to_model(data.test_x))
    probe = linear_probe(version.model, x_train, data.train_y, x_test, data.test_y)
    counts = np.bincount(data.train_y)
    assert counts.min() > PROBE_PER_CLASS  # so the small set is exactly 100 of each of the 10 classes
    assert probe["rows"] == {"per_class": 10 * PROBE_PER_CLASS, "all": len(data.train_y), "test": len(data.test_y)}
    features = probe["features"]
    assert [(name, f["dims"]) for name, f in features.items()] == [("codes", 8), ("PCA codes", 8), ("inputs", 64)]
    for name, f in features.items():  # chance is 0.1
        assert 0.7 < f["per_class"] <= f["all"] + 0.03, (name, f)
    assert features["inputs"]["all"] > 0.9
    # No labels, or labels that are not classes: no probe.
    assert linear_probe(version.model, x_train, None, x_test, data.test_y) is None
    assert linear_probe(version.model, x_train, data.train_y.astype(float), x_test, data.test_y) is None


def test_eval_prints_the_probe(digits_version, capsys, tmp_path):
    registry, _, _ = digits_version
    assert main(["eval", "digits-probe", "--registry", str(registry.root), "--out", str(tmp_path / "report")]) == 0
    lines = capsys.readouterr().out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("linear probe: logistic regression"))
    assert "lbfgs" in lines[start] and "standardized" in lines[start] and "held-out rows" in lines[start]
    assert lines[start + 1].split()[:2] == ["features", "dims"] and "1,000 rows" in lines[start + 1]
    table = {line[:14].strip(): line[14:].split() for line in lines[start + 2:start + 5]}
    assert list(table) == ["codes", "PCA codes", "inputs"]
    assert all(float(v) > 0.5 for row in table.values() for v in row[1:])
