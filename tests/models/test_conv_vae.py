"""Convolutional and variational autoencoders: shapes, the posterior mean as code, ELBO terms in the manifest."""
import numpy as np
import pytest
import torch

from aeserve.models.conv import image_shape
from aeserve.models.entropy import GDN
from aeserve.models.kinds import build_model
from aeserve.models.vae import VAE, VAEConfig


def test_conv_accepts_images_only_and_names_the_fix():
    with pytest.raises(ValueError, match=r"kind 'conv' needs image inputs of shape \(H, W\) or \(C, H, W\), got \[64\]"):
        build_model("conv", {}, (64,))
    with pytest.raises(ValueError, match=r"image height and width \[10, 10\] must be divisible by 4 for 2 stages; use fewer model.channels"):
        build_model("conv", {"channels": [8, 8]}, (10, 10))
    model = build_model("conv", {"code_dim": 5, "channels": [4, 8]}, (3, 16, 12))
    x = torch.rand(2, 3 * 16 * 12)
    assert model.encode(x).shape == (2, 5) and model(x).shape == (2, 576)
    with torch.no_grad():
        assert 0 <= float(model(x).min()) and float(model(x).max()) <= 1


@pytest.mark.parametrize("activation", ["gelu", "gdn"])
def test_conv_blocks_and_losses(activation):
    model = build_model("conv", {"code_dim": 3, "channels": [4, 8], "activation": activation, "loss": "mse"}, (8, 8))
    gdn = [m for m in model.modules() if isinstance(m, GDN)]
    # GDN after each convolution of the encoder, inverse GDN in the decoder (the bottom, each stage, between stages).
    assert [m.inverse for m in gdn] == ([False] * 4 + [True] * 4 if activation == "gdn" else [])
    x = torch.rand(5, 64)
    logits = model.decode_logits(model.encode(x))
    torch.testing.assert_close(model.loss(x), (torch.sigmoid(logits) - x).pow(2).sum() / 5)
    bce = build_model("conv", {"code_dim": 3, "channels": [4, 8], "activation": activation}, (8, 8))
    bce.load_state_dict(model.state_dict())
    torch.testing.assert_close(bce.loss(x), torch.nn.functional.binary_cross_entropy(torch.sigmoid(logits), x, reduction="sum") / 5)
    with pytest.raises(ValueError, match="model.activation"):
        build_model("conv", {"activation": "softmax"}, (8, 8))


def test_vae_codes_are_the_posterior_mean_and_deterministic():
    torch.manual_seed(0)
    vae = VAE(VAEConfig(code_dim=3, hidden=(16,)), (10,))
    x = torch.rand(5, 10)
    mean, log_var = vae.posterior(x)
    torch.testing.assert_close(vae.encode(x), mean)
    torch.testing.assert_close(vae(x), vae(x))  # reconstruct decodes the mean: no sampling
    torch.testing.assert_close(vae(x), torch.sigmoid(vae.decoder(mean)))


def test_vae_kl_is_zero_exactly_at_the_prior():
    vae = VAE(VAEConfig(code_dim=2, hidden=(4,)), (6,))
    with torch.no_grad():
        last = vae.encoder[-1]
        last.weight.zero_()
        last.bias.zero_()  # posterior N(0, I) for every input
    _, kl = vae.elbo_terms(torch.rand(3, 6))
    torch.testing.assert_close(kl, torch.zeros(3))


def test_vae_manifest_records_elbo_terms(trained_registry):
    metrics = trained_registry.manifest("digits-vae")["metrics"]
    assert metrics["elbo"] == pytest.approx(-(metrics["elbo_reconstruction"] + metrics["elbo_kl"]), rel=1e-6)
    assert metrics["elbo_kl"] > 0 and np.isfinite(metrics["elbo"])


def test_channels_last_rows_get_an_error_naming_the_layout_the_conv_model_takes():
    with pytest.raises(ValueError, match=r"channels first: \(n, C, H, W\).*\[32, 32, 3\] look channels last \(H, W, C\): .*np.moveaxis"):
        image_shape((32, 32, 3), 2)
    assert image_shape((3, 32, 32), 2) == (3, 32, 32)
