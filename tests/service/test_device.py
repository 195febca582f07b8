"""GPU serving gives the CPU's answers; skipped where no CUDA device is present."""
import numpy as np
import pytest
import torch

from aeserve.service.settings import Settings
from tests.conftest import KIND_CONFIGS

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def test_auto_device_picks_what_is_there():
    assert Settings(device="auto").resolved_device() == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_asking_for_cuda_without_one_says_how_to_fix_it():
    with pytest.raises(ValueError, match="no CUDA device is available; use --device cpu or auto"):
        Settings(device="cuda").resolved_device()


@cuda
@pytest.mark.parametrize("kind", list(KIND_CONFIGS))
def test_cuda_outputs_match_cpu(trained_registry, kind):
    rng = np.random.default_rng(0)
    x = (rng.random((32, 8, 8)) * 16).astype(np.float32)
    cpu = trained_registry.load(f"digits-{kind}", device="cpu")
    gpu = trained_registry.load(f"digits-{kind}", device="cuda")
    codes = cpu.encode(x)
    # cuDNN may run float32 convolutions on TF32 (about 3e-4 relative); matrix products stay float32.
    tolerance = {"rtol": 2e-3, "atol": 2e-3} if kind == "conv" else {"rtol": 1e-4, "atol": 1e-4}
    np.testing.assert_allclose(gpu.encode(x), codes, **tolerance)
    np.testing.assert_allclose(gpu.decode(codes), cpu.decode(codes), **tolerance)
    (x_hat, errors, percentiles), expected = gpu.reconstruct(x), cpu.reconstruct(x)
    np.testing.assert_allclose(x_hat, expected[0], **tolerance)
    np.testing.assert_allclose(errors, expected[1], rtol=tolerance["rtol"])
    np.testing.assert_allclose(percentiles, expected[2], atol=0.1 if kind == "conv" else 0.01)
    np.testing.assert_allclose(gpu.project(x), cpu.project(x), **tolerance)
