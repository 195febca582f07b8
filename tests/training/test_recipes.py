"""Training without a config: `aeserve train --data PATH` sizes a recipe to the data, stops early on the validation
error, and records a run config that trains again."""
import json

import numpy as np
import pytest
import tomli_w
import torch

from aeserve.cli import main
from aeserve.models.kinds import build_model
from aeserve.models.registry import Registry
from aeserve.training.config import build_run_config
from aeserve.training.data.dataset import DataError
from aeserve.training.evaluate import pca_baseline, reconstruction_errors
from aeserve.training.recipes import mlp_sizes, source_for
from aeserve.training.trainer import NETWORK_MARGIN, fit, prefer_pca


def write_rows(path, n=200, seed=0):
    """Six numeric features on different scales, an id column and a label column."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(n, 2))
    x = np.concatenate([base, base @ rng.normal(size=(2, 4)) * [1, 10, 100, 1000]], axis=1)
    lines = ["id,a,b,c,d,e,f,y"] + [",".join([str(i), *map(repr, map(float, row)), str(i % 2)]) for i, row in enumerate(x)]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("features,code_dim,hidden", [(30, 8, [32]), (6, 2, [32]), (100, 25, [100]), (784, 64, [512])])
def test_the_mlp_is_sized_to_the_feature_count(features, code_dim, hidden):
    assert mlp_sizes(features) == {"code_dim": code_dim, "hidden": hidden}


def test_the_source_follows_the_suffix_and_names_what_it_takes(tmp_path):
    assert [source_for(f"x{s}") for s in (".csv", ".TSV", ".parquet", ".npy", ".npz")] == ["table", "table", "table", "npy", "npz"]
    with pytest.raises(DataError, match=r"x\.h5: cannot tell the data's kind from the suffix '\.h5'; --data takes a table"):
        source_for("x.h5")
    assert source_for(str(tmp_path)) == "images"


def test_a_table_trains_without_a_config_and_its_run_config_trains_again(tmp_path, capsys, monkeypatch):
    reg = str(tmp_path / "registry")
    monkeypatch.chdir(tmp_path)  # the training state folder (.aeserve/state) lands there
    data = write_rows(tmp_path / "rows.csv")
    assert main(["train", "--data", str(data), "--label", "y", "--registry", reg, "--quiet",
                 "--set", "data.exclude=['id']", "--set", "train.epochs=6", "--set", "train.report=false"]) == 0
    assert "published rows:1" in capsys.readouterr().out  # the name is the file's stem
    manifest = Registry(reg).manifest("rows", 1)
    run = manifest["training"]["run_config"]
    assert run["data"]["source"] == "table" and run["data"]["label"] == "y" and run["data"]["exclude"] == ["id"]
    assert run["model"] == {"kind": "mlp", "activation": "gelu", "code_dim": 2, "hidden": [32], "output": "linear"}
    assert manifest["preprocessing"]["scaling"] == "standard" and manifest["input_shape"] == [6]  # id and label left out
    # 162 training rows: the smallest batch, 11 steps an epoch, so the recipe's 200 epochs (patience 50) before --set.
    assert run["train"] | {"seed": 0} == {"epochs": 6, "patience": 50, "batch_size": 16, "lr": 0.01, "schedule": "onecycle",
                                          "pca_fallback": True, "seed": 0, "weight_decay": 0.0, "report": False}
    assert manifest["training"]["epochs_run"] == len(manifest["training"]["history"]) <= 6

    toml = tmp_path / "again.toml"
    toml.write_text(tomli_w.dumps(run))
    assert main(["train", str(toml), "--registry", reg, "--quiet"]) == 0
    again = Registry(reg).manifest("rows", 2)
    assert again["training"]["run_config"] == run
    assert again["training"]["data_fingerprint"] == manifest["training"]["data_fingerprint"]
    assert again["metrics"]["test_sq_err"] == pytest.approx(manifest["metrics"]["test_sq_err"], rel=1e-5)


def test_set_overrides_the_recipe_and_a_config_wins_over_data(tmp_path, capsys, monkeypatch):
    reg = str(tmp_path / "registry")
    monkeypatch.chdir(tmp_path)  # the training state folder (.aeserve/state) lands there
    data = write_rows(tmp_path / "rows.csv")
    assert main(["train", "--data", str(data), "--label", "y", "--name", "t", "--registry", reg, "--quiet",
                 "--set", "model.kind=pca", "--set", "model.code_dim=3"]) == 0
    run = Registry(reg).manifest("t", 1)["training"]["run_config"]
    assert run["model"] == {"kind": "pca", "code_dim": 3}  # the recipe's MLP keys left out for the new kind
    capsys.readouterr()

    config = tmp_path / "c.toml"
    config.write_text('name = "c"\n[data]\nsource = "table"\npath = "elsewhere.csv"\n[model]\nkind = "pca"\ncode_dim = 2\n')
    assert main(["train", str(config), "--data", str(data), "--label", "y", "--registry", reg, "--quiet"]) == 0
    run = Registry(reg).manifest("c", 1)["training"]["run_config"]
    assert run["data"]["path"] == str(data) and run["data"]["label"] == "y" and run["model"] == {"kind": "pca", "code_dim": 2}
    assert run["train"]["patience"] == 0  # a config's training stops early only when it says so


@pytest.mark.parametrize("argv,message", [
    (["train"], "error: aeserve train needs a config file (TOML) or --data PATH"),
    (["train", "--data", "{npy}", "--label", "y"], "error: --label names a table's label column; {npy} is not a table"),
    (["train", "--data", "{missing}"], "error: {missing}: file not found"),
])
def test_data_errors_exit_2_with_one_line(tmp_path, capsys, argv, message):
    paths = {"npy": str(tmp_path / "x.npy"), "missing": str(tmp_path / "none.csv")}
    np.save(paths["npy"], np.zeros((10, 3), np.float32))
    assert main([a.format(**paths) for a in argv] + ["--registry", str(tmp_path / "r")]) == 2
    assert capsys.readouterr().err.strip() == message.format(**paths)


def test_an_array_gets_an_mlp_sized_to_its_values(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "points.npy"
    np.save(path, np.random.default_rng(0).random((200, 4, 3)).astype(np.float32))
    assert main(["train", "--data", str(path), "--registry", str(tmp_path / "r"), "--quiet", "--set", "train.epochs=2"]) == 0
    run = Registry(str(tmp_path / "r")).manifest("points", 1)["training"]["run_config"]
    assert run["data"]["source"] == "npy" and run["model"]["code_dim"] == 3 and run["model"]["hidden"] == [32]


def test_early_stopping_keeps_the_best_epochs_weights():
    torch.manual_seed(0)
    x = torch.randn(64, 5) @ torch.randn(5, 5)
    x_train, x_val = x[:48], x[48:]
    # A learning rate this high makes the validation error jump about, so the last epoch is rarely the best.
    config = build_run_config({"name": "t", "model": {"code_dim": 2, "hidden": [8], "output": "linear"},
                               "train": {"epochs": 40, "patience": 3, "lr": 0.3, "schedule": "constant", "batch_size": 8}})
    model = build_model("mlp", config.model, (5,))
    history = fit(model, x_train, x_val, config, progress=False)
    val = [r["val_sq_err"] for r in history]
    best = int(np.argmin(val))
    assert len(history) == min(40, best + 1 + 3)  # stopped `patience` epochs after the best, or at the end
    assert float(reconstruction_errors(model, x_val).mean()) == pytest.approx(val[best], rel=1e-6)
    assert json.dumps(history)  # the history stays JSON for the manifest


class ScaledResidual(torch.nn.Module):
    """A stand-in network: closed-form PCA's reconstruction with each validation row's residual scaled so that its
    squared error is ``factors[i]`` times PCA's."""

    kind, code_dim = "mlp", 2

    def __init__(self, pca, factors):
        super().__init__()
        self.pca, self.shrink = pca, torch.tensor(np.sqrt(factors), dtype=torch.float32)[:, None]

    def forward(self, x):
        x_hat = self.pca(x)
        return x - self.shrink * (x - x_hat)


