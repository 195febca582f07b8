"""One training run's configuration: TOML file + ``--set section.key=value`` overrides, validated when built."""
from __future__ import annotations

import copy
import dataclasses
import sys
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from annotated_types import Ge

from aeserve.models.config import Config, Count, NonNegative, Positive, Seed, Size
from aeserve.models.kinds import MODEL_KINDS
from aeserve.models.projector import PROJECTOR_KINDS
from aeserve.models.registry import check_name
from aeserve.training.data.config import DataConfig

# The kind of a [model] or [projector] table that names none; tables with a kind and their kinds by name.
DEFAULT_KINDS = {"model": "mlp", "projector": "pca"}
KINDS: dict[str, dict[str, Any]] = {"model": MODEL_KINDS, "projector": PROJECTOR_KINDS}


@dataclass(frozen=True)
class TrainParams(Config):
    section = "train"

    epochs: Count = 20
    batch_size: Size = 256
    lr: Positive = 1e-3
    seed: Seed = 0
    weight_decay: NonNegative = 0.0
    # Stop after this many epochs without a lower validation error and keep the best epoch's weights (0: off).
    patience: Count = 0
    # "onecycle": warm up then anneal (fast convergence on a fixed budget); "constant": plain Adam.
    schedule: Literal["onecycle", "constant"] = "onecycle"
    # Fit closed-form PCA with the same code size beside the model, and publish it instead unless the model reconstructs
    # the validation rows clearly better (trainer.prefer_pca; train --data's recipes; a config's model is left alone
    # unless it says so).
    pca_fallback: bool = False
    # Write report/ (Markdown + PNG figures) into the version folder.
    report: bool = True


@dataclass(frozen=True)
class AnomalyParams(Config):
    """How the version scores rows as anomalies (models/anomaly.py; the measurements behind the defaults:
    docs/benchmarks.md, "Anomaly scores")."""

    section = "anomaly"

    # "combined": the code's Hotelling T2 and the residual weighted per feature, each relative to the training rows;
    # "neighbors": mean distance to the k nearest training codes (standardized); "error": the reconstruction error.
    score: Literal["combined", "neighbors", "error"] = "combined"
    # The neighbour score's k and reference set: a seeded sample of this many training rows' codes (all when fewer).
    k: Size = 5
    reference_rows: Size = 2000
    # Data of at most this many rows (training and test together) gets its percentiles from a cross-fit over every row
    # (0: never): each row scored by a model trained on the other folds.
    cross_fit_rows: Count = 5000
    folds: Annotated[int, Ge(2)] = 5
    # The optimiser steps all fold models may take together, as a multiple of the steps the published model took to
    # its kept epoch (0: no bound, each fold model as many as it): each trains for its share. Why half: docs/benchmarks.md,
    # "Anomaly scores: the cross-fit's cost and calibration".
    cross_fit_steps: NonNegative = 0.5


@dataclass(frozen=True)
class RunConfig:
    name: str
    data: DataConfig
    model_kind: str
    model: dict[str, Any]
    train: TrainParams
    projector_kind: str = "pca"
    projector: dict[str, Any] = field(default_factory=dict)
    anomaly: AnomalyParams = field(default_factory=AnomalyParams)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "data": dataclasses.asdict(self.data),
            "model": {"kind": self.model_kind, **self.model},
            "train": dataclasses.asdict(self.train),
            "projector": {"kind": self.projector_kind, **self.projector},
            "anomaly": dataclasses.asdict(self.anomaly),
        }


def parse_override(text: str) -> tuple[list[str], Any]:
    """``section.key=value`` -> (["section", "key"], value); the value is read as TOML, else as a list where it is
    bracketed as one without TOML's quotes (``[island, sex]``), else kept as a string (which ``list_where_taken``
    splits at its commas for a key that takes a list: ``island,sex``)."""
    if "=" not in text:
        raise ValueError(f"--set expects section.key=value, got {text!r}")
    key, raw = text.split("=", 1)
    path = key.strip().split(".")
    if not all(path):
        raise ValueError(f"--set expects section.key=value, got {text!r}")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        bracketed = raw.strip()
        value = _items(bracketed[1:-1]) if bracketed.startswith("[") and bracketed.endswith("]") else raw
    return path, value


