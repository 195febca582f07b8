"""Training configs: declared constraints, exact error messages, and --set model.kind changing the kind."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from aeserve.cli import main
from aeserve.models.kinds import MODEL_KINDS, build_model
from aeserve.models.mlp import MLPConfig
from aeserve.models.projector import PROJECTOR_KINDS, build_projector
from aeserve.models.registry import Registry
from aeserve.training.config import TrainParams, build_run_config, load_run_config
from aeserve.training.data.config import DataConfig
from tests.conftest import KIND_CONFIGS

MLP = "configs/digits-mlp8.toml"


@pytest.mark.parametrize("overrides, message", [
    (["model.activation=swish"], "model.activation 'swish' is not one of ['elu', 'gelu', 'relu', 'sigmoid', 'silu', 'tanh']"),
    (["train.schedule=cosine"], "train.schedule 'cosine' is not one of ['constant', 'onecycle']"),
    (["data.source=mnist"], "data.source 'mnist' is not one of ['csv', 'digits', 'fashion-mnist', 'images', 'npy', 'npz', 'table']"),
    (["train.epochs=-1"], "train.epochs must be >= 0, got -1"),
    (["train.batch_size=0"], "train.batch_size must be >= 1, got 0"),
    (["train.lr=0"], "train.lr must be > 0, got 0"),
    (["train.epochs=2.5"], "train.epochs must be a valid integer, got 2.5"),
    (["data.val_fraction=0.5"], "data.val_fraction must be >= 0 and < 0.5, got 0.5"),
    (["model.hidden=[128, 0]"], "model.hidden[1] must be >= 1, got 0"),
    (["model.hidden=5"], "model.hidden must be a list, got 5"),
    (["model.code_dim=0", "model.output=tanh"], "model.code_dim must be >= 1, got 0; model.output 'tanh' is not one of ['linear', 'sigmoid']"),
    (["train.epoch=1"], "unknown key(s) ['train.epoch']; allowed: "
                        "['batch_size', 'epochs', 'lr', 'patience', 'pca_fallback', 'report', 'schedule', 'seed', 'weight_decay']"),
    (["model.layers=[3]"], "unknown key(s) ['model.layers'] for model.kind 'mlp'; allowed: ['activation', 'code_dim', 'hidden', 'output']"),
    (["projector.kind=umap", "projector.min_dist=1"], "projector.min_dist must be >= 0 and < 1, got 1"),
    (["model.kind=cnn"], "model.kind 'cnn' is not one of ['conv', 'linear', 'mlp', 'pca', 'rbm', 'rd', 'vae']"),
    (["train.epochs=true"], "train.epochs must be a number, got True"),  # pydantic alone reads true as 1
    (["model.hidden=[64, true]"], "model.hidden must be numbers, got [64, True]"),
    (["train.lr=inf"], "train.lr must be a finite number, got inf"),
    (["train.seed=99999999999999999999"], "train.seed must be >= 0 and < 4294967296, got 99999999999999999999"),
    (["train.seed=-1"], "train.seed must be >= 0 and < 4294967296, got -1"),
    (["name=5"], "invalid model name 5: use 1-100 letters, digits, '_', '.', '-', starting with a letter or digit, without '..'"),
    (["name='../x'"], "invalid model name '../x': use 1-100 letters, digits, '_', '.', '-', starting with a letter or digit, without '..'"),
])
def test_bad_values_are_named_with_what_is_allowed(overrides, message):
    with pytest.raises(ValueError) as error:
        load_run_config(MLP, overrides)
    assert str(error.value) == message


def test_configs_built_directly_are_checked_too():
    with pytest.raises(ValueError) as error:
        TrainParams(epochs=-3)
    assert str(error.value) == "train.epochs must be >= 0, got -3"
    with pytest.raises(ValueError) as error:
        DataConfig(limit=-1)
    assert str(error.value) == "data.limit must be >= 0, got -1"
    with pytest.raises(ValueError) as error:
        build_model("conv", {"channels": []}, (8, 8))
    assert str(error.value) == "model.channels must be a list of at least 1 item(s), got []"
    with pytest.raises(ValueError) as error:
        build_projector("tsne", 3, {"points": 5, "max_points": 3})
    assert str(error.value) == "projector.points must be <= projector.max_points = 3, got 5"


def test_values_are_coerced_and_asdict_is_unchanged():
    config = MLPConfig(code_dim=8, hidden=[16, 4])
    assert config.hidden == (16, 4)
    assert dataclasses.asdict(config) == {"code_dim": 8, "hidden": (16, 4), "activation": "gelu", "output": "sigmoid"}
    assert DataConfig(path=2024).path == "2024"  # --set data.path=2024 reads the value as a number


@pytest.mark.parametrize("kind", sorted(MODEL_KINDS))
def test_a_stored_config_builds_the_same_model_config(kind):
    """Manifests store dataclasses.asdict(config) as JSON (tuples as lists); it must build the same config again."""
    config = build_model(kind, KIND_CONFIGS[kind], (8, 8)).config
    stored = {key: list(value) if isinstance(value, tuple) else value for key, value in dataclasses.asdict(config).items()}
    assert build_model(kind, stored, (8, 8)).config == config


@pytest.mark.parametrize("kind", sorted(PROJECTOR_KINDS))
def test_a_stored_projector_config_builds_the_same_config(kind):
    config = build_projector(kind, 4).config
    assert build_projector(kind, 4, dataclasses.asdict(config)).config == config


def test_set_model_kind_leaves_out_the_file_keys_the_new_kind_does_not_take(capsys):
    config = load_run_config(MLP, ["model.kind=pca"])
    assert (config.model_kind, config.model) == ("pca", {"code_dim": 8})
    assert config.to_dict()["model"] == {"kind": "pca", "code_dim": 8}
    assert capsys.readouterr().err == ("note: model.kind changed from 'mlp' to 'pca': left out model.activation, model.hidden "
                                       "from the config file (kind 'pca' does not take them)\n")

    config = load_run_config(MLP, ["model.kind=rbm"])
    assert (config.model_kind, config.model) == ("rbm", {"code_dim": 8, "hidden": [128, 64]})
    assert "left out model.activation from the config file" in capsys.readouterr().err


def test_set_keys_the_new_kind_does_not_take_still_fail(capsys):
    with pytest.raises(ValueError) as error:
        load_run_config(MLP, ["model.kind=pca", "model.hidden=[4]"])
    assert str(error.value) == "unknown key(s) ['model.hidden'] for model.kind 'pca'; allowed: ['code_dim']"
    assert "left out model.activation from the config file" in capsys.readouterr().err


def test_without_a_kind_change_nothing_is_left_out(tmp_path, capsys):
    path = tmp_path / "pca.toml"
    path.write_text('name = "x"\n[data]\nsource = "digits"\n[model]\nkind = "pca"\ncode_dim = 4\nhidden = [8]\n')
    with pytest.raises(ValueError) as error:
        load_run_config(path, ["model.kind=pca"])
    assert str(error.value) == "unknown key(s) ['model.hidden'] for model.kind 'pca'; allowed: ['code_dim']"
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['model.hidden'\] for model.kind 'pca'"):
        build_run_config({"name": "x", "model": {"kind": "pca", "hidden": [8]}})
    assert capsys.readouterr().err == ""


def test_set_projector_kind_follows_the_same_rule(tmp_path, capsys):
    path = tmp_path / "umap.toml"
    path.write_text('name = "x"\n[projector]\nkind = "umap"\nepochs = 2\nmax_points = 500\n')
    config = load_run_config(path, ["projector.kind=tsne"])
    assert (config.projector_kind, config.projector) == ("tsne", {"max_points": 500})
    assert capsys.readouterr().err == ("note: projector.kind changed from 'umap' to 'tsne': left out projector.epochs "
                                       "from the config file (kind 'tsne' does not take them)\n")


def test_cli_trains_the_mlp_config_as_pca(tmp_path, capsys):
    registry = tmp_path / "registry"
    assert main(["train", MLP, "--set", "model.kind=pca", "--registry", str(registry), "--quiet"]) == 0
    captured = capsys.readouterr()
    assert "note: model.kind changed from 'mlp' to 'pca': left out model.activation, model.hidden" in captured.err
    assert "published digits-mlp8:1" in captured.out
    manifest = Registry(registry).manifest("digits-mlp8", 1)
    assert (manifest["kind"], manifest["config"], manifest["code_dim"]) == ("pca", {"code_dim": 8}, 8)
    assert manifest["training"]["run_config"]["model"] == {"kind": "pca", "code_dim": 8}
    # Closed-form PCA: its held-out error is the PCA baseline measured on the same data.
    assert manifest["metrics"]["test_sq_err"] == pytest.approx(manifest["metrics"]["pca_sq_err"], rel=1e-4)


@pytest.mark.parametrize("path", sorted(Path(__file__).parents[2].glob("configs/*.toml")), ids=lambda p: p.name)
def test_every_shipped_config_loads_and_builds_its_model(path):
    config = load_run_config(path)
    shape = {"fashion-mnist": (28, 28), "digits": (8, 8)}.get(config.data.source)
    if shape is None:
        pytest.skip(f"{path.name} reads {config.data.source} data")
    model = build_model(config.model_kind, config.model, shape)
    assert model.code_dim >= 1


def test_a_config_that_says_lmbda_trains_with_it_as_distortion_weight(tmp_path):
    path = tmp_path / "rd.toml"
    path.write_text('name = "rd"\n[data]\nsource = "digits"\n[model]\nkind = "rd"\nchannels = 8\nlmbda = 0.02\n')
    config = load_run_config(path)
    assert config.model == {"channels": 8, "distortion_weight": 0.02}  # recorded in the manifest by its current name
    assert build_model("rd", config.model, (8, 8)).config.distortion_weight == 0.02
    assert load_run_config(path, ["model.distortion_weight=0.5"]).model["distortion_weight"] == 0.5  # --set wins over the file
    assert load_run_config(path, ["model.lmbda=0.5"]).model["distortion_weight"] == 0.5
    with pytest.raises(ValueError, match=r"^model\.lmbda is the old name of model\.distortion_weight; give one of them, not both$"):
        load_run_config(path, ["model.lmbda=0.5", "model.distortion_weight=0.5"])
    path.write_text(path.read_text() + "distortion_weight = 0.03\n")
    with pytest.raises(ValueError, match=r"^model\.lmbda is the old name of model\.distortion_weight; give one of them, not both$"):
        load_run_config(path)


@pytest.mark.parametrize("text,value", [
    ("data.categorical=island,sex", ["island", "sex"]), ("data.categorical=[island,sex]", ["island", "sex"]),
    ("data.categorical=[island, 'sex']", ["island", "sex"]), ('data.categorical=["a,b"]', ["a,b"]), ("data.categorical=[]", []),
    ("data.categorical=", []), ("model.hidden=64,32", [64, 32]), ("model.hidden=[64, 32]", [64, 32]),
])
def test_set_reads_lists_as_a_shell_user_types_them(text, value):
    from aeserve.training.config import load_run_config

    config = load_run_config(None, ["data.source=table", "data.path=a,b.csv", text], name="t")
    section, key = text.split("=")[0].split(".")
    assert list(getattr(config.data, key)) == value if section == "data" else config.model[key] == value
    assert config.data.path == "a,b.csv"  # a string key keeps its commas
