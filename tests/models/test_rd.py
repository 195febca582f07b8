"""The compression autoencoder's parts: the factorized prior, its coding tables, the range coder, rate + distortion."""
import numpy as np
import pytest
import torch

from aeserve.models.entropy import RADIUS, FactorizedPrior, RangeCoder, bits
from aeserve.models.rd import RDAutoencoder, RDConfig


def test_the_prior_is_a_distribution_over_the_integers():
    prior = FactorizedPrior(3)
    with torch.no_grad():
        for p in prior.biases:
            p.normal_()
        integers = torch.arange(-RADIUS, RADIUS + 1, dtype=torch.float32)
        mass = prior.likelihood(integers.reshape(1, 1, -1, 1).expand(1, 3, -1, 1).contiguous())  # (1, 3, 127, 1)
        # The unit intervals tile [-RADIUS - 1/2, RADIUS + 1/2]: their masses add up to the distribution's mass there.
        ends = torch.sigmoid(prior.cdf_logits(torch.tensor([-RADIUS - 0.5, RADIUS + 0.5]).expand(3, 1, -1)))[:, 0]
        assert torch.allclose(mass.sum(dim=2).flatten(), ends[:, 1] - ends[:, 0], atol=1e-5)
        logits = prior.cdf_logits(torch.linspace(-20, 20, 401).expand(3, 1, -1))
        assert torch.all(logits.diff(dim=2) > 0)  # a cumulative distribution: increasing everywhere
    prior.make_tables()
    assert torch.allclose(prior.pmf.sum(dim=1), torch.ones(3)) and torch.all(prior.pmf > 0)
    assert torch.allclose(prior.pmf, mass[0, :, :, 0] / mass[0, :, :, 0].sum(dim=1, keepdim=True), atol=1e-6)


