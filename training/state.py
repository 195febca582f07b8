"""Crash-safe training state: what a run needs to continue after a kill, saved after every epoch.

``<folder>/epoch-NNNN/{state.safetensors,state.json}`` plus ``<folder>/LATEST``
naming the newest complete one. Each epoch's state is written and synced in
its own folder, then LATEST is replaced atomically, so a kill at any point
leaves the previous complete state. Tensors (model, optimiser, RNG states)
go to safetensors, everything else to JSON; nothing is pickled.

A run holds its folder with an exclusive lock on ``<folder>/.lock`` while it
trains, so two runs never write one state. ``aeserve train`` gives each run a
folder of its own by default, ``.aeserve/state/NAME/RUN``, RUN being the start
of the run's fingerprint (its config and data): runs of one name with another
seed, config or data never meet, and the same command finds its state again.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from filelock import Timeout

from aeserve.models.registry import exclusive_lock, fsync_dir, write_synced

LATEST = "LATEST"
LOCK = ".lock"
RUN_FOLDER_CHARS = 16  # hex digits of the run fingerprint that name a run's default state folder
# Config keys that only shape what happens after training (the registry name, the report, the map's projector):
# a run resumed with them changed, say with the report turned off after it failed, continues the same training.
AFTER_TRAINING = ("name", "projector", "train.report")


def run_fingerprint(run_config: dict[str, Any], data_fingerprint: str) -> str:
    """Names the run a state belongs to: the config of the training itself and the exact data."""
    training = {key: dict(value) if isinstance(value, dict) else value for key, value in run_config.items() if key not in AFTER_TRAINING}
    for key in AFTER_TRAINING:
        section, _, name = key.partition(".")
        if name and isinstance(training.get(section), dict):
            training[section].pop(name, None)
    return hashlib.sha256((json.dumps(training, sort_keys=True) + data_fingerprint).encode()).hexdigest()


def run_state_folder(root: str | os.PathLike[str], fingerprint: str) -> Path:
    """A run's own state folder under ``root`` (``.aeserve/state/NAME``): named by its fingerprint, so the same
    command with ``--resume`` finds it again and a run with another seed, config or data gets another one."""
    return Path(root) / fingerprint[:RUN_FOLDER_CHARS]


class RunInProgress(RuntimeError):
    """Another live run holds the state folder."""


class TrainingState:
    def __init__(self, folder: str | os.PathLike[str], fingerprint: str) -> None:
        self.folder = Path(folder)
        self.fingerprint = fingerprint

    def save(self, epoch: int, model: torch.nn.Module, optimiser: torch.optim.Optimizer, scheduler: Any,
             shuffle: torch.Generator, history: list[dict[str, float]], prepare_facts: dict[str, Any]) -> None:
        """Write the state after ``epoch`` (1-based) and make it the latest."""
        tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        optimiser_state = optimiser.state_dict()
        scalars: dict[str, dict[str, Any]] = {}
        for index, values in optimiser_state["state"].items():
            for key, value in values.items():
                if torch.is_tensor(value):
                    tensors[f"optimiser.{index}.{key}"] = value.detach().cpu().contiguous()
                else:
                    scalars.setdefault(str(index), {})[key] = value
        tensors["rng.torch"] = torch.get_rng_state()
        tensors["rng.shuffle"] = shuffle.get_state()
        document = {
            "fingerprint": self.fingerprint, "epoch": epoch, "history": history, "prepare": prepare_facts,
            "optimiser_param_groups": optimiser_state["param_groups"], "optimiser_scalars": scalars,
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
        }
        self.folder.mkdir(parents=True, exist_ok=True)
        name = f"epoch-{epoch:04d}"
        tmp = Path(tempfile.mkdtemp(dir=self.folder, prefix=f".{name}-"))
        write_synced(tmp / "state.safetensors", safetensors.torch.save(tensors))
        write_synced(tmp / "state.json", json.dumps(document).encode())
        fsync_dir(tmp)
        target = self.folder / name
        shutil.rmtree(target, ignore_errors=True)
        os.rename(tmp, target)
        pointer = self.folder / f".{LATEST}.tmp"
        write_synced(pointer, name.encode())
        os.replace(pointer, self.folder / LATEST)
        fsync_dir(self.folder)
        for old in self.folder.iterdir():  # older epochs and leftovers of interrupted writes
            if old.name not in (name, LATEST, LOCK):
                shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)

    def load(self) -> dict[str, Any] | None:
        """The latest complete state, or None. Raises ValueError if it belongs to another run."""
        pointer = self.folder / LATEST
        if not pointer.is_file():
            return None
        folder = self.folder / pointer.read_text().strip()
        try:
            document = json.loads((folder / "state.json").read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{self.folder} holds an unreadable training state ({type(e).__name__}: {e}); "
                             "remove it, or train without --resume") from None
        if document["fingerprint"] != self.fingerprint:
            raise ValueError(f"{self.folder} holds the state of a different run (other config or data); "
                             "remove it, or train without --resume")
        document["tensors"] = safetensors.torch.load_file(folder / "state.safetensors")
        return document

    def restore(self, saved: dict[str, Any], model: torch.nn.Module, optimiser: torch.optim.Optimizer | None = None,
                scheduler: Any = None, shuffle: torch.Generator | None = None) -> None:
        tensors = saved["tensors"]
        model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
        if optimiser is not None:
            state: dict[int, dict[str, Any]] = {}
            for key, value in tensors.items():
                if key.startswith("optimiser."):
                    _, index, name = key.split(".", 2)
                    state.setdefault(int(index), {})[name] = value
            for index, values in saved["optimiser_scalars"].items():
                state.setdefault(int(index), {}).update(values)
            optimiser.load_state_dict({"state": state, "param_groups": saved["optimiser_param_groups"]})
        if scheduler is not None and saved["scheduler"] is not None:
            scheduler.load_state_dict(saved["scheduler"])
        if shuffle is not None:
            shuffle.set_state(tensors["rng.shuffle"])
        torch.set_rng_state(tensors["rng.torch"])

    def clear(self) -> None:
        """Remove the saved state, keeping the lock file that this run holds."""
        if self.folder.is_dir():
            for entry in self.folder.iterdir():
                if entry.name != LOCK:
                    shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)

    def remove(self) -> None:
        """Remove the folder with everything in it (the run is published)."""
        shutil.rmtree(self.folder, ignore_errors=True)

    @contextmanager
    def locked(self, name: str) -> Iterator[None]:
        """Hold the folder for the run ``name`` while the block runs; RunInProgress if another live run holds it.

        An exclusive lock on ``<folder>/.lock`` (``exclusive_lock``): the kernel releases it when the process ends,
        however it ends, so a killed run leaves no stale lock. The holder writes its pid, name and fingerprint into the
        file for the other run's message: filelock keeps no holder's pid for a flock, only for its soft locks.
        """
        path = self.folder / LOCK

        def name_the_holder(fd: int) -> None:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps({"pid": os.getpid(), "name": name, "fingerprint": self.fingerprint}).encode(), 0)

        with ExitStack() as held:
            while True:
                try:
                    held.enter_context(exclusive_lock(path, blocking=False, on_acquired=name_the_holder))
                    break
                except Timeout:
                    holder = _holder(path)
                    if holder is not None:
                        raise RunInProgress(self._in_use(name, holder)) from None
                    # The holder finished and removed the file between our open and our lock: try the path's file now.
            yield

    def _in_use(self, name: str, holder: dict[str, Any]) -> str:
        pid = f"pid {holder['pid']}" if "pid" in holder else "pid unknown"
        if holder.get("fingerprint", self.fingerprint) == self.fingerprint:
            return (f"another run of {name} with the same config and data ({pid}) is training with the state folder "
                    f"{self.folder}; wait for it to finish, or start this one with another --seed or --state-dir")
        return (f"another run ({holder.get('name', '?')}, {pid}, another config or data) is training with the state folder "
                f"{self.folder}; wait for it to finish, or give this run another --state-dir")


def _holder(path: Path) -> dict[str, Any] | None:
    """What the lock file says of its holder: empty when the holder has not written it yet, None when the file is gone."""
    try:
        holder = json.loads(path.read_bytes() or b"{}")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return holder if isinstance(holder, dict) else {}
