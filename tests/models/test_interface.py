"""Every model kind answers the same calls, and survives save -> load bit for bit."""
import numpy as np
import pytest
import torch

from aeserve.models.checkpoint import load_version
from aeserve.models.kinds import MODEL_KINDS, build_model
from aeserve.models.preprocessing import Preprocessing
from tests.conftest import KIND_CONFIGS


def test_every_kind_has_a_test_config():
    assert set(KIND_CONFIGS) == set(MODEL_KINDS)


@pytest.mark.parametrize("kind", sorted(MODEL_KINDS))
def test_shapes_and_forward_is_decode_of_encode(kind):
    model = build_model(kind, KIND_CONFIGS[kind], input_shape=(8, 8))
    x = torch.rand(10, 64)
    model.prepare(x)
    model.eval()
    z = model.encode(x)
    assert z.shape == (10, 4) and z.dtype == torch.float32
    x_hat = model.decode(z)
    assert x_hat.shape == (10, 64) and x_hat.dtype == torch.float32
    torch.testing.assert_close(model(x), x_hat, rtol=0, atol=0)
    assert model.loss(x).ndim == 0


@pytest.mark.parametrize("kind", sorted(MODEL_KINDS))
def test_save_load_gives_identical_outputs(kind, trained_registry):
    name = f"digits-{kind}"
    loaded = trained_registry.load(name)
    again = load_version(trained_registry.version_dir(name, loaded.version))
    x = np.random.default_rng(1).random((7, 8, 8)).astype(np.float32) * 16
    for op in ("encode", "project"):
        np.testing.assert_array_equal(getattr(loaded, op)(x), getattr(again, op)(x))
    np.testing.assert_array_equal(loaded.reconstruct(x)[0], again.reconstruct(x)[0])
    z = loaded.encode(x)
    np.testing.assert_array_equal(loaded.decode(z), again.decode(z))


@pytest.mark.parametrize("kind", sorted(MODEL_KINDS))
def test_loaded_version_matches_its_manifest_metrics(kind, trained_registry):
    """The stored test error is reproduced by the loaded model on the same held-out data."""
    from aeserve.training.data.config import DataConfig
    from aeserve.training.data.sources import load_dataset

    loaded = trained_registry.load(f"digits-{kind}")
    dataset = load_dataset(DataConfig(**loaded.manifest["training"]["data"]))
    assert dataset.fingerprint == loaded.manifest["training"]["data_fingerprint"]
    _, errors, percentiles = loaded.reconstruct(dataset.test_x)
    assert errors.mean() == pytest.approx(loaded.manifest["metrics"]["test_sq_err"], rel=1e-5)
    assert 40 < np.median(percentiles) < 60  # the held-out set sits in the middle of its own distribution


def test_unknown_kind_and_bad_config_name_the_problem():
    with pytest.raises(ValueError, match=r"unknown model kind 'nope'; allowed: \['conv', 'linear', 'mlp', 'pca', 'rbm', 'rd', 'vae'\]"):
        build_model("nope", {}, (10,))
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['model.layers'\] for model.kind 'mlp'; allowed: \['activation', 'code_dim', 'hidden', "):
        build_model("mlp", {"layers": [3]}, (10,))
    with pytest.raises(ValueError, match="model.activation 'swish' is not one of"):
        build_model("mlp", {"activation": "swish"}, (10,))
    with pytest.raises(ValueError, match="model.code_dim must be >= 1, got 0"):
        build_model("pca", {"code_dim": 0}, (10,))


@pytest.mark.parametrize("offset", [0.0, 3.5])
def test_preprocessing_on_tensors_matches_numpy(offset):
    """A version on a GPU scales with the tensor maps; they must give what the numpy maps give on the CPU."""
    pre = Preprocessing(input_shape=(2, 3), offset=offset, scale=1 / 255)
    raw = (np.random.default_rng(0).random((4, 2, 3)) * 255).astype(np.float32)
    model_space = pre.to_model_tensor(torch.from_numpy(raw))
    assert model_space.shape == (4, 6)
    np.testing.assert_allclose(model_space.numpy(), pre.to_model(raw), rtol=1e-6)
    np.testing.assert_allclose(pre.from_model_tensor(model_space).numpy(), pre.from_model(pre.to_model(raw)), rtol=1e-6)
    assert pre.from_model_tensor(model_space).shape == (4, 2, 3)