def _items(text: str) -> list[Any]:
    """``a, 2, 'b'`` -> ["a", 2, "b"]: each item read as TOML, else as its text without quotes; no items in blank text."""
    items = []
    for item in (part.strip() for part in text.split(",")):
        try:
            items.append(tomllib.loads(f"v = {item}")["v"])
        except tomllib.TOMLDecodeError:
            items.append(item.strip("'\""))
    return [] if items == [""] else items


def list_where_taken(config_class: type | None, key: str, value: Any) -> Any:
    """``value``, or its comma-separated items as a list where it is a string and ``config_class.key`` takes a list."""
    if not isinstance(value, str) or config_class is None:
        return value
    hint = typing.get_type_hints(config_class, include_extras=True).get(key)
    if typing.get_origin(hint) is Annotated:
        hint = typing.get_args(hint)[0]
    return _items(value) if typing.get_origin(hint) is tuple else value


def _config_class(section: str, table: dict[str, Any]) -> type | None:
    """The config class that reads ``[section]`` as it stands (a model's by its kind), or None for an unknown one."""
    if section in KINDS:
        kind = KINDS[section].get(table.get("kind", DEFAULT_KINDS[section]))
        return kind.config_class if kind is not None else None
    return {"data": DataConfig, "train": TrainParams}.get(section)


def _section(values: dict[str, Any], key: str) -> dict[str, Any]:
    section = values.get(key, {})
    if not isinstance(section, dict):
        raise ValueError(f"[{key}] must be a table, got {section!r}")
    return dict(section)


def build_run_config(values: dict[str, Any]) -> RunConfig:
    """Validate a config dict (as read from TOML). Errors name the bad key or value and what is allowed."""
    unknown = sorted(set(values) - {"name", "data", "model", "train", "projector", "anomaly"})
    if unknown:
        raise ValueError(f"unknown top-level key(s) {unknown}; allowed: ['anomaly', 'data', 'model', 'name', 'projector', 'train']")
    model = _section(values, "model")
    kind = _kind(model, "model")
    model = MODEL_KINDS[kind].config_class.current_keys(model)  # a renamed key is kept, and recorded, by its current name
    MODEL_KINDS[kind].config_class.from_dict(model, kind)  # validate now, before any data is loaded
    projector = _section(values, "projector")
    projector_kind = _kind(projector, "projector")
    projector = PROJECTOR_KINDS[projector_kind].config_class.current_keys(projector)
    PROJECTOR_KINDS[projector_kind].config_class.from_dict(projector, projector_kind)
    name = values.get("name")
    if not name:
        raise ValueError("the config needs a name (top-level `name = ...` or --name)")
    check_name(name)  # before any data is read or state written: the name becomes folders
    data = DataConfig.from_dict(_section(values, "data"))
    _output_for_scaling(data, kind, model)
    return RunConfig(
        name=name,
        data=data,
        model_kind=kind,
        model=model,
        train=TrainParams.from_dict(_section(values, "train")),
        projector_kind=projector_kind,
        projector=projector,
        anomaly=AnomalyParams.from_dict(_section(values, "anomaly")),
    )


UNIT_OUTPUT_KINDS = ("rbm", "conv", "vae")  # their reconstructions are logistic: values in [0, 1]


