"""Training without a config: ``aeserve train --data PATH`` picks a recipe from the data.

The recipe is a whole config dict (the same keys as a TOML config), sized to the data after it is read:

- a table (.csv, .tsv, .txt, .parquet, .pq): an MLP with standard scaling (so a linear output);
- an array (.npy, .npz): an MLP with the source's default scaling;
- a folder of images: the convolutional model.

The MLP's widths follow the number of encoded features d (numbers plus one-hot columns, or values per example):
``code_dim = clamp(round(d / 4), 2, 64)`` and one hidden layer of ``clamp(d, 32, 512)`` units (at least
``2 code_dim``).

Training is a budget of optimiser steps (STEPS: 6,000 for the MLP): a batch of about 1/50 of the training rows (16
to 256), as many epochs as the budget needs (30 to 200), a one-cycle schedule up to PEAK_LR, and early stopping on
the validation error after a quarter of the epochs without a lower one, keeping the best epoch's weights (measured
against the earlier 500-epoch constant-rate schedule in docs/benchmarks.md, "Zero-config recipes").

Closed-form PCA with the same code size is fitted beside the network (``train.pca_fallback``); unless the network
reconstructs the validation rows clearly better (by ``trainer.NETWORK_MARGIN`` standard errors), the version is PCA,
and the manifest says why (``training.recipe_choice``). A ``--set
model.kind`` turns that off: a kind the user chose is left alone. ``--set`` overrides any key; the manifest records
the result in ``training.run_config``, which, written out as TOML (``recipe_toml``), is a config that trains again.

A table's columns are inferred from it (``tables.infer_columns``): numbers, dates, categories, and the columns left out
(identifiers, names, free text) with the reason; ``data.missing`` is "median", so that empty fields are filled in
training and in serving alike. What was inferred is recorded in the manifest (``training.inferred``); the columns
that ``--set`` names are read as it says.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from aeserve.training.config import RunConfig, list_where_taken, load_run_config, parse_override
from aeserve.training.data.config import DataConfig
from aeserve.training.data.dataset import DataError, Dataset
from aeserve.training.data.inference import infer_columns
from aeserve.training.data.locations import Found, found_at, location
from aeserve.training.data.sources import SOURCES, load_dataset
from aeserve.training.data.tables import TABLE_SUFFIXES

ARRAY_SOURCES = {".npy": "npy", ".npz": "npz"}
MAX_CODE_DIM = 64
MAX_HIDDEN = 512
BATCHES_PER_EPOCH = 50
MIN_BATCH, MAX_BATCH = 16, 256
MIN_EPOCHS, MAX_EPOCHS = 30, 200
# Each kind's step budget and one-cycle peak learning rate: the MLP's measured in docs/benchmarks.md ("Zero-config
# recipes"); the conv model's steps cost many times more, so its budget stays near what the earlier 500-epoch schedule
# ran before early stopping on small folders, and the comparison with PCA guards its result.
STEPS = {"mlp": 6000, "conv": 2000}
PEAK_LR = {"mlp": 1e-2, "conv": 3e-3}


def source_for(path: str) -> str:
    """The data source that reads ``path``: a table or an array by its suffix, or a folder of images (local or a URL)."""
    where = location(path)
    if found_at(where) is Found.FOLDER:
        if "images" not in SOURCES:
            raise DataError(f"{path}: is a directory; image folders are not supported yet (give a table or a .npy/.npz array)")
        return "images"
    suffix = where.suffix.lower()
    if suffix in TABLE_SUFFIXES:
        return "table"
    if suffix in ARRAY_SOURCES:
        return ARRAY_SOURCES[suffix]
    raise DataError(f"{path}: cannot tell the data's kind from the suffix {suffix!r}; "
                    f"--data takes a table ({', '.join(TABLE_SUFFIXES)}), an array (.npy, .npz) or a folder of images")


def mlp_sizes(features: int) -> dict[str, Any]:
    """The MLP's code size and hidden widths for ``features`` inputs (see the module docstring for the rule)."""
    code_dim = min(MAX_CODE_DIM, max(2, round(features / 4)))
    # One hidden layer: why, in docs/benchmarks.md (Anomaly scores, the earlier tries).
    return {"code_dim": code_dim, "hidden": [min(MAX_HIDDEN, max(32, features, 2 * code_dim))]}


