"""Runs of one name started in one folder: each has its own training state, and one that would share another's
gets a one-line error while the other lives."""
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from aeserve.cli import main
from aeserve.models.registry import Registry
from aeserve.training.config import load_run_config
from aeserve.training.data.sources import load_dataset
from aeserve.training.state import LOCK, TrainingState, run_fingerprint, run_state_folder

ROOT = Path(__file__).resolve().parents[2]
CONFIG, OVERRIDES = str(ROOT / "configs/digits-mlp8.toml"), ["train.epochs=2", "train.report=false", "data.limit=200"]


def digits_command(registry, *extra):
    return ["train", CONFIG, "--quiet", *(f"--set={o}" for o in OVERRIDES), "--registry", str(registry), *extra]


def held_folder(seed: int = 0) -> TrainingState:
    """The state of the run ``digits_command`` starts, in its default folder (as the command works it out)."""
    config = load_run_config(CONFIG, OVERRIDES, seed=seed)
    fingerprint = run_fingerprint(config.to_dict(), load_dataset(config.data).fingerprint)
    return TrainingState(run_state_folder(f".aeserve/state/{config.name}", fingerprint), fingerprint)


def test_two_runs_of_one_name_with_other_seeds_train_side_by_side_in_one_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # Both runs reach their first save before either goes on: they are mid-training at the same moment.
    both_training, folders = threading.Barrier(2, timeout=60), []
    save = TrainingState.save

    def save_together(self, epoch, *args):
        if epoch == 1:
            folders.append(self.folder)
            both_training.wait()
        save(self, epoch, *args)

    monkeypatch.setattr(TrainingState, "save", save_together)
    codes = {}
    runs = [threading.Thread(target=lambda seed=seed: codes.setdefault(seed, main(digits_command("registry", "--seed", str(seed)))))
            for seed in (1, 2)]
    for run in runs:
        run.start()
    for run in runs:
        run.join()
    assert codes == {1: 0, 2: 0}
    assert len(set(folders)) == 2 and {f.parent for f in folders} == {Path(".aeserve/state/digits-mlp8")}
    registry = Registry("registry")
    assert registry.versions("digits-mlp8") == [1, 2]
    assert sorted(registry.manifest("digits-mlp8", v)["training"]["seed"] for v in (1, 2)) == [1, 2]
    assert not Path(".aeserve/state/digits-mlp8").exists()  # each run removed its own state, then the name's folder


def test_a_second_identical_run_gets_a_clear_error_while_the_first_holds_its_state(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    first = held_folder()
    with first.locked("digits-mlp8"):
        assert main(digits_command("registry")) == 2
        assert capsys.readouterr().err.splitlines() == [
            f"error: another run of digits-mlp8 with the same config and data (pid {os.getpid()}) is training with the state "
            f"folder {first.folder}; wait for it to finish, or start this one with another --seed or --state-dir"]
        assert first.folder.is_dir()  # the refused run took nothing away from the first
        assert main(digits_command("registry", "--seed", "7")) == 0  # another seed: another folder
    assert main(digits_command("registry")) == 0  # the first is done: the same command runs
    assert Registry("registry").versions("digits-mlp8") == [1, 2] and not Path(".aeserve").joinpath("state", "digits-mlp8").exists()


def test_an_explicit_state_dir_is_locked_the_same_way(tmp_path, capsys):
    state_dir = tmp_path / "state"
    other = TrainingState(state_dir, "a run of another config")
    with other.locked("other"):
        assert main(digits_command(tmp_path / "registry", "--state-dir", str(state_dir))) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: another run (other, pid {os.getpid()}, another config or data) is training with the state folder {state_dir}; "
        "wait for it to finish, or give this run another --state-dir"]
    assert main(digits_command(tmp_path / "registry", "--state-dir", str(state_dir))) == 0
    assert not state_dir.exists()


def test_the_lock_of_a_killed_run_is_released_by_the_system(tmp_path):
    state = TrainingState(tmp_path / "state", "run")
    state.folder.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time\n"
                               f"fd = os.open({str(state.folder / LOCK)!r}, os.O_RDWR | os.O_CREAT)\n"
                               "fcntl.flock(fd, fcntl.LOCK_EX)\nprint('held', flush=True)\ntime.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(RuntimeError, match="pid unknown"), state.locked("run"):
            pass
    finally:
        holder.kill()
        holder.wait()
    with state.locked("run"):  # killed: its lock went with it
        assert (state.folder / LOCK).is_file()
    assert not (state.folder / LOCK).exists()


@pytest.mark.slow
def test_two_aeserve_train_processes_of_one_name_in_one_folder_both_publish(tmp_path):
    np.save(tmp_path / "small.npy", np.random.default_rng(0).normal(size=(2000, 16)).astype(np.float32))
    command = [sys.executable, "-m", "aeserve", "train", "--data", "small.npy", "--name", "same", "--registry", "R", "--quiet",
               "--set", "train.epochs=30", "--set", "train.patience=0", "--set", "train.report=false"]
    runs = [subprocess.Popen([*command, "--seed", str(seed)], cwd=tmp_path, stderr=subprocess.PIPE, text=True) for seed in (1, 2)]
    for run in runs:
        _, err = run.communicate(timeout=300)
        assert run.returncode == 0, err
    assert Registry(tmp_path / "R").versions("same") == [1, 2]
