"""One training run's configuration: TOML file + ``--set section.key=value`` overrides, validated when built."""
from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aeserve.models.base import config_from_dict
from aeserve.models.kinds import MODEL_KINDS
from aeserve.models.projector import PROJECTOR_KINDS
from aeserve.training.data import DataConfig


@dataclass(frozen=True)
class TrainParams:
    epochs: int = 20
    batch_size: int = 256
    lr: float = 1e-3
    seed: int = 0
    weight_decay: float = 0.0
    # "onecycle": warm up then anneal (fast convergence on a fixed budget); "constant": plain Adam.
    schedule: str = "onecycle"
    # Write report/ (Markdown + PNG figures) into the version folder.
    report: bool = True

    def __post_init__(self) -> None:
        if self.epochs < 0:
            raise ValueError(f"train.epochs must be >= 0, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"train.batch_size must be >= 1, got {self.batch_size}")
        if not self.lr > 0:
            raise ValueError(f"train.lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"train.weight_decay must be >= 0, got {self.weight_decay}")
        if self.schedule not in ("onecycle", "constant"):
            raise ValueError(f"train.schedule {self.schedule!r} is not one of ['constant', 'onecycle']")


@dataclass(frozen=True)
class RunConfig:
    name: str
    data: DataConfig
    model_kind: str
    model: dict[str, Any]
    train: TrainParams
    projector_kind: str = "pca"
    projector: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "data": dataclasses.asdict(self.data),
            "model": {"kind": self.model_kind, **self.model},
            "train": dataclasses.asdict(self.train),
            "projector": {"kind": self.projector_kind, **self.projector},
        }


def parse_override(text: str) -> tuple[list[str], Any]:
    """``section.key=value`` -> (["section", "key"], value); the value is read as TOML, else kept as a string."""
    if "=" not in text:
        raise ValueError(f"--set expects section.key=value, got {text!r}")
    key, raw = text.split("=", 1)
    path = key.strip().split(".")
    if not all(path):
        raise ValueError(f"--set expects section.key=value, got {text!r}")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return path, value


def _section(values: dict[str, Any], key: str) -> dict[str, Any]:
    section = values.get(key, {})
    if not isinstance(section, dict):
        raise ValueError(f"[{key}] must be a table, got {section!r}")
    return dict(section)


def build_run_config(values: dict[str, Any]) -> RunConfig:
    """Validate a config dict (as read from TOML). Errors name the bad key or value and what is allowed."""
    unknown = sorted(set(values) - {"name", "data", "model", "train", "projector"})
    if unknown:
        raise ValueError(f"unknown top-level key(s) {unknown}; allowed: ['data', 'model', 'name', 'projector', 'train']")
    model = _section(values, "model")
    kind = model.pop("kind", "mlp")
    if kind not in MODEL_KINDS:
        raise ValueError(f"model.kind {kind!r} is not one of {sorted(MODEL_KINDS)}")
    config_from_dict(MODEL_KINDS[kind].config_class, model)  # validate now, before any data is loaded
    projector = _section(values, "projector")
    projector_kind = projector.pop("kind", "pca")
    if projector_kind not in PROJECTOR_KINDS:
        raise ValueError(f"projector.kind {projector_kind!r} is not one of {sorted(PROJECTOR_KINDS)}")
    config_from_dict(PROJECTOR_KINDS[projector_kind].config_class, projector)
    name = values.get("name")
    if not name:
        raise ValueError("the config needs a name (top-level `name = ...` or --name)")
    return RunConfig(
        name=str(name),
        data=config_from_dict(DataConfig, _section(values, "data")),
        model_kind=kind,
        model=model,
        train=config_from_dict(TrainParams, _section(values, "train")),
        projector_kind=projector_kind,
        projector=projector,
    )


def load_run_config(path: str | Path | None, overrides: list[str] = (), name: str | None = None, seed: int | None = None) -> RunConfig:
    values: dict[str, Any] = {}
    if path is not None:
        try:
            values = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ValueError(f"{path}: config file not found") from None
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{path}: invalid TOML ({e})") from None
    for text in overrides:
        keys, value = parse_override(text)
        target = values
        for key in keys[:-1]:
            target = target.setdefault(key, {})
            if not isinstance(target, dict):
                raise ValueError(f"--set {text!r}: {key!r} is not a table")
        target[keys[-1]] = value
    if name is not None:
        values["name"] = name
    if seed is not None:
        values.setdefault("train", {})["seed"] = seed
    return build_run_config(values)
