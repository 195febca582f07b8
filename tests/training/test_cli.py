"""The aeserve command line on small data: train, models, alias, eval."""
import pytest

from aeserve.cli import main
from aeserve.models.registry import Registry


def test_train_models_alias_eval(tmp_path, capsys):
    reg = str(tmp_path / "registry")
    quick = ["--registry", reg, "--quiet", "--set", "data.limit=300", "--set", "train.epochs=2"]
    assert main(["train", "configs/digits-mlp8.toml", *quick]) == 0
    assert main(["train", "configs/digits-mlp8.toml", *quick, "--name", "other", "--seed", "3"]) == 0
    assert main(["train", "configs/digits-mlp8.toml", *quick]) == 0
    captured = capsys.readouterr()
    out = captured.out
    assert "published digits-mlp8:1" in out and "published other:1" in out and "published digits-mlp8:2" in out
    # A config's kind is left alone; two epochs of an MLP are worse than closed-form PCA, and the summary says so.
    assert captured.err.count("is worse than closed-form PCA with the same code size on held-out data") == 3
    assert "WARNING: digits-mlp8:2 (kind mlp) is worse than closed-form PCA" in captured.err

    assert main(["alias", "digits-mlp8", "1", "prod", "--registry", reg]) == 0
    assert "digits-mlp8: prod -> 1" in capsys.readouterr().out

    assert main(["models", "--registry", reg]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["name", "version", "kind"]
    rows = [line.split() for line in lines[1:]]
    assert [(r[0], r[1], r[2], r[-1]) for r in rows] == [
        ("digits-mlp8", "1", "mlp", "prod"), ("digits-mlp8", "2", "mlp", "latest"), ("other", "1", "mlp", "latest")]

    assert main(["eval", "digits-mlp8:prod", "--registry", reg]) == 0
    out = capsys.readouterr().out
    stored = float(next(line for line in out.splitlines() if "test_sq_err (stored)" in line).split()[-1])
    measured = float(next(line for line in out.splitlines() if "test_sq_err (re-measured)" in line).split()[-1])
    assert measured == stored


def test_user_errors_exit_2_with_one_line(tmp_path, capsys):
    assert main(["alias", "nope", "1", "prod", "--registry", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == "error: unknown model 'nope'; available: []"
    assert main(["train", "configs/digits-mlp8.toml", "--registry", str(tmp_path), "--set", "model.activation=swish"]) == 2
    assert "model.activation 'swish' is not one of" in capsys.readouterr().err
    assert main(["eval", "nope", "--registry", str(tmp_path)]) == 2


def test_a_folder_given_as_the_config_file_is_named_as_a_directory(tmp_path, capsys):
    assert main(["train", str(tmp_path), "--registry", str(tmp_path / "registry")]) == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path}: is a directory; expected a config file (TOML)"


def test_a_folder_opened_as_a_file_anywhere_says_is_a_directory(tmp_path, capsys, monkeypatch):
    def opens_a_folder(args):
        return open(tmp_path).read()

    monkeypatch.setattr("aeserve.training.cli.cmd_models", opens_a_folder)
    assert main(["models", "--registry", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path}: is a directory; expected a file"


def test_summary_and_models_print_significant_digits_and_count_the_held_out_rows(tmp_path, capsys):
    reg = str(tmp_path / "registry")
    # PCA with 56 of 64 components reconstructs the digits almost exactly: a tiny error that once printed as 0.000.
    assert main(["train", "configs/digits-pca8.toml", "--registry", reg, "--quiet", "--state-dir", str(tmp_path / "state"),
                 "--set", "model.code_dim=56", "--set", "train.report=false"]) == 0
    m = Registry(reg).manifest("digits-pca8")["metrics"]
    assert 1e-7 < m["test_sq_err"] < 1e-4
    captured = capsys.readouterr()
    assert f"test_sq_err {m['test_sq_err']:.4g}  test_mse {m['test_mse']:.4g}  pca_sq_err {m['pca_sq_err']:.4g}" in captured.out
    assert float(captured.out.split("test_sq_err ")[1].split()[0]) == pytest.approx(m["test_sq_err"], rel=1e-3)
    assert captured.err.strip() == ""  # 1,797 digits: percentiles cross-fitted over every one of them
    assert Registry(reg).manifest("digits-pca8")["anomaly"]["held_out"] == "5-fold cross-fit over 1797 rows"
    assert main(["models", "--registry", reg]) == 0
    row = capsys.readouterr().out.splitlines()[1].split()
    assert [float(v) for v in row[4:6]] == pytest.approx([m["test_sq_err"], m["pca_sq_err"]], rel=1e-3)
    assert main(["train", "configs/digits-pca8.toml", "--registry", reg, "--quiet", "--state-dir", str(tmp_path / "state"),
                 "--set", "anomaly.cross_fit_rows=0", "--set", "train.report=false"]) == 0
    assert capsys.readouterr().err.strip() == "note: the anomaly percentiles rest on 341 rows (validation and test rows), fewer than 1,000"


def test_eval_says_it_cannot_re_measure_when_the_data_rows_changed_shape(tmp_path, capsys):
    import numpy as np

    data = tmp_path / "x.npy"
    np.save(data, np.random.default_rng(0).random((60, 4)).astype(np.float32))
    registry = str(tmp_path / "registry")
    assert main(["train", "--data", str(data), "--registry", registry, "--quiet", "--set", "train.epochs=1", "--set", "train.report=false"]) == 0
    np.save(data, np.random.default_rng(0).random((60, 3)).astype(np.float32))
    capsys.readouterr()
    assert main(["eval", "x", "--registry", registry, "--out", str(tmp_path / "report")]) == 0
    assert f"(cannot re-measure: {data}: its rows now hold 3 values (shape [3]); this version takes 4)" in capsys.readouterr().out
