"""Layer-wise RBM pre-training: CD-1 learns, the unrolled stack already reconstructs, fine-tuning improves it."""
import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from aeserve.models.rbm import RBM, RBMAutoencoder, RBMConfig, reconstruction_error, train_rbm
from aeserve.training.config import build_run_config
from aeserve.training.trainer import fit


@pytest.fixture(scope="module")
def digits() -> torch.Tensor:
    return torch.from_numpy(load_digits().data.astype(np.float32) / 16)


def sq_err(model, x) -> float:
    with torch.no_grad():
        return float((model(x) - x).pow(2).sum(dim=1).mean())


def test_cd1_lowers_reconstruction_error(digits):
    torch.manual_seed(0)
    config = RBMConfig(pretrain_lr=0.1)
    untrained = RBM(0.1 * torch.randn(64, 48), torch.zeros(64), torch.zeros(48), False, [])
    rbm = train_rbm(digits, 48, gaussian_hidden=False, config=config, epochs=8)
    assert rbm.errors[-1] < rbm.errors[0]
    assert rbm.errors[-1] < 0.5 * reconstruction_error(untrained, digits)


def test_gaussian_top_rbm_learns_with_its_small_learning_rate(digits):
    torch.manual_seed(0)
    rbm = train_rbm(digits, 8, gaussian_hidden=True, config=RBMConfig(top_lr=0.001), epochs=8)
    assert rbm.errors[-1] < rbm.errors[0]
    h = rbm.hidden_mean(digits)
    assert h.min() < 0 or h.max() > 1  # linear units: not squashed into (0, 1)


def test_unrolled_stack_reconstructs_before_fine_tuning_and_fine_tuning_helps(digits):
    torch.manual_seed(0)
    model = RBMAutoencoder(RBMConfig(code_dim=8, hidden=(48, 24), pretrain_epochs=20, top_lr=0.01), (64,))
    facts = model.prepare(digits)
    assert facts["pretrained"] and len(facts["rbm_reconstruction_errors"]) == 3
    # Tied at first: each decoder layer starts from its encoder layer's W transposed.
    encoder = [m for m in model.encoder if isinstance(m, torch.nn.Linear)]
    decoder = [m for m in model.decoder if isinstance(m, torch.nn.Linear)][::-1]
    for enc, dec in zip(encoder, decoder, strict=True):
        torch.testing.assert_close(dec.weight, enc.weight.T)
    mean_image_err = float((digits - digits.mean(dim=0)).pow(2).sum(dim=1).mean())
    pretrained_err = sq_err(model, digits)
    assert pretrained_err < 0.8 * mean_image_err, (pretrained_err, mean_image_err)

    run = build_run_config({"name": "x", "model": {"kind": "rbm"}, "train": {"epochs": 5, "batch_size": 64, "lr": 1e-3}})
    fit(model, digits, digits[:0], run, progress=False)
    assert sq_err(model, digits) < 0.9 * pretrained_err
    # Untied after fine-tuning.
    assert not torch.allclose(decoder[0].weight, encoder[0].weight.T)


def test_without_pretraining_it_is_the_same_network_from_random_init(digits):
    torch.manual_seed(0)
    model = RBMAutoencoder(RBMConfig(code_dim=8, hidden=(48, 24), pretrain=False), (64,))
    assert model.prepare(digits) == {"pretrained": False}
    mean_image_err = float((digits - digits.mean(dim=0)).pow(2).sum(dim=1).mean())
    assert sq_err(model, digits) > mean_image_err  # random weights do not reconstruct
