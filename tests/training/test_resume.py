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


def leftovers(registry, name):
    folder = registry.root / name
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_a_run_that_fails_after_training_leaves_no_lock_and_resumes_with_the_report_turned_off(tmp_path, monkeypatch):
    from aeserve.training.trainer import train
    from tests.conftest import digits_run

    reference, registry, state_dir = Registry(tmp_path / "reference"), Registry(tmp_path / "registry"), tmp_path / "state"
    train(digits_run("run", "mlp", epochs=3), reference, progress=False)

    def broken_map_sample(*args):
        raise RuntimeError("the map sample broke")

    monkeypatch.setattr("aeserve.training.trainer.map_sample", broken_map_sample)
    with pytest.raises(RuntimeError, match="the map sample broke"):
        train(digits_run("run", "mlp", epochs=3), registry, progress=False, state_dir=state_dir)
    monkeypatch.undo()
    assert registry.versions("run") == [] and leftovers(registry, "run") == []  # no lock, no half-written version
    assert saved_epoch(state_dir) == 3
    # The report does not shape the training: the same run continues after its last epoch, with nothing to train.
    assert train(digits_run("run", "mlp", epochs=3, report=False), registry, progress=False, state_dir=state_dir, resume=True) == 1
    assert registry.manifest("run")["sha256"] == reference.manifest("run")["sha256"]
    assert len(registry.manifest("run")["training"]["history"]) == 3
    assert leftovers(registry, "run") == ["1", "aliases.json"] and not state_dir.exists()


def test_a_run_that_fails_mid_training_resumes_or_reruns_to_the_same_weights(tmp_path, monkeypatch):
    from aeserve.training import trainer
    from tests.conftest import digits_run

    config = digits_run("run", "mlp", epochs=3)  # 360 training rows in batches of 64: 6 steps an epoch
    reference, registry, state_dir = Registry(tmp_path / "reference"), Registry(tmp_path / "registry"), tmp_path / "state"
    trainer.train(config, reference, progress=False)
    real_loss_step = trainer.loss_step

    def failing_in_epoch_2(model):
        step, calls = real_loss_step(model), []

        def counted(batch):
            calls.append(1)
            if len(calls) == 8:
                raise RuntimeError("failed in epoch 2")
            return step(batch)
        return counted

    monkeypatch.setattr(trainer, "loss_step", failing_in_epoch_2)
    with pytest.raises(RuntimeError, match="failed in epoch 2"):
        trainer.train(config, registry, progress=False, state_dir=state_dir)
    monkeypatch.undo()
    assert saved_epoch(state_dir) == 1 and leftovers(registry, "run") == []
    assert trainer.train(config, registry, progress=False, state_dir=state_dir, resume=True) == 1
    assert trainer.train(config, registry, progress=False, state_dir=state_dir) == 2  # a plain rerun starts afresh
    for version in (1, 2):
        assert registry.manifest("run", version)["sha256"] == reference.manifest("run")["sha256"]
    assert ".lock" not in leftovers(registry, "run") and not state_dir.exists()


def test_a_data_error_leaves_nothing_behind_and_the_rerun_works(tmp_path, capsys):
    from aeserve.cli import main

    rows = tmp_path / "rows.csv"
    rows.write_text("\n".join(",".join(str((i * 7 + j) % 11) for j in range(5)) for i in range(60)) + "\n1,2,x,4,5\n")
    config = tmp_path / "rows.toml"
    config.write_text(f'name = "rows"\n[data]\nsource = "csv"\npath = "{rows}"\n[model]\nkind = "mlp"\ncode_dim = 2\nhidden = [8]\n'
                      "[train]\nepochs = 2\nreport = false\n")
    registry, state_dir = Registry(tmp_path / "registry"), tmp_path / "state"
    command = ["train", str(config), "--registry", str(registry.root), "--state-dir", str(state_dir), "--quiet"]
    assert main(command) == 2
    assert f"{rows}: line 61" in capsys.readouterr().err
    assert leftovers(registry, "rows") == [] and not state_dir.exists()
    rows.write_text(rows.read_text().replace("x", "3"))
    assert main(command) == 0 and main([*command, "--resume"]) == 0
    assert registry.versions("rows") == [1, 2] and leftovers(registry, "rows") == ["1", "2", "aliases.json"] and not state_dir.exists()


def test_the_command_says_where_a_failed_run_left_its_state_and_resume_finishes_it(tmp_path, capsys, monkeypatch):
    from aeserve.cli import main

    def broken_map_sample(*args):
        raise RuntimeError("the map sample broke")

    state_dir = tmp_path / "state"
    command = ["train", "configs/digits-mlp8.toml", "--registry", str(tmp_path / "registry"), "--state-dir", str(state_dir), "--quiet",
               "--set", "train.epochs=1", "--set", "data.limit=200"]
    monkeypatch.setattr("aeserve.training.trainer.map_sample", broken_map_sample)
    assert main(command) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"note: the training state is kept in {state_dir}; the same command with --resume continues from it", "error: the map sample broke"]
    monkeypatch.undo()
    assert main([*command, "--resume", "--set", "train.report=false"]) == 0
    assert Registry(tmp_path / "registry").versions("digits-mlp8") == [1] and not state_dir.exists()


def test_an_unreadable_state_is_named(tmp_path):
    (tmp_path / LATEST).write_text("epoch-0003")
    with pytest.raises(ValueError, match=f"{tmp_path} holds an unreadable training state .*; remove it, or train without --resume"):
        TrainingState(tmp_path, "run").load()


def test_resume_finds_an_interrupted_run_in_its_own_default_folder(tmp_path, capsys, monkeypatch):
    from pathlib import Path

    from aeserve.cli import main

    def broken_map_sample(*args):
        raise RuntimeError("the map sample broke")

    monkeypatch.chdir(tmp_path)
    config = Path(__file__).resolve().parents[2] / "configs/digits-mlp8.toml"
    command = ["train", str(config), "--registry", "registry", "--set", "train.epochs=1", "--set", "data.limit=200"]
    with monkeypatch.context() as patched:
        patched.setattr("aeserve.training.trainer.map_sample", broken_map_sample)
        assert main([*command, "--quiet"]) == 2
    note, error = capsys.readouterr().err.splitlines()
    folder = Path(note.removeprefix("note: the training state is kept in ").removesuffix("; the same command with --resume continues from it"))
    assert folder.parent == Path(".aeserve/state/digits-mlp8") and len(folder.name) == 16 and (folder / LATEST).is_file()
    # Another seed is another run: it does not take the interrupted run's state, and says whose states are there.
    assert main([*command, "--quiet", "--resume", "--seed", "1", "--set", "train.report=false"]) == 0
    assert capsys.readouterr().err.startswith("note: nothing saved for this config and data in .aeserve/state/digits-mlp8/")
    assert (folder / LATEST).is_file()
    assert main([*command, "--resume", "--set", "train.report=false"]) == 0
    assert f"resuming digits-mlp8 after epoch 1 from {folder}" in capsys.readouterr().err
    assert Registry("registry").versions("digits-mlp8") == [1, 2] and not Path(".aeserve/state/digits-mlp8").exists()
