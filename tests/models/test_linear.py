"""The lecture's claim: a linear autoencoder trained by gradient descent spans the PCA subspace."""
import numpy as np
import torch
from sklearn.datasets import load_digits

from aeserve.models.linear import LinearAutoencoder, LinearConfig
from aeserve.models.pca import principal_components

# Largest principal angle allowed between span(U) and the top-K principal subspace.
MAX_ANGLE_DEGREES = 1.0


def principal_angles_degrees(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Principal angles between the column spaces of a (d, k) and b (d, k)."""
    qa, _ = np.linalg.qr(a)
    qb, _ = np.linalg.qr(b)
    cosines = np.clip(np.linalg.svd(qa.T @ qb, compute_uv=False), -1, 1)
    return np.degrees(np.arccos(cosines))


def test_trained_linear_autoencoder_spans_the_pca_subspace():
    x = torch.from_numpy(load_digits().data.astype(np.float32) / 16)
    k = 4
    model = LinearAutoencoder(LinearConfig(code_dim=k), tuple(x.shape[1:]))
    model.prepare(x)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(1500):  # full-batch gradient descent on squared error
        loss = model.loss(x)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    _, components = principal_components(x, k)
    u = model.decoder.weight.detach().numpy()  # (d, k): the decoder's column space
    angles = principal_angles_degrees(u, components.numpy().T)
    assert angles.max() < MAX_ANGLE_DEGREES, angles
    # And a random subspace is nowhere near: the test can fail.
    random_angles = principal_angles_degrees(np.random.default_rng(0).normal(size=u.shape), components.numpy().T)
    assert random_angles.max() > 30
