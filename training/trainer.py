"""Offline training: data -> model -> held-out metrics -> a new immutable registry version."""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from tqdm import tqdm

from aeserve.models.base import Autoencoder
from aeserve.models.checkpoint import weights_bytes
from aeserve.models.export import graphs_for_serving
from aeserve.models.kinds import build_model
from aeserve.models.outputs import INT8_SCALE_QUANTILE, CodeQuantization
from aeserve.models.projector import build_projector, projector_manifest
from aeserve.models.registry import Registry
from aeserve.models.version import ModelVersion
from aeserve.training.anomaly import fit_anomaly
from aeserve.training.config import RunConfig
from aeserve.training.data.dataset import DataError, Dataset
from aeserve.training.data.rows import ModelRows
from aeserve.training.data.sources import load_dataset
from aeserve.training.distributed import current_world, loss_step
from aeserve.training.evaluate import (
    EVAL_BATCH,
    bounded_sample,
    encode_all,
    held_out_metrics,
    map_metric_rows,
    map_metrics,
    pca_baseline,
    reconstruction_errors,
    worse_than_pca,
)
from aeserve.training.report import MAP_SAMPLE, REPORT_DIR, map_sample, render_report
from aeserve.training.state import LATEST, TrainingState, run_fingerprint, run_state_folder

log = logging.getLogger("aeserve.training")
# A training step smaller than this (batch rows x parameters) runs on one thread: at that size a second thread's
# hand-offs cost more than it saves, and far more when another process holds the other core (docs/benchmarks.md,
# "Zero-config recipes").
ONE_THREAD_STEP = 2**24


class BestEpoch(NamedTuple):
    """Early stopping's best epoch so far: its validation error, its number and its weights (a copy of the state dict)."""

    val_sq_err: float
    epoch: int
    weights: dict[str, torch.Tensor]


