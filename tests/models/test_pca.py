"""PCA is numpy's SVD projection, with signs fixed."""
import numpy as np
import torch

from models.pca import PCA, PCAConfig
from models.projector import Projector


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


def test_projector_is_identity_for_2d_codes_and_pca_otherwise():
    codes = torch.randn(50, 2)
    torch.testing.assert_close(Projector(2).fit(codes)(codes), codes)
    codes = torch.from_numpy(_data(d=6))
    coords = Projector(6).fit(codes)(codes)
    assert coords.shape == (300, 2)
    # The map keeps the two directions of largest variance, in order.
    variances = coords.var(dim=0)
    assert variances[0] >= variances[1]
    top = np.linalg.eigvalsh(np.cov(codes.numpy().T))[::-1][:2]
    np.testing.assert_allclose(variances.numpy(), top, rtol=1e-3)
