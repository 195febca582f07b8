"""GPU serving gives the CPU's answers; skipped where no CUDA device is present."""
import numpy as np
import pytest
import torch

from service.settings import Settings

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def test_auto_device_picks_what_is_there():
    assert Settings(device="auto").resolved_device() == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_asking_for_cuda_without_one_says_how_to_fix_it():
    with pytest.raises(ValueError, match="no CUDA device is available; use --device cpu or auto"):
        Settings(device="cuda").resolved_device()


@cuda
@pytest.mark.parametrize("kind", ["pca", "linear", "mlp"])
def test_cuda_outputs_match_cpu(trained_registry, kind):
    x = (np.random.default_rng(0).random((32, 8, 8)) * 16).astype(np.float32)
    cpu = trained_registry.load(f"digits-{kind}", device="cpu")
    gpu = trained_registry.load(f"digits-{kind}", device="cuda")
    np.testing.assert_allclose(gpu.encode(x), cpu.encode(x), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(gpu.reconstruct(x)[1], cpu.reconstruct(x)[1], rtol=1e-3, atol=1e-4)
