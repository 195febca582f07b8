"""Reports: written with every version and by `aeserve eval`, with real figures."""
import json

import numpy as np

from aeserve.cli import main
from aeserve.training.config import build_run_config
from aeserve.training.report import epochs_sentence, reconstructions_figure
from aeserve.training.trainer import train

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_training_writes_a_report_the_manifest_points_to(trained_registry):
    manifest = trained_registry.manifest("digits-mlp")
    folder = trained_registry.version_dir("digits-mlp", 1)
    report = (folder / manifest["report"]).read_text()
    assert report.startswith("# digits-mlp\n")  # made before publishing: the folder names the version
    assert f"| test summed squared error / example | {manifest['metrics']['test_sq_err']:.5g} |" in report
    for figure in ("reconstructions.png", "map.png", "curves.png"):
        assert f"]({figure})" in report
        assert (folder / "report" / figure).read_bytes().startswith(PNG_MAGIC)


def test_the_report_names_the_epochs_run_and_the_epoch_kept(trained_registry):
    report = (trained_registry.version_dir("digits-mlp", 1) / "report" / "report.md").read_text()
    assert "trained on digits: 3 epochs, keeping the weights of epoch 3, in " in report
    report = (trained_registry.version_dir("digits-pca", 1) / "report" / "report.md").read_text()
    assert "trained on digits: no gradient epochs (fitted in closed form), in " in report
    # Early stopping ended the run before train.epochs (the case a report once called "500 epochs").
    assert (epochs_sentence({"epochs": 500, "epochs_run": 425, "best_epoch": 405})
            == "425 epochs of up to 500 (early stopping), keeping the weights of epoch 405")
    # Versions published before epochs_run was recorded without early stopping: their history counts the epochs.
    assert epochs_sentence({"epochs": 4, "history": [{"epoch": e} for e in (1, 2, 3, 4)]}) == "4 epochs, keeping the weights of epoch 4"
    assert epochs_sentence({"epochs": 4}) == "4 epochs"


def test_rbm_report_shows_pretraining(trained_registry):
    folder = trained_registry.version_dir("digits-rbm", 1)
    assert "## RBM pre-training" in (folder / "report" / "report.md").read_text()


def test_report_can_be_turned_off(registry):
    config = build_run_config({"name": "x", "data": {"source": "digits", "limit": 200}, "model": {"kind": "pca", "code_dim": 2},
                               "train": {"report": False}})
    train(config, registry, progress=False)
    assert "report" not in registry.manifest("x")
    assert not (registry.version_dir("x", 1) / "report").exists()


def test_a_report_that_fails_is_logged_and_noted_and_the_version_still_publishes(registry, monkeypatch, caplog):
    def broken_report(*args):
        raise RuntimeError("no font for the title")

    monkeypatch.setattr("aeserve.training.trainer.render_report", broken_report)
    config = build_run_config({"name": "x", "data": {"source": "digits", "limit": 200}, "model": {"kind": "pca", "code_dim": 2}})
    assert train(config, registry, progress=False) == 1
    manifest = registry.manifest("x")
    assert manifest["report_error"] == "RuntimeError: no font for the title" and "report" not in manifest
    # graphs/ aside (tests/service/test_slim.py covers them): the version is whole, without report.md.
    assert sorted(p.name for p in registry.version_dir("x", 1).iterdir() if p.name != "graphs") == ["manifest.json", "map", "weights.safetensors"]
    assert registry.load("x").encode(np.zeros((1, 64), np.float32)).shape == (1, 2)
    assert "x: the report failed, so the version is published without it: RuntimeError: no font for the title" in caplog.text


def test_eval_writes_a_report_and_prints_the_table(trained_registry, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["eval", "digits-pca:1", "--registry", str(trained_registry.root), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"report: {out / 'report.md'}" in printed
    assert "ratio to PCA" in printed and "1.000" in printed  # PCA is its own baseline
    assert (out / "map.png").read_bytes().startswith(PNG_MAGIC)
    assert (out / "report.md").read_text().startswith("# digits-pca version 1\n")
    assert json.loads((trained_registry.version_dir("digits-pca", 1) / "manifest.json").read_text())["version"] == 1


def test_a_report_on_unlabelled_data_raises_no_warning(registry, tmp_path):
    import warnings

    from aeserve.training.report import render_report

    x = np.random.default_rng(0).random((120, 6)).astype(np.float32)
    np.save(tmp_path / "rows.npy", x)
    train(build_run_config({"name": "rows", "data": {"source": "npy", "path": str(tmp_path / "rows.npy")},
                            "model": {"kind": "pca", "code_dim": 2}, "train": {"report": False}}), registry, progress=False)
    version = registry.load("rows")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        files = render_report(version, x[:20], None)
    assert files["report/map.png"].startswith(PNG_MAGIC)


def test_colour_arrays_of_any_layout_never_crash_the_report(tmp_path, registry):
    x = np.random.default_rng(0).integers(0, 256, (40, 8, 8, 3)).astype(np.float32)  # channels last, as many tools write them
    np.save(tmp_path / "rgb.npy", x)
    config = build_run_config({"name": "rgb", "data": {"source": "npy", "path": str(tmp_path / "rgb.npy")},
                               "model": {"kind": "mlp", "code_dim": 2, "hidden": [8]}, "train": {"epochs": 1}})
    assert train(config, registry, progress=False) == 1
    assert (registry.version_dir("rgb", 1) / "report" / "reconstructions.png").read_bytes().startswith(PNG_MAGIC)
    version = registry.load("rgb")
    for shape in ((3, 8, 8), (4, 2, 3, 8), (192,)):  # channels first, not a picture, a vector
        object.__setattr__(version.preprocessing, "input_shape", shape)
        version.manifest["input_shape"] = list(shape)
        assert reconstructions_figure(version, x[:3]).startswith(PNG_MAGIC)
