"""A version's report: Markdown with PNG figures (reconstructions, the 2-D map, training curves, metrics vs PCA)."""
from __future__ import annotations

import base64
import io
import json
from typing import Any

import numpy as np

from aeserve.models.version import ModelVersion
from aeserve.training.evaluate import WORSE_THAN_PCA, worse_than_pca

REPORT_DIR = "report"
MAP_POINTS = 5000
MAP_SAMPLE = "map/sample.json"
SAMPLE_POINTS = 1000


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return buffer.getvalue()


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def picture_layout(input_shape: tuple[int, ...]) -> str | None:
    """How a row of ``input_shape`` shows as a picture: "gray" (H, W) or (1, H, W), "chw" (3, H, W), "hwc" (H, W, 3);
    None for anything else (a vector, many channels), which is drawn as a line."""
    if len(input_shape) == 2 or (len(input_shape) == 3 and input_shape[0] == 1):
        return "gray"
    if len(input_shape) == 3 and input_shape[0] == 3:
        return "chw"
    if len(input_shape) == 3 and input_shape[-1] == 3:
        return "hwc"
    return None


def _picture(version: ModelVersion, values: np.ndarray, layout: str) -> np.ndarray:
    """One row as pixels for imshow: (H, W) gray as it is (imshow scales it), colour (H, W, 3) in [0, 1]."""
    shape = version.input_shape
    if layout == "gray":
        return np.asarray(values, dtype=np.float32).reshape(shape[-2:])
    unit = version.preprocessing.to_model(np.asarray(values)[None])[0]
    if version.preprocessing.scaling == "standard":  # centred values: show each picture's own range
        unit = (unit - unit.min()) / max(float(unit.max() - unit.min()), 1e-12)
    unit = np.clip(unit, 0, 1).reshape(shape)
    return np.moveaxis(unit, 0, -1) if layout == "chw" else unit


def reconstructions_figure(version: ModelVersion, x: np.ndarray, n: int = 10) -> bytes:
    """Held-out inputs (top row) above their reconstructions (bottom row): pictures for images, gray or colour, and
    lines for any other input."""
    plt = _pyplot()
    x = x[:n]
    recon, errors, percentiles = version.reconstruct(x)
    layout = picture_layout(tuple(version.input_shape))
    fig, axes = plt.subplots(2, len(x), figsize=(1.3 * len(x), 2.9), squeeze=False)
    for i in range(len(x)):
        for row, values in enumerate((x[i], recon[i])):
            ax = axes[row][i]
            if layout is not None:
                ax.imshow(_picture(version, values, layout), cmap="gray" if layout == "gray" else None)
            else:
                ax.plot(np.ravel(values))
            ax.set_xticks([])
            ax.set_yticks([])
        axes[1][i].set_xlabel(f"{errors[i]:.1f}\n{percentiles[i]:.0f}%", fontsize=7)
    axes[0][0].set_ylabel("input")
    axes[1][0].set_ylabel("reconstruction")
    fig.suptitle("held-out inputs, reconstructions (summed squared error, percentile)", fontsize=9)
    figure = _png(fig)
    plt.close(fig)
    return figure


def map_figure(version: ModelVersion, x: np.ndarray, labels: np.ndarray | None) -> bytes:
    """The 2-D map of up to MAP_POINTS held-out points, coloured by label where there are labels."""
    plt = _pyplot()
    x = x[:MAP_POINTS]
    coords = version.project(x)
    fig, ax = plt.subplots(figsize=(6, 6))
    if labels is None:
        ax.scatter(coords[:, 0], coords[:, 1], s=2)  # no colour map without labels (matplotlib warns about an unused cmap)
    else:
        scatter = ax.scatter(coords[:, 0], coords[:, 1], s=2, c=labels[:MAP_POINTS], cmap="tab10")
        handles, texts = scatter.legend_elements()
        names = version.manifest.get("training", {}).get("labels")  # an image folder's label subfolders
        present = np.unique(labels[:MAP_POINTS])
        if names and len(handles) == len(present) and present.max() < len(names):
            texts = [names[int(i)] for i in present]
        ax.legend(handles, texts, loc="best", fontsize=7, markerscale=0.7, title="label")
    ax.set_title(f"2-D map of {len(x)} held-out points ({version.manifest.get('projector', {}).get('kind', '?')} projector)", fontsize=9)
    figure = _png(fig)
    plt.close(fig)
    return figure


def curves_figure(history: list[dict[str, float]]) -> bytes:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    epochs = [h["epoch"] for h in history]
    for key in ("train_loss", "val_sq_err"):
        values = [h[key] for h in history if key in h]
        if values:
            ax.plot(epochs[: len(values)], values, label=key)
    ax.set_xlabel("epoch")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("training curves", fontsize=9)
    figure = _png(fig)
    plt.close(fig)
    return figure


