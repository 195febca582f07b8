"""Crash-safe training: SIGKILL at arbitrary points, --resume, and the same weights as a run never interrupted."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from aeserve.models.registry import Registry
from aeserve.training.state import LATEST, TrainingState

RUN = ["configs/digits-mlp8.toml", "--quiet", "--set", "train.epochs=40", "--set", "train.report=false"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same thread count in every run: bitwise-equal sums


def aeserve_train(registry, state_dir, *extra):
    return subprocess.Popen([sys.executable, "-m", "aeserve", "train", *RUN, "--registry", str(registry.root),
                             "--state-dir", str(state_dir), *extra], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def saved_epoch(state_dir) -> int:
    try:
        return int((state_dir / LATEST).read_text().split("-")[1])
    except (FileNotFoundError, IndexError, ValueError):
        return 0


def kill_after_epoch(process, state_dir, epoch: int) -> None:
    deadline = time.monotonic() + 120
    while saved_epoch(state_dir) < epoch and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert process.poll() is None, "the run finished before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()


@pytest.mark.slow
def test_killed_and_resumed_run_ends_with_the_same_weights(tmp_path):
    reference, interrupted = Registry(tmp_path / "reference"), Registry(tmp_path / "interrupted")
    assert aeserve_train(reference, tmp_path / "state-ref").wait() == 0
    state_dir = tmp_path / "state"
    kill_after_epoch(aeserve_train(interrupted, state_dir), state_dir, 3)
    assert interrupted.versions("digits-mlp8") == []  # nothing half-published
    kill_after_epoch(aeserve_train(interrupted, state_dir, "--resume"), state_dir, saved_epoch(state_dir) + 5)
    assert interrupted.versions("digits-mlp8") == []
    resumed = aeserve_train(interrupted, state_dir, "--resume")
    _, err = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, err.decode()
    assert "resuming digits-mlp8 after epoch" not in err.decode()  # --quiet
    assert interrupted.versions("digits-mlp8") == [1]
    assert interrupted.manifest("digits-mlp8")["sha256"] == reference.manifest("digits-mlp8")["sha256"]
    assert len(interrupted.manifest("digits-mlp8")["training"]["history"]) == 40
    assert not state_dir.exists()  # removed once the version is published


def test_a_write_interrupted_midway_leaves_the_previous_state(tmp_path, monkeypatch):
    model = torch.nn.Linear(3, 2)
    optimiser = torch.optim.Adam(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    optimiser.step()
    state = TrainingState(tmp_path, "run")
    shuffle = torch.Generator().manual_seed(0)
    state.save(1, model, optimiser, None, shuffle, [{"epoch": 1}], {})
    weights = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1)

    def killed(*args):
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr("aeserve.training.state.os.replace", killed)
    with pytest.raises(KeyboardInterrupt):
        state.save(2, model, optimiser, None, shuffle, [{"epoch": 1}, {"epoch": 2}], {})
    monkeypatch.undo()
    saved = state.load()
    assert saved["epoch"] == 1
    state.restore(saved, model, optimiser)
    torch.testing.assert_close(model.weight, weights)


def test_state_of_another_run_is_refused(tmp_path):
    model = torch.nn.Linear(2, 2)
    TrainingState(tmp_path, "run-a").save(1, model, torch.optim.Adam(model.parameters()), None, torch.Generator(), [], {})
    with pytest.raises(ValueError, match="holds the state of a different run"):
        TrainingState(tmp_path, "run-b").load()