def _output_for_scaling(data: DataConfig, kind: str, model: dict[str, Any]) -> None:
    """The output layer suits the scaling: standardized features are centred and unbounded, so an MLP reconstructs them
    with a linear output unless the config says otherwise; kinds whose output is logistic need data in [0, 1]."""
    if data.resolved_scaling != "standard":
        return
    if kind == "mlp":
        model.setdefault("output", "linear")
        if model["output"] == "sigmoid":
            raise ValueError("model.output 'sigmoid' reconstructs values in [0, 1], but data.scaling 'standard' centres the features at 0; "
                             "use model.output = 'linear', or data.scaling = 'minmax'")
    elif kind in UNIT_OUTPUT_KINDS:
        raise ValueError(f"model.kind {kind!r} reconstructs values in [0, 1], but data.scaling 'standard' centres the features at 0; "
                         f"use data.scaling = 'minmax', or model.kind 'mlp', 'pca' or 'linear'")


def _kind(table: dict[str, Any], section: str) -> str:
    """Pop the table's ``kind`` (or its default), checking that it names one of the section's kinds."""
    kind = table.pop("kind", DEFAULT_KINDS[section])
    if kind not in KINDS[section]:
        raise ValueError(f"{section}.kind {kind!r} is not one of {sorted(KINDS[section])}")
    return kind


def _drop_keys_of_the_old_kind(values: dict[str, Any], file_kinds: dict[str, str], explicit: set[tuple[str, ...]]) -> None:
    """Where --set changed a table's kind, leave out the file's keys of that table that the new kind does not take.

    A note on stderr names them. Keys given by --set stay, so one the new kind does not take still fails, naming the keys it does.
    """
    for section, file_kind in file_kinds.items():
        table = _section(values, section)
        kind = table.get("kind", DEFAULT_KINDS[section])
        if kind == file_kind or kind not in KINDS[section]:
            continue
        config_class = KINDS[section][kind].config_class
        taken = {f.name for f in dataclasses.fields(config_class)} | set(config_class.renamed_keys) | {"kind"}
        dropped = sorted(key for key in table if key not in taken and (section, key) not in explicit)
        if dropped:
            values[section] = {key: value for key, value in table.items() if key not in dropped}
            print(f"note: {section}.kind changed from {file_kind!r} to {kind!r}: left out {', '.join(f'{section}.{key}' for key in dropped)} "
                  f"from the config file (kind {kind!r} does not take them)", file=sys.stderr)


def _other_name(section: str, key: str) -> str | None:
    """The other name of a renamed key of ``section`` (its old name for the current one, or the reverse), else None."""
    for cls in KINDS.get(section, {}).values():
        for old, new in cls.config_class.renamed_keys.items():
            if key in (old, new):
                return new if key == old else old
    return None


def load_run_config(path: str | Path | None, overrides: list[str] = (), name: str | None = None, seed: int | None = None,
                    values: dict[str, Any] | None = None) -> RunConfig:
    """The run of the TOML file at ``path``, or of the config dict ``values`` (a recipe), with ``--set`` overrides, name and seed."""
    values = copy.deepcopy(values or {})
    if path is not None:
        try:
            values = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ValueError(f"{path}: config file not found") from None
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{path}: invalid TOML ({e})") from None
    file_kinds = {section: _section(values, section).get("kind", default) for section, default in DEFAULT_KINDS.items()}
    explicit: set[tuple[str, str]] = set()
    for text in overrides:
        keys, value = parse_override(text)
        target = values
        for key in keys[:-1]:
            target = target.setdefault(key, {})
            if not isinstance(target, dict):
                raise ValueError(f"--set {text!r}: {key!r} is not a table")
        target[keys[-1]] = value
        if len(keys) == 2 and (other := _other_name(*keys)) is not None and (keys[0], other) not in explicit:
            target.pop(other, None)  # the file's value under a renamed key's other name gives way to --set
        explicit.add(tuple(keys[:2]))
    for section, *key in explicit:  # once every kind is known: `model.hidden=64,32` is a list for an MLP
        if key and isinstance(values.get(section), dict) and key[0] in values[section]:
            values[section][key[0]] = list_where_taken(_config_class(section, values[section]), key[0], values[section][key[0]])
    _drop_keys_of_the_old_kind(values, file_kinds, explicit)
    if name is not None:
        values["name"] = name
    if seed is not None:
        values.setdefault("train", {})["seed"] = seed
    return build_run_config(values)
