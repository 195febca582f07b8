"""The aeserve command line on small data: train, models, alias, eval."""
from aeserve.cli import main


def test_train_models_alias_eval(tmp_path, capsys):
    reg = str(tmp_path / "registry")
    quick = ["--registry", reg, "--quiet", "--set", "data.limit=300", "--set", "train.epochs=2"]
    assert main(["train", "configs/digits-mlp8.toml", *quick]) == 0
    assert main(["train", "configs/digits-mlp8.toml", *quick, "--name", "other", "--seed", "3"]) == 0
    assert main(["train", "configs/digits-mlp8.toml", *quick]) == 0
    out = capsys.readouterr().out
    assert "published digits-mlp8:1" in out and "published other:1" in out and "published digits-mlp8:2" in out

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
