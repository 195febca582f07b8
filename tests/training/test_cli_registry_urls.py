"""Every command takes a registry URL: train, models, alias, eval and export against an S3 registry (moto on loopback)."""
import json
from pathlib import Path

from aeserve.cli import main


def test_every_command_works_on_an_s3_registry(s3_bucket, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("AESERVE_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)  # training state in .aeserve/ of this folder
    reg = f"{s3_bucket}/models"
    quick = ["--registry", reg, "--quiet", "--set", "data.limit=300", "--set", "train.epochs=2", "--set", "train.report=false"]
    config = str(Path(__file__).parents[2] / "configs" / "digits-mlp8.toml")
    assert main(["train", config, *quick]) == 0
    assert main(["train", config, *quick, "--seed", "3"]) == 0
    assert "published digits-mlp8:2 in " + reg in capsys.readouterr().out

    assert main(["alias", "digits-mlp8", "1", "prod", "--registry", reg]) == 0
    assert "digits-mlp8: prod -> 1" in capsys.readouterr().out
    assert main(["models", "--registry", reg]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
    assert [(r[0], r[1], r[-1]) for r in rows] == [("digits-mlp8", "1", "prod"), ("digits-mlp8", "2", "latest")]

    assert main(["eval", "digits-mlp8:prod", "--registry", reg, "--out", str(tmp_path / "report")]) == 0
    out = capsys.readouterr().out
    stored = float(next(line for line in out.splitlines() if "test_sq_err (stored)" in line).split()[-1])
    measured = float(next(line for line in out.splitlines() if "test_sq_err (re-measured)" in line).split()[-1])
    assert measured == stored

    assert main(["export", "digits-mlp8", "--registry", reg, "--out", str(tmp_path / "onnx")]) == 0
    assert json.loads((tmp_path / "onnx" / "export.json").read_text())["version"] == 2

    # The versions were copied once into the cache, verified by their sha256.
    assert len(list((tmp_path / "cache" / "sha256").iterdir())) == 2


def test_registry_url_errors_are_one_line(tmp_path, capsys, s3_bucket):
    assert main(["models", "--registry", "nosuchscheme://bucket/x"]) == 2
    assert capsys.readouterr().err.startswith("error: cannot open the registry nosuchscheme://bucket/x")
    assert main(["alias", "nope", "1", "prod", "--registry", f"{s3_bucket}/empty"]) == 2
    assert capsys.readouterr().err.strip() == "error: unknown model 'nope'; available: []"
