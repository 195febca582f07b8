"""2-D projectors: PCA of the codes, and the parametric UMAP network that keeps neighbours together."""
import numpy as np
import pytest
import torch
from sklearn.manifold import trustworthiness
from sklearn.neighbors import KNeighborsClassifier

from aeserve.models.projector import (
    PCAProjector,
    TSNEProjector,
    TSNEProjectorConfig,
    UMAPProjector,
    UMAPProjectorConfig,
    build_projector,
    nearest_neighbours,
    umap_curve,
)
from aeserve.models.registry import Registry
from aeserve.training.config import build_run_config
from aeserve.training.trainer import train


def _data(n=300, d=6, seed=0):
    rng = np.random.default_rng(seed)
    return torch.from_numpy((rng.normal(size=(n, d)) @ rng.normal(size=(d, d))).astype(np.float32))


def test_pca_projector_is_identity_for_2d_codes_and_top_directions_otherwise():
    codes = torch.randn(50, 2)
    projector = PCAProjector(2)
    projector.fit(codes)
    torch.testing.assert_close(projector(codes), codes)
    codes = _data()
    projector = PCAProjector(6)
    projector.fit(codes)
    variances = projector(codes).var(dim=0)
    top = np.linalg.eigvalsh(np.cov(codes.numpy().T))[::-1][:2]
    np.testing.assert_allclose(variances.numpy(), top, rtol=1e-3)


def test_umap_curve_matches_umaps_constants():
    a, b = umap_curve(0.1)
    assert a == pytest.approx(1.577, abs=0.02) and b == pytest.approx(0.895, abs=0.01)  # umap-learn's find_ab_params(1, 0.1)


def test_nearest_neighbours_is_exact():
    x = _data(n=200)
    found = nearest_neighbours(x, 4, chunk=64)
    d = torch.cdist(x, x)
    d.fill_diagonal_(float("inf"))
    expected = d.topk(4, largest=False).indices
    assert torch.equal(found.sort(dim=1).values, expected.sort(dim=1).values)


def blobs(n_per, centres, spread, seed):
    rng = np.random.default_rng(seed)
    x = np.concatenate([c + spread * rng.normal(size=(n_per, len(c))) for c in centres]).astype(np.float32)
    y = np.repeat(np.arange(len(centres)), n_per)
    return torch.from_numpy(x), y


def test_umap_projector_keeps_neighbours_for_new_points():
    torch.manual_seed(0)
    centres = np.random.default_rng(0).normal(scale=4, size=(5, 10))
    x_train, y_train = blobs(200, centres, 1.0, seed=1)
    x_test, y_test = blobs(40, centres, 1.0, seed=2)
    projector = UMAPProjector(10, UMAPProjectorConfig(epochs=5, hidden=(64, 64), batch_size=512))
    facts = projector.fit(x_train)
    assert facts["projector_losses"][-1] < facts["projector_losses"][0]
    with torch.no_grad():
        train_map, test_map = projector(x_train).numpy(), projector(x_test).numpy()
    accuracy = KNeighborsClassifier(5).fit(train_map, y_train).score(test_map, y_test)
    assert accuracy > 0.95
    assert trustworthiness(x_test.numpy(), test_map, n_neighbors=5) > 0.9


def test_tsne_projector_keeps_neighbours_for_new_points():
    torch.manual_seed(0)
    centres = np.random.default_rng(0).normal(scale=4, size=(5, 10))
    x_train, y_train = blobs(200, centres, 1.0, seed=1)
    x_test, y_test = blobs(40, centres, 1.0, seed=2)
    projector = TSNEProjector(10, TSNEProjectorConfig(perplexity=20))
    facts = projector.fit(x_train)
    assert facts["projector_points"] == 1000 and projector.config.points == 1000
    with torch.no_grad():
        train_map, test_map = projector(x_train).numpy(), projector(x_test).numpy()
    layout = {tuple(row) for row in projector.coords.numpy()}
    assert all(tuple(row) in layout for row in np.concatenate([train_map, test_map]))  # every point lands on a laid-out training point
    accuracy = KNeighborsClassifier(5).fit(train_map, y_train).score(test_map, y_test)
    assert accuracy > 0.95
    assert trustworthiness(x_test.numpy(), test_map, n_neighbors=5) > 0.9


def test_tsne_projector_places_a_new_point_at_the_medoid_of_its_nearest_training_codes():
    projector = TSNEProjector(2, TSNEProjectorConfig(points=4, neighbours=3))
    projector.load_state_dict({"codes": torch.tensor([[0.0, 0], [1, 0], [0, 1], [9, 9]]),
                               "coords": torch.tensor([[50.0, 50], [0, 0], [1, 1], [7, 7]])})  # t-SNE put the nearest code far from the others
    torch.testing.assert_close(projector(torch.tensor([[0.1, 0.1]])), torch.tensor([[1.0, 1]]))  # the middle of the three
    projector = TSNEProjector(3, TSNEProjectorConfig(points=3, neighbours=1))
    projector.load_state_dict({"codes": torch.tensor([[0.0, 0, 0], [10, 0, 0], [0, 10, 0]]), "coords": torch.tensor([[1.0, 1], [2, 2], [3, 3]])})
    got = projector(torch.tensor([[9.0, 1, 0], [0.5, 0, 0], [1, 8, 1]]))
    torch.testing.assert_close(got, torch.tensor([[2.0, 2], [1, 1], [3, 3]]))
    assert projector(torch.zeros(0, 3)).shape == (0, 2)
    with pytest.raises(RuntimeError, match="not been fitted"):
        TSNEProjector(3)(torch.zeros(1, 3))


def test_unknown_projector_kind():
    with pytest.raises(ValueError, match=r"unknown projector kind 'isomap'; allowed: \['pca', 'tsne', 'umap'\]"):
        build_projector("isomap", 4)
    with pytest.raises(ValueError, match="projector.kind 'isomap' is not one of"):
        build_run_config({"name": "x", "projector": {"kind": "isomap"}})


@pytest.mark.parametrize("kind, options", [("umap", {"epochs": 2, "hidden": [16]}), ("tsne", {"perplexity": 10})])
def test_projector_is_stored_with_the_version(tmp_path, kind, options):
    registry = Registry(tmp_path)
    config = build_run_config({"name": "m", "data": {"source": "digits", "limit": 300}, "model": {"kind": "pca", "code_dim": 6},
                               "projector": {"kind": kind, **options}, "train": {"report": False}})
    train(config, registry, progress=False)
    manifest = registry.manifest("m")
    assert manifest["projector"]["kind"] == kind and manifest["projector"]["config"].items() >= options.items()
    if kind == "umap":
        assert len(manifest["training"]["projector"]["projector_losses"]) == 2
    else:
        assert manifest["projector"]["config"]["points"] == manifest["training"]["n_train"]
    a, b = registry.load("m"), registry.load("m")
    x = np.random.default_rng(0).random((9, 8, 8)).astype(np.float32) * 16
    np.testing.assert_array_equal(a.project(x), b.project(x))
    assert a.project(x).shape == (9, 2)