def recipe(data: DataConfig, dataset: Dataset) -> dict[str, Any]:
    """The config dict (``name`` left out) for ``data``, sized to ``dataset`` as read."""
    features = math.prod(dataset.train_x.shape[1:])
    if data.source == "images":
        model = {"kind": "conv"}
    else:
        model = {"kind": "mlp", "activation": "gelu", **mlp_sizes(features)}
    return {"data": dataclasses.asdict(data), "model": model, "train": schedule(model["kind"], int(len(dataset.train_x) * (1 - data.val_fraction)))}


def schedule(kind: str, n_train: int) -> dict[str, Any]:
    """The [train] keys of model ``kind`` for ``n_train`` training rows (see the module docstring for the rule)."""
    batch_size = min(MAX_BATCH, max(MIN_BATCH, n_train // BATCHES_PER_EPOCH))
    epochs = min(MAX_EPOCHS, max(MIN_EPOCHS, round(STEPS[kind] / math.ceil(max(n_train, 1) / batch_size))))
    return {"epochs": epochs, "patience": max(10, epochs // 4), "batch_size": batch_size, "lr": PEAK_LR[kind], "schedule": "onecycle",
            "pca_fallback": True}


def recipe_run_config(path: str, label: str | None = None, overrides: list[str] = (), name: str | None = None,
                      seed: int | None = None) -> tuple[RunConfig, Dataset]:
    """The run that ``aeserve train --data PATH`` makes, and the data it read to size it.

    ``--set data.*`` keys shape the data before the recipe is sized to it; every ``--set`` key then overrides the recipe.
    A table's columns that ``--set`` does not name are inferred (``infer_columns``), and so is ``data.missing`` where
    ``--set`` does not give it; the dataset's facts (the manifest's training facts) record what was inferred.
    """
    values: dict[str, Any] = {"source": source_for(path), "path": str(path)}
    if label:
        if values["source"] != "table":
            raise ValueError(f"--label names a table's label column; {path} is not a table")
        values["label"] = label
    others = []  # every --set but data's, which are in the data config from here on
    for text in overrides:
        keys, value = parse_override(text)
        if keys[0] == "data" and len(keys) == 2:
            values[keys[1]] = list_where_taken(DataConfig, keys[1], value)
        else:
            others.append(text)
    inferred = None
    if values["source"] == "table":
        keys, inferred = infer_columns(DataConfig.from_dict(values))
        inferred["missing"] = values.setdefault("missing", "median")
        values.update(keys)
    data = DataConfig.from_dict(values)
    dataset = load_dataset(data)
    values = recipe(data, dataset)
    if any(parse_override(text)[0] == ["model", "kind"] for text in overrides):
        values["train"]["pca_fallback"] = False  # a kind the user chose is left alone
    config = load_run_config(None, others, name=name or Path(path).stem, seed=seed, values=values)
    if config.data != data:
        dataset = load_dataset(config.data)
    if inferred is not None:
        dataset.facts["inferred"] = inferred
    return config, dataset


def recipe_toml(config: RunConfig) -> str:
    """The run as a TOML config: saved to a file, ``aeserve train FILE`` trains it again. Values as JSON writes them,
    which TOML reads alike (strings, numbers, booleans and lists of them)."""
    values = config.to_dict()
    lines = [f"name = {json.dumps(values.pop('name'))}"]
    for section, table in values.items():
        lines += ["", f"[{section}]", *(f"{key} = {json.dumps(value)}" for key, value in table.items())]
    return "\n".join(lines) + "\n"


def inferred_notes(inferred: dict[str, Any] | None) -> list[str]:
    """What ``aeserve train --data`` tells of a table's inferred columns: each one left out and why, and the filled fields."""
    if not inferred:
        return []
    notes = [f"column {name!r} left out: {why}" for name, why in inferred["excluded"].items()]
    if inferred["empty_fields"]:
        counts = ", ".join(f"{name} {count}" for name, count in inferred["empty_fields"].items())
        how = {"median": "filled (numbers and dates with the median, categories as a category of their own) and flagged by an "
                         "indicator; served rows are filled alike",
               "drop": "their rows left out", "error": "refused"}[inferred["missing"]]
        notes.append(f"empty or NA fields ({counts}): {how} (data.missing = {inferred['missing']!r})")
    return notes