@pytest.mark.parametrize("factors, chosen", [
    # Better on every row by 2 %: the rows agree, far beyond 2 standard errors.
    (np.full(40, 0.98), "mlp"),
    # Lower on the mean (0.94 of PCA's error here) but worse on half the rows: the rows cannot tell, PCA stays.
    (np.tile([0.5, 1.3], 20), "pca"),
])
def test_the_network_is_published_only_when_the_validation_rows_show_it_better(factors, chosen):
    torch.manual_seed(0)
    x = torch.randn(240, 2) @ torch.randn(2, 6) + 0.3 * torch.randn(240, 6)
    x_train, x_val = x[:200], x[200:]
    network = ScaledResidual(pca_baseline(x_train, 2).eval(), factors)
    published, choice = prefer_pca(network, x_train, x_val)
    assert choice["chosen"] == chosen and published.kind == chosen and choice["val_rows"] == 40
    assert choice["val_sq_err"]["mlp"] < choice["val_sq_err"]["pca"]  # lower on the mean either way
    if chosen == "pca":
        assert choice["margin"] < NETWORK_MARGIN and f"under the {NETWORK_MARGIN:g} asked of a network" in choice["why"]
    else:
        assert choice["margin"] >= NETWORK_MARGIN and published is network


def test_an_image_folder_gets_the_conv_model(tmp_path, capsys, monkeypatch):
    from PIL import Image

    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    for i in range(60):
        (tmp_path / "photos" / "ab"[i % 2]).mkdir(parents=True, exist_ok=True)
        Image.fromarray((rng.random((8, 8)) * 255).astype(np.uint8)).save(tmp_path / "photos" / "ab"[i % 2] / f"{i}.png")
    assert main(["train", "--data", str(tmp_path / "photos"), "--registry", "r", "--quiet", "--set", "train.epochs=1",
                 "--set", "train.report=false"]) == 0
    manifest = Registry("r").manifest("photos", 1)
    run = manifest["training"]["run_config"]
    assert run["data"]["source"] == "images" and run["model"]["kind"] == "conv" and run["train"]["patience"] == 50
    # One epoch of the conv model against closed-form PCA on 49 training images (its code size capped by the rows).
    assert manifest["kind"] == "pca" and manifest["code_dim"] == 49
    assert manifest["training"]["recipe_choice"]["chosen"] == "pca" and manifest["training"]["recipe_choice"]["trained"] == "conv"