def split_validation(n: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded split of ``n`` training examples: (training indices, validation indices)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = int(n * fraction)
    return order[n_val:], order[:n_val]


def fit(model: torch.nn.Module, x_train: torch.Tensor | ModelRows, x_val: torch.Tensor | ModelRows, config: RunConfig, progress: bool = True,
        state: TrainingState | None = None, saved: dict[str, Any] | None = None,
        prepare_facts: dict[str, Any] | None = None) -> list[dict[str, float]]:
    """Gradient training of whatever parameters the model has; returns per-epoch history.

    x_train, x_val: (n, input_dim) float32 in model space, as tensors or as ModelRows that scale each batch's rows
    when it is drawn (a memory-mapped training set is then read batch by batch, never copied whole; a lazily decoded
    image folder's batches are decoded by DataLoader worker processes, in the same order whatever their number).

    With ``state``, the training state is saved after every epoch; with ``saved`` (a state
    loaded from it), training continues after the saved epoch exactly as if never stopped.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    train = config.train
    if not params or train.epochs == 0:
        return []
    optimiser = torch.optim.Adam(params, lr=train.lr, weight_decay=train.weight_decay)
    steps_per_epoch = math.ceil(len(x_train) / train.batch_size)
    scheduler = (
        torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=train.lr, total_steps=train.epochs * steps_per_epoch)
        if train.schedule == "onecycle" else None
    )
    shuffle = torch.Generator().manual_seed(train.seed + 1)
    world = current_world()
    progress = progress and world.is_main
    bars = progress and sys.stderr.isatty()  # elsewhere (a log, CI) one line per epoch, without a bar's redraws
    step = loss_step(model)
    history, first_epoch = [], 1
    if saved is not None:
        state.restore(saved, model, optimiser, scheduler, shuffle)
        history, first_epoch = list(saved["history"]), saved["epoch"] + 1
    # Early stopping keeps the best epoch so far (a resumed run counts from where it resumes).
    stopping = bool(train.patience and len(x_val))
    best = BestEpoch(history[-1]["val_sq_err"] if history else math.inf, first_epoch - 1, _copy_weights(model) if stopping else {})
    started = time.monotonic()
    with one_thread_when_small(train.batch_size * sum(p.numel() for p in params)):
        for epoch in range(first_epoch, train.epochs + 1):
            model.train()
            order = torch.randperm(len(x_train), generator=shuffle)  # the same order on every rank
            draws = []
            for start in range(0, len(x_train), train.batch_size):
                rows = order[start:start + train.batch_size]
                if len(rows) < world.size:
                    break  # a last batch too small to give every rank a row
                draws.append(rows[world.rank::world.size])
            # The epoch's batches known up front: an image folder decoded lazily decodes them ahead in worker processes.
            batches = x_train.batches(draws) if isinstance(x_train, ModelRows) else (x_train[rows] for rows in draws)
            total, seen = 0.0, 0
            bar = tqdm(batches, total=len(draws), desc=f"epoch {epoch}/{train.epochs}", disable=not bars, leave=False, file=sys.stderr)
            with contextlib.closing(batches):  # stops a lazy folder's workers even when a step fails
                for batch in bar:
                    loss = step(batch)
                    optimiser.zero_grad(set_to_none=True)
                    loss.backward()
                    optimiser.step()
                    if scheduler is not None:
                        scheduler.step()
                    total += loss.item() * len(batch)
                    seen += len(batch)
                    bar.set_postfix(loss=f"{total / seen:.4f}")
            record = {"epoch": epoch, "train_loss": total / seen}
            if len(x_val):
                record["val_sq_err"] = float(reconstruction_errors(model, x_val).mean())
            history.append(record)
            if state is not None and world.is_main:
                state.save(epoch, model, optimiser, scheduler, shuffle, history, prepare_facts or {})
            if progress:
                print(f"epoch {epoch}/{train.epochs}  " + "  ".join(f"{k} {v:.4f}" for k, v in record.items() if k != "epoch")
                      + time_left(time.monotonic() - started, epoch - first_epoch + 1, train.epochs - epoch), file=sys.stderr)
            if stopping:
                if record["val_sq_err"] < best.val_sq_err:
                    best = BestEpoch(record["val_sq_err"], epoch, _copy_weights(model))
                elif epoch - best.epoch >= train.patience:
                    break
    if stopping and best.epoch < history[-1]["epoch"]:
        model.load_state_dict(best.weights)
        if progress:
            print(f"stopped after epoch {history[-1]['epoch']}; kept the weights of epoch {best.epoch} (val_sq_err {best.val_sq_err:.4f})",
                  file=sys.stderr)
    return history


@contextlib.contextmanager
def one_thread_when_small(step_size: int) -> Iterator[None]:
    """Run the block on one intra-op thread when a step's size (batch rows x parameters) is under ONE_THREAD_STEP."""
    threads = torch.get_num_threads()
    if step_size < ONE_THREAD_STEP:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def time_left(seconds: float, epochs_done: int, epochs_left: int) -> str:
    """'  about 3 min left' from the mean time of the epochs run so far (early stopping may end sooner)."""
    if epochs_left <= 0:
        return ""
    left = seconds / epochs_done * epochs_left
    return f"  about {left:.0f} s left" if left < 90 else f"  about {left / 60:.0f} min left"


# How sure the validation rows must be that the trained network beats closed-form PCA before it is published: its mean
# error lower by at least this many standard errors of the per-row differences (a one-sided paired test at about 2.5 %).
# Its validation error is the least over the epochs (early stopping kept that epoch), so it is biased low; on a few
# dozen validation rows a network that looked better was often worse on the test rows (docs/benchmarks.md,
# "Zero-config recipes"). PCA is the one to beat, and the one to keep when the rows cannot tell.
NETWORK_MARGIN = 2.0


def prefer_pca(model: Autoencoder, x_train: torch.Tensor | ModelRows, x_val: torch.Tensor | ModelRows) -> tuple[Autoencoder, dict[str, Any]]:
    """The model to publish: ``model``, or closed-form PCA with its code size fitted on the same training rows unless the
    validation rows (n, input_dim, model space) show ``model`` better by NETWORK_MARGIN standard errors; with the facts
    for the manifest's ``training.recipe_choice``. The test rows play no part: they measure the version chosen."""
    if not len(x_val):
        return model, {"chosen": model.kind, "why": "no validation rows to compare with closed-form PCA (data.val_fraction is 0)"}
    pca = pca_baseline(x_train, model.code_dim).eval()
    per_row = {model.kind: reconstruction_errors(model, x_val), "pca": reconstruction_errors(pca, x_val)}
    errors = {kind: float(e.mean()) for kind, e in per_row.items()}
    gain = per_row["pca"] - per_row[model.kind]  # > 0 where the network reconstructs a row better
    spread = float(gain.std(ddof=1) / math.sqrt(len(gain))) if len(gain) > 1 else 0.0
    margin = float(gain.mean()) / spread if spread > 0 else math.copysign(math.inf, float(gain.mean())) if gain.mean() else 0.0
    chosen = model if margin >= NETWORK_MARGIN else pca
    if chosen is model:
        why = f"validation sq err {errors['pca']:.4g} (PCA) > {errors[model.kind]:.4g} ({model.kind}), by {margin:.3g} standard errors"
    elif errors["pca"] <= errors[model.kind]:
        why = f"validation sq err {errors['pca']:.4g} (PCA) <= {errors[model.kind]:.4g} ({model.kind})"
    else:
        why = (f"validation sq err {errors['pca']:.4g} (PCA) against {errors[model.kind]:.4g} ({model.kind}): lower by {margin:.3g} "
               f"standard errors over {len(gain)} rows, under the {NETWORK_MARGIN:g} asked of a network")
    return chosen, {"chosen": chosen.kind, "why": why, "val_sq_err": errors, "val_rows": int(len(x_val)), "trained": model.kind,
                    "margin": round(margin, 3) if math.isfinite(margin) else None}


def _copy_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


@torch.inference_mode()
def project_codes(projector: torch.nn.Module, codes: torch.Tensor) -> np.ndarray:
    """Map coordinates (n, 2), numpy, of codes (n, code_dim), in chunks."""
    return torch.cat([projector(codes[i:i + EVAL_BATCH]) for i in range(0, len(codes), EVAL_BATCH)]).numpy()


def train_fold(published: Autoencoder, config: RunConfig, rows: torch.Tensor, epochs: int, seed: int) -> Autoencoder:
    """A model of ``published``'s kind and config, prepared and trained on ``rows`` (n, input_dim) alone with the run's
    recipe for ``epochs`` epochs (no validation rows, no early stopping): a cross-fit's fold model."""
    torch.manual_seed(seed)
    model = build_model(published.kind, published.config_dict(), published.input_shape)
    model.prepare(rows)
    fold = dataclasses.replace(config, train=dataclasses.replace(config.train, epochs=epochs, patience=0, seed=seed))
    fit(model, rows, rows[:0], fold, progress=False)
    return model


def fit_projector(code_dim: int, training_codes: torch.Tensor, config: RunConfig) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The map's projector, fitted on the training codes (n, code_dim). A 2-D (or 1-D) code is its own map."""
    kind = config.projector_kind if code_dim > 2 else "pca"
    projector = build_projector(kind, code_dim, config.projector if kind == config.projector_kind else {})
    with torch.enable_grad():
        facts = projector.fit(training_codes.clone())
    return projector.eval(), facts


def train(config: RunConfig, registry: Registry, progress: bool = True, dataset: Dataset | None = None,
          state_dir: str | Path | None = None, resume: bool = False, per_run_state: bool = False) -> int | None:
    """Train one run and publish it; returns the new version number. Nothing is written if any step fails.

    Under torch.distributed every rank trains; only rank 0 publishes (the others return None).
    With ``state_dir`` the training state is saved there after every epoch (and removed once the
    version is published); ``resume`` continues from it after a crash or kill. With ``per_run_state``
    the state goes to the run's own folder under ``state_dir`` (``state.run_state_folder``). Rank 0
    holds the state folder locked throughout: another run asking for it meanwhile gets RunInProgress.
    """
    started = time.perf_counter()
    dataset = dataset or load_dataset(config.data)
    if len(dataset.test_x) == 0:
        raise DataError("no rows are held out for testing (data.test_fraction is 0 and the data has no test split of its own): "
                        "a version's metrics and anomaly percentiles are measured on them; set data.test_fraction above 0")
    if state_dir is None:
        return _train_and_publish(config, registry, progress, dataset, None, resume, started)
    # The folder needs the run's fingerprint, so the data's: known only now that the data is read.
    fingerprint = run_fingerprint(config.to_dict(), dataset.fingerprint)
    state = TrainingState(run_state_folder(state_dir, fingerprint) if per_run_state else state_dir, fingerprint)
    if not current_world().is_main:  # rank 0 writes the state and holds its lock; the others only read it to resume
        return _train_and_publish(config, registry, progress, dataset, state, resume, started)
    with state.locked(config.name):
        if resume and per_run_state and not (state.folder / LATEST).is_file():
            others = sorted(p.name for p in state.folder.parent.iterdir() if (p / LATEST).is_file())
            if others:
                print(f"note: nothing saved for this config and data in {state.folder}; the states of {state_dir} "
                      f"({', '.join(others)}) belong to runs with another config, seed or data; training from the start", file=sys.stderr)
        try:
            version = _train_and_publish(config, registry, progress, dataset, state, resume, started)
        except BaseException:
            if not resume and (state.folder / LATEST).is_file():
                print(f"note: the training state is kept in {state.folder}; the same command with --resume continues from it", file=sys.stderr)
            raise
    if per_run_state:
        with contextlib.suppress(OSError):  # the name's folder goes once no run of it keeps a state there
            state.folder.parent.rmdir()
    return version


def _train_and_publish(config: RunConfig, registry: Registry, progress: bool, dataset: Dataset, state: TrainingState | None,
                       resume: bool, started: float) -> int | None:
    preprocessing = dataset.preprocessing
    # Rows are scaled to model space as they are read, batch by batch: a memory-mapped source is never copied whole.
    x_all, x_test = ModelRows(dataset.train_x, preprocessing), ModelRows(dataset.test_x, preprocessing)
    train_index, val_index = split_validation(len(x_all), config.data.val_fraction, config.train.seed)
    x_train, x_val = x_all.subset(train_index), x_all.subset(val_index)
    # The steps that need rows at once (prepare, the projector, kind-specific metrics) get every training row when
    # they fit in memory, else a seeded sample; the manifest records its size as training.sample_rows.
    sample_index = bounded_sample(train_index.numpy(), preprocessing.input_dim, config.train.seed)
    sampled = len(sample_index) < len(train_index)

    saved = None
    if state is not None:
        saved = state.load() if resume else None
        if saved is None and current_world().is_main:
            state.clear()

    torch.manual_seed(config.train.seed)
    model = build_model(config.model_kind, config.model, preprocessing.input_shape)
    if saved is not None:
        state.restore(saved, model)  # prepared and partly trained: no need to prepare again
        prepare_facts = saved["prepare"]
        if progress:
            print(f"resuming {config.name} after epoch {saved['epoch']} from {state.folder}", file=sys.stderr)
    else:
        prepare_facts = model.prepare(x_all.subset(sample_index).tensor())
    history = fit(model, x_train, x_val, config, progress, state, saved, prepare_facts)
    world = current_world()
    if not world.is_main:
        return None
    model.eval()
    prepare_facts = {**prepare_facts, **model.finish()}  # what the trained weights determine (coding tables, say)
    recipe_choice = None
    if config.train.pca_fallback:
        model, recipe_choice = prefer_pca(model, x_train, x_val)
    metrics = held_out_metrics(model, x_train, x_test, x_val)
    metrics["worse_than_pca"] = worse_than_pca(metrics)
    metrics.update(model.extra_metrics(x_test.subset(bounded_sample(np.arange(len(x_test)), preprocessing.input_dim, config.train.seed)).tensor()))
    # The map: fitted on the training codes and scored against every training row's code, or on the sample's alone.
    codes = encode_all(model, x_all.subset(sample_index) if sampled else x_all)
    training_codes = codes if sampled else codes[train_index]
    projector, projector_facts = fit_projector(model.code_dim, training_codes, config)
    # Compact codes' constants (int8 scale, binary threshold), fitted on the same training codes.
    code_quantization = CodeQuantization.fit(training_codes.numpy())
    # The anomaly score, fitted on the same training rows, and the out-of-sample scores its percentiles rest on.
    epochs_kept = min(history, key=lambda r: r["val_sq_err"])["epoch"] if config.train.patience and history and "val_sq_err" in history[0] \
        else config.train.epochs
    steps_kept = epochs_kept * math.ceil(len(x_train) / config.train.batch_size)
    # A cross-fit's fold models train on (folds - 1) / folds of the rows: too few for the code size, none is made.
    fold_rows = (len(x_all) + len(x_test)) * (config.anomaly.folds - 1) // config.anomaly.folds
    cross_fit = world.size == 1 and fold_rows > model.code_dim and not sampled
    anomaly_score, anomaly, score_metrics = fit_anomaly(
        model, config.anomaly, x_all.subset(sample_index) if sampled else x_train, [x_val, x_test],
        functools.partial(train_fold, model, config) if cross_fit else None, (epochs_kept, steps_kept, config.train.batch_size),
        config.train.seed, progress)
    metrics.update(score_metrics)
    train_coords, test_coords = project_codes(projector, codes), project_codes(projector, encode_all(model, x_test))
    train_labels = dataset.train_y[sample_index] if sampled and dataset.train_y is not None else dataset.train_y
    map_points = map_metric_rows(len(x_test), sampled)
    metrics.update(map_metrics(train_coords, train_labels, x_test[:map_points].numpy(), test_coords, dataset.test_y, map_points))
    seconds = time.perf_counter() - started

    manifest: dict[str, Any] = {
        "kind": model.kind,
        "config": model.config_dict(),
        "input_shape": list(preprocessing.input_shape),
        "code_dim": model.code_dim,
        "preprocessing": preprocessing.to_dict(),
        **({"features": dataset.features} if dataset.features else {}),
        "projector": projector_manifest(projector),
        "code_quantization": {"tensors": [*code_quantization.tensors()], "scale_quantile": INT8_SCALE_QUANTILE, "threshold": "median",
                              "rows": int(len(training_codes))},
        "training": {
            "dataset": dataset.name,
            **dataset.facts,
            "data_fingerprint": dataset.fingerprint,
            "data": config.to_dict()["data"],
            "epochs": config.train.epochs,
            "epochs_run": len(history),
            **({"best_epoch": min(history, key=lambda r: r["val_sq_err"])["epoch"]}
               if config.train.patience and history and "val_sq_err" in history[0] else {}),
            **({"recipe_choice": recipe_choice} if recipe_choice else {}),
            "seed": config.train.seed,
            "seconds": round(seconds, 2),
            "n_train": int(len(x_train)),
            "n_val": int(len(x_val)),
            "sample_rows": int(len(sample_index)),
            "map_metric_rows": int(map_points),
            "run_config": config.to_dict(),
            "history": history,
            "prepare": prepare_facts,
            "projector": projector_facts,
            "torch": torch.__version__,
            "world_size": world.size,
        },
        "metrics": metrics,
        "anomaly": anomaly,
    }
    manifest["map_sample"] = MAP_SAMPLE
    # The version's other files are made before publishing, which only writes them: concurrent publishers never wait on
    # plotting, and a report that fails costs the report alone.
    version = ModelVersion({"name": config.name, **manifest}, model, projector, preprocessing,
                           anomaly_score, torch.device("cpu"), code_quantization=code_quantization)
    files = {MAP_SAMPLE: map_sample(version, dataset.test_x, dataset.test_y)}
    # The ONNX graphs a server without torch runs (models/served.py), checked against torch; without them the version
    # still publishes, and the manifest says why.
    graph_files, manifest["graphs"] = graphs_for_serving(version)
    files.update(graph_files)
    if "error" in manifest["graphs"]:
        log.warning("%s: no ONNX graphs stored, so only a server with torch serves this version: %s", config.name, manifest["graphs"]["error"])
    if config.train.report:
        try:
            files.update(render_report(version, dataset.test_x, dataset.test_y))
            manifest["report"] = f"{REPORT_DIR}/report.md"
        except Exception as e:  # matplotlib's many error types among them
            manifest["report_error"] = f"{type(e).__name__}: {e}"
            log.warning("%s: the report failed, so the version is published without it: %s", config.name, manifest["report_error"])
    number = registry.publish(config.name, manifest, weights_bytes(model, projector, preprocessing, code_quantization, anomaly_score), extra_files=files)
    if state is not None:
        state.remove()
    return number
