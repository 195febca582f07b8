"""PCA is numpy's SVD projection, with signs fixed."""
import numpy as np
import torch

from aeserve.models.pca import PCA, PCAConfig


def _data(n=300, d=20, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) + rng.normal(size=d)).astype(np.float32)


def test_reconstruction_equals_numpy_svd_projection():
    x = _data()
    k = 5
    pca = PCA(PCAConfig(code_dim=k), x.shape[1:])
    pca.prepare(torch.from_numpy(x))
    mean = x.astype(np.float64).mean(axis=0)
    _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
    expected = (x - mean) @ vt[:k].T @ vt[:k] + mean
    np.testing.assert_allclose(pca(torch.from_numpy(x)).numpy(), expected, atol=1e-4)
    # Same directions up to sign, and codes equal to numpy's with the sign fixed.
    np.testing.assert_allclose(np.abs(pca.components.numpy() @ vt[:k].T), np.eye(k), atol=1e-5)


def test_signs_are_fixed_and_refit_gives_same_codes():
    x = torch.from_numpy(_data())
    a, b = PCA(PCAConfig(code_dim=4), (20,)), PCA(PCAConfig(code_dim=4), (20,))
    a.prepare(x)
    b.prepare(x[torch.randperm(len(x))])  # same data, other order
    np.testing.assert_allclose(a.encode(x).numpy(), b.encode(x).numpy(), atol=1e-4)
    comps = a.components.numpy()
    assert np.all(comps[np.arange(4), np.abs(comps).argmax(axis=1)] > 0)


def test_hand_set_weights_give_exact_outputs():
    pca = PCA(PCAConfig(code_dim=1), (2,))
    pca.mean.copy_(torch.tensor([1.0, 2.0]))
    pca.components.copy_(torch.tensor([[0.6, 0.8]]))
    z = pca.encode(torch.tensor([[4.0, 6.0]]))  # (3, 4) . (0.6, 0.8) = 5
    assert z.tolist() == [[5.0]]
    assert pca.decode(z).tolist() == [[4.0, 6.0]]