def test_a_table_that_pca_reconstructs_exactly_gets_pca_and_the_reason(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = write_rows(tmp_path / "rows.csv")  # six columns of rank 2: PCA with the recipe's code size 2 is exact
    assert main(["train", "--data", str(data), "--label", "y", "--registry", "r", "--set", "data.exclude=['id']",
                 "--set", "train.epochs=3", "--quiet"]) == 0
    manifest = Registry("r").manifest("rows", 1)
    choice, m = manifest["training"]["recipe_choice"], manifest["metrics"]
    assert manifest["kind"] == "pca" and manifest["config"] == {"code_dim": 2} and manifest["training"]["run_config"]["model"]["kind"] == "mlp"
    assert choice["chosen"] == "pca" and choice["trained"] == "mlp" and choice["val_rows"] == manifest["training"]["n_val"] == 18
    assert choice["val_sq_err"]["pca"] < 1e-9 < 0.1 < choice["val_sq_err"]["mlp"]  # 3 epochs of the MLP: far from exact
    assert choice["why"] == f"validation sq err {choice['val_sq_err']['pca']:.4g} (PCA) <= {choice['val_sq_err']['mlp']:.4g} (mlp)"
    # The PCA published is the baseline itself (fitted on the same training rows): no worse than itself.
    assert m["test_sq_err"] == m["pca_sq_err"] and m["worse_than_pca"] is False
    captured = capsys.readouterr()
    assert f"recipe chose closed-form PCA (kind pca, code size 2) instead of the trained mlp: {choice['why']}\n" in captured.out
    assert "WARNING" not in captured.err
    report = (Registry("r").version_dir("rows", 1) / "report" / "report.md").read_text()
    assert "trained on rows.csv: closed-form PCA, published instead of the mlp trained beside it for 3 epochs, keeping the weights of epoch " in report
    assert f"The recipe published closed-form PCA: {choice['why']}." in report


def test_a_kind_set_by_the_user_is_left_alone_and_flagged_when_worse_than_pca(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = write_rows(tmp_path / "rows.csv")
    assert main(["train", "--data", str(data), "--label", "y", "--registry", "r", "--set", "data.exclude=['id']", "--set", "model.kind=mlp",
                 "--set", "train.epochs=2", "--set", "train.report=false", "--quiet"]) == 0
    manifest = Registry("r").manifest("rows", 1)
    m = manifest["metrics"]
    assert manifest["kind"] == "mlp" and manifest["training"]["run_config"]["train"]["pca_fallback"] is False
    assert "recipe_choice" not in manifest["training"]
    assert m["worse_than_pca"] is True and m["test_sq_err"] > 100 * m["pca_sq_err"]
    captured = capsys.readouterr()
    assert "recipe chose" not in captured.out
    assert (f"WARNING: rows:1 (kind mlp) is worse than closed-form PCA with the same code size on held-out data: test_sq_err "
            f"{m['test_sq_err']:.4g} against {m['pca_sq_err']:.4g} ({m['test_sq_err'] / m['pca_sq_err']:.2f} ×)") in captured.err

    assert main(["models", "--registry", "r"]) == 0
    captured = capsys.readouterr()
    header, row = captured.out.splitlines()
    assert header.split()[-3:] == ["vs", "PCA", "aliases"]
    assert row.split()[-3:] == [f"{m['test_sq_err'] / m['pca_sq_err']:.3g}×", "WORSE", "latest"]
    assert captured.err == "WORSE: 1 version(s) with more held-out error than closed-form PCA with the same code size (more than 1.01 × its test_sq_err)\n"


def test_a_penguins_like_table_trains_with_no_config_and_its_printed_recipe_is_a_config(tmp_path, capsys, monkeypatch):
    import tomllib

    from tests.training.data.test_tables import write_penguins

    monkeypatch.chdir(tmp_path)
    data = write_penguins(tmp_path / "penguins.csv")
    assert main(["train", "--data", str(data), "--label", "species", "--registry", "r", "--set", "train.epochs=3",
                 "--set", "train.report=false"]) == 0
    err = capsys.readouterr().err
    manifest = Registry("r").manifest("penguins", 1)
    run = manifest["training"]["run_config"]
    assert {key: run["data"][key] for key in ("exclude", "categorical", "dates", "missing")} == {
        "exclude": ["rowid", "Name", "comment"], "categorical": ["island", "sex"], "dates": ["observed"], "missing": "median"}
    inferred = manifest["training"]["inferred"]
    assert inferred["missing"] == "median" and inferred["empty_fields"] == {"bill_length_mm": 7, "body_mass_g": 5, "sex": 11, "observed": 3}
    assert [f["name"] for f in manifest["features"]] == ["island", "bill_length_mm", "body_mass_g", "sex", "year", "observed"]
    assert manifest["input_shape"] == [14]
    assert "note: column 'comment' left out: free text: 120 different texts in 120 filled fields" in err
    assert "note: empty or NA fields (bill_length_mm 7, body_mass_g 5, sex 11, observed 3): filled" in err
    printed = err.split("trains it again):\n", 1)[1].split("\nnote:", 1)[0]
    assert tomllib.loads(printed) == run  # the printed recipe is the run config, as TOML
    (tmp_path / "again.toml").write_text(printed)
    assert main(["train", str(tmp_path / "again.toml"), "--registry", "r", "--quiet"]) == 0
    again = Registry("r").manifest("penguins", 2)
    assert again["features"] == manifest["features"] and "inferred" not in again["training"]  # a config: nothing inferred
    assert again["metrics"]["test_sq_err"] == pytest.approx(manifest["metrics"]["test_sq_err"], rel=1e-5)


@pytest.mark.parametrize("categorical", ["island,sex", "[island,sex]", "[island, 'sex']", '["island","sex"]'])
def test_set_takes_a_list_as_a_shell_user_types_it_and_the_columns_it_names_win(tmp_path, capsys, monkeypatch, categorical):
    from tests.training.data.test_tables import write_penguins

    monkeypatch.chdir(tmp_path)
    data = write_penguins(tmp_path / "penguins.csv")
    assert main(["train", "--data", str(data), "--label", "species", "--registry", "r", "--quiet", "--set", f"data.categorical={categorical}",
                 "--set", "data.exclude=Name,year", "--set", "train.epochs=1", "--set", "train.report=false"]) == 0
    run = Registry("r").manifest("penguins", 1)["training"]["run_config"]
    assert run["data"]["categorical"] == ["island", "sex"] and run["data"]["exclude"] == ["Name", "year", "rowid", "comment"]


def test_set_missing_error_keeps_the_strict_error(tmp_path, capsys, monkeypatch):
    from tests.training.data.test_tables import write_penguins

    monkeypatch.chdir(tmp_path)
    data = write_penguins(tmp_path / "penguins.csv")
    assert main(["train", "--data", str(data), "--label", "species", "--registry", "r", "--quiet", "--set", "data.missing=error"]) == 2
    assert capsys.readouterr().err.strip() == (f"error: {data}: line 5, column 'bill_length_mm': the field is empty or NA; "
                                               "set data.missing = 'drop' or 'median'")