def test_the_range_coder_round_trips_exactly_and_spends_about_the_information_content():
    rng = np.random.default_rng(0)
    channels, positions = 4, 49
    pmf = rng.dirichlet(np.full(2 * RADIUS + 1, 0.05), size=channels).astype(np.float32)
    channel_of = np.repeat(np.arange(channels), positions)
    coder = RangeCoder(pmf, channel_of)
    for _ in range(20):
        code = np.array([rng.choice(2 * RADIUS + 1, p=pmf[c] / pmf[c].sum()) - RADIUS for c in channel_of], dtype=np.float32)
        data = coder.encode(code)
        np.testing.assert_array_equal(coder.decode(data), code)
        information = -np.log2(pmf[channel_of, (code + RADIUS).astype(int)].astype(np.float64)).sum()
        assert len(data) * 8 <= information + 64  # the coder's overhead: a few words at most
    extremes = np.array([-RADIUS, RADIUS] * (len(channel_of) // 2) + [0] * (len(channel_of) % 2), dtype=np.float32)
    np.testing.assert_array_equal(coder.decode(coder.encode(extremes)), extremes)
    with pytest.raises(ValueError, match="whole 32-bit words"):
        coder.decode(b"abc")


def test_rd_codes_are_the_integers_a_stream_carries_and_training_lowers_rate_plus_distortion():
    torch.manual_seed(0)
    model = RDAutoencoder(RDConfig(channels=8, latent_channels=2, distortion_weight=0.01), (1, 16, 16))
    assert model.code_dim == 2 * 4 * 4 and model.channel_of().tolist() == [0] * 16 + [1] * 16
    x = torch.rand(64, 256) * (torch.rand(64, 1) > 0.5)
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    with torch.no_grad():
        first = float(model.loss(x))
    for _ in range(60):
        loss = model.loss(x)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    with torch.no_grad():
        assert float(model.loss(x)) < 0.8 * first
    model.eval()
    model.finish()
    with torch.no_grad():
        code = model.encode(x)
        assert torch.equal(code, torch.round(code)) and code.abs().max() <= RADIUS
        rate, distortion = model.rate_distortion(x, noisy=False)
        assert torch.allclose(distortion, (model.decode(code) - x).pow(2).sum(dim=1), rtol=1e-5)
        assert torch.allclose(rate, bits(model.prior.likelihood(code.reshape(-1, 2, 4, 4))))
    coder = RangeCoder(model.prior.pmf.numpy(), model.channel_of().numpy())
    for row in code.numpy():
        np.testing.assert_array_equal(coder.decode(coder.encode(row)), row)
    metrics = model.extra_metrics(x)
    assert metrics["rate_bytes"] == pytest.approx(metrics["rate_bits"] / 8) and metrics["psnr"] > 0


def test_rd_needs_sizes_divisible_by_four():
    with pytest.raises(ValueError, match="divisible by 4"):
        RDAutoencoder(RDConfig(), (30, 30))


def test_streams_name_their_version_and_refuse_damage():
    from aeserve.models.streams import StreamError, StreamFormat

    rng = np.random.default_rng(1)
    pmf = rng.dirichlet(np.full(2 * RADIUS + 1, 0.05), size=2).astype(np.float32)
    coder = RangeCoder(pmf, np.repeat(np.arange(2), 16))
    fmt = StreamFormat("fmnist-rd-1", 3, coder)
    code = np.array([rng.choice(2 * RADIUS + 1, p=pmf[c] / pmf[c].sum()) - RADIUS for c in np.repeat(np.arange(2), 16)], dtype=np.float32)
    stream = fmt.pack(code)
    assert stream[:1] == b"\xa1" and len(stream) <= 7 + len(coder.encode(code))
    np.testing.assert_array_equal(fmt.unpack(stream), code)
    for version in (200, 70_000):  # versions of several varint bytes
        other = StreamFormat("fmnist-rd-1", version, coder)
        np.testing.assert_array_equal(other.unpack(other.pack(code)), code)

    with pytest.raises(StreamError, match=r"row 4: the stream was made by version 2 of 'fmnist-rd-1', not version 3; "
                                          r"decompress it with /v1/models/fmnist-rd-1/versions/2/decompress"):
        fmt.unpack(StreamFormat("fmnist-rd-1", 2, coder).pack(code), row=4)
    with pytest.raises(StreamError, match="made by another model, not 'fmnist-rd-1'"):
        fmt.unpack(StreamFormat("other", 3, coder).pack(code))
    with pytest.raises(StreamError, match="not an aeserve stream"):
        fmt.unpack(b"\x89PNG....")
    with pytest.raises(StreamError, match="not an aeserve stream"):
        fmt.unpack(b"")
    for cut in range(1, len(stream)):  # every truncation is refused
        with pytest.raises(StreamError, match="truncated"):
            fmt.unpack(stream[:cut])
    for i in range(len(stream)):  # every single flipped byte is refused
        damaged = bytearray(stream)
        damaged[i] ^= 0x5A
        with pytest.raises(StreamError):
            fmt.unpack(bytes(damaged))


def test_a_position_prior_learns_that_an_always_empty_position_costs_nothing_where_a_channel_prior_cannot():
    # Latents (n, 1, 2, 2): position 0 is always 0 (a background pixel of aligned images), the others spread over
    # -3..3. One density per channel must cover both; one per position learns position 0 apart.
    torch.manual_seed(0)
    y = torch.randint(-3, 4, (512, 1, 2, 2)).float()
    y[:, 0, 0, 0] = 0
    costs = {}
    for prior_kind in ("channel", "position"):
        model = RDAutoencoder(RDConfig(channels=4, latent_channels=1, prior=prior_kind), (1, 8, 8))
        optimiser = torch.optim.Adam(model.prior.parameters(), lr=0.05)
        for _ in range(300):
            noisy = y + torch.empty_like(y).uniform_(-0.5, 0.5)
            loss = bits(model.likelihood(noisy)).mean()
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        with torch.no_grad():
            costs[prior_kind] = -torch.log2(model.likelihood(y))[:, 0, 0, 0].mean().item()  # bits spent on position 0
        model.finish()
        assert model.coding_tables()[0].shape == ((1 if prior_kind == "channel" else 4), 2 * RADIUS + 1)
        assert model.coding_tables()[1].tolist() == ([0, 0, 0, 0] if prior_kind == "channel" else [0, 1, 2, 3])
    # 0 has mass 0.36 in the channel's mixture (at best 1.49 bits); alone at its position it is certain
    assert costs["position"] < 0.1 and costs["channel"] > 1.0


def test_a_version_with_a_position_prior_compresses_and_decompresses_what_it_encodes(tmp_path):
    from aeserve.models.registry import Registry
    from aeserve.training.config import build_run_config
    from aeserve.training.trainer import train

    run = build_run_config({"name": "digits-rd-position", "data": {"source": "digits", "limit": 200},
                            "model": {"kind": "rd", "channels": 8, "latent_channels": 2, "prior": "position"},
                            "train": {"epochs": 1, "batch_size": 64, "lr": 3e-3}})
    registry = Registry(tmp_path)
    train(run, registry, progress=False)
    version = registry.load("digits-rd-position")
    assert version.manifest["config"]["prior"] == "position"
    rows = (np.random.default_rng(0).random((6, 64)) * 16).astype(np.float32)
    codes = version.encode(rows)
    np.testing.assert_array_equal(np.stack([version.streams.unpack(version.streams.pack(c)) for c in codes]), codes)


def test_a_version_whose_manifest_says_lmbda_loads_and_answers_as_before(tmp_path):
    from aeserve.models.registry import Registry
    from aeserve.training.config import build_run_config
    from aeserve.training.trainer import train
    from tests.conftest import tamper_version

    registry = Registry(tmp_path / "registry")
    old_config = {"kind": "rd", "channels": 8, "latent_channels": 1, "lmbda": 0.02}  # a config from before the rename trains
    train(build_run_config({"name": "rd", "data": {"source": "digits", "limit": 200}, "model": old_config,
                            "train": {"epochs": 1, "batch_size": 64, "report": False}}), registry, progress=False)
    assert registry.manifest("rd", 1)["config"]["distortion_weight"] == 0.02
    rows = np.random.default_rng(0).random((4, 64), dtype=np.float32) * 16
    before = registry.load("rd")
    config = dict(registry.manifest("rd", 1)["config"])
    config["lmbda"] = config.pop("distortion_weight")  # as versions published before the rename have it
    tamper_version(registry, "rd", config=config)
    old = registry.load("rd")
    assert old.model.config == before.model.config and old.model.config.distortion_weight == 0.02
    np.testing.assert_array_equal(old.encode(rows), before.encode(rows))
    np.testing.assert_array_equal(old.decode(old.encode(rows)), before.decode(before.encode(rows)))