def metrics_table(manifest: dict[str, Any]) -> str:
    m = manifest["metrics"]
    rows = [("test summed squared error / example", m["test_sq_err"]), ("test MSE / element", m["test_mse"]),
            (f"PCA-{manifest['code_dim']} summed squared error", m["pca_sq_err"]), ("PCA MSE / element", m["pca_mse"]),
            ("ratio to PCA", m["ratio_to_pca"])]
    rows += [(key, m[key]) for key in ("val_sq_err", "elbo", "elbo_reconstruction", "elbo_kl") if key in m]
    return "| metric | value |\n|---|---|\n" + "\n".join(f"| {label} | {value:.5g} |" for label, value in rows if value is not None)


def epochs_sentence(training: dict[str, Any]) -> str:
    """How long training ran: the epochs actually run (early stopping may end a run before ``train.epochs``) and the
    epoch whose weights were kept."""
    planned = training.get("epochs", "?")
    run = training.get("epochs_run", len(training["history"]) if training.get("history") else None)
    if run is None:
        return f"{planned} epochs"
    if not run:
        return "no gradient epochs (fitted in closed form)"
    kept = training.get("best_epoch", run)
    ran = f"{run} epochs" + (f" of up to {planned} (early stopping)" if run != planned else "") + f", keeping the weights of epoch {kept}"
    choice = training.get("recipe_choice") or {}
    if choice.get("chosen") == "pca":
        return f"closed-form PCA, published instead of the {choice['trained']} trained beside it for {ran}"
    return ran


def pca_lines(manifest: dict[str, Any]) -> list[str]:
    """The recipe's choice between the trained network and closed-form PCA, and a warning for a version worse than PCA."""
    lines = []
    choice = manifest.get("training", {}).get("recipe_choice")
    if choice:
        published = "closed-form PCA" if choice["chosen"] == "pca" else f"the trained {choice['chosen']}"
        lines += ["", f"The recipe published {published}: {choice['why']}."]
    m = manifest["metrics"]
    if worse_than_pca(m):
        lines += ["", f"**Warning: worse than closed-form PCA on held-out data** ({m['test_sq_err'] / m['pca_sq_err']:.2f} × its "
                      f"summed squared error; flagged above {WORSE_THAN_PCA:g} ×)."]
    return lines


def render_report(version: ModelVersion, x_test: np.ndarray, y_test: np.ndarray | None) -> dict[str, bytes]:
    """Files of the report (relative path -> bytes): report.md and its PNG figures.

    x_test: (n, *input_shape) raw held-out inputs; y_test: (n,) labels or None.
    """
    manifest = version.manifest
    training = manifest.get("training", {})
    files = {
        f"{REPORT_DIR}/reconstructions.png": reconstructions_figure(version, x_test),
        f"{REPORT_DIR}/map.png": map_figure(version, x_test, y_test),
    }
    lines = [
        # A version's report is made before it is published, when its number is not known yet (its folder names it).
        f"# {manifest['name']}" + (f" version {manifest['version']}" if "version" in manifest else ""),
        "",
        f"kind `{manifest['kind']}`, code size {manifest['code_dim']}, input shape {manifest['input_shape']}, "
        f"trained on {training.get('dataset', '?')}: {epochs_sentence(training)}, in {training.get('seconds', '?')} s "
        f"(seed {training.get('seed', '?')}).",
        *pca_lines(manifest),
        "",
        "## Metrics on held-out data, against closed-form PCA with the same code size",
        "",
        metrics_table(manifest),
        "",
        "## Reconstructions",
        "",
        "![reconstructions](reconstructions.png)",
        "",
        "## 2-D map",
        "",
        "![map](map.png)",
    ]
    if training.get("history"):
        files[f"{REPORT_DIR}/curves.png"] = curves_figure(training["history"])
        lines += ["", "## Training curves", "", "![curves](curves.png)"]
    prepare = training.get("prepare") or {}
    if prepare.get("rbm_reconstruction_errors"):
        lines += ["", "## RBM pre-training (reconstruction error per epoch, by layer)", ""]
        lines += [f"- layer {i + 1}: {errors[0]:.3f} -> {errors[-1]:.3f}" for i, errors in enumerate(prepare["rbm_reconstruction_errors"]) if errors]
    files[f"{REPORT_DIR}/report.md"] = ("\n".join(lines) + "\n").encode()
    return files


def map_sample(version: ModelVersion, x: np.ndarray, labels: np.ndarray | None, n: int = SAMPLE_POINTS) -> bytes:
    """JSON for the map explorer: up to n held-out points with 2-D coordinates, labels and thumbnails.

    Thumbnails are the inputs in [0, 1] quantised to uint8, base64 over (n, input_dim) row-major bytes.
    """
    x = x[:n]
    coords = version.project(x)
    pixels = np.clip(version.preprocessing.to_model(x), 0, 1)
    document = {
        "x": coords[:, 0].round(4).tolist(),
        "y": coords[:, 1].round(4).tolist(),
        "labels": None if labels is None else labels[:n].tolist(),
        "input_shape": list(version.input_shape),
        "thumbnails": base64.b64encode(np.round(pixels * 255).astype(np.uint8).tobytes()).decode(),
    }
    return json.dumps(document, separators=(",", ":")).encode()
