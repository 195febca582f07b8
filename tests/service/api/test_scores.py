"""Anomaly scores over HTTP: v1 and v2 answer the version's scores, a version published before scores serves its errors
as scores, and /metrics shows served percentiles move into the tail when the rows drift."""
from __future__ import annotations

import re
import shutil

import numpy as np

from aeserve.models.outputs import percentiles
from aeserve.models.registry import Registry
from aeserve.service.metrics import PERCENTILE_BUCKETS
from aeserve.training.config import build_run_config
from aeserve.training.data.sources import load_dataset
from tests.models.test_anomaly import BEFORE_SCORES
from tests.servers import make_client, wait_ready

DIGITS = load_dataset(build_run_config({"name": "d", "data": {"source": "digits", "limit": 400}}).data).test_x


def test_reconstruct_answers_scores_and_their_percentiles(api, service_registry):
    version = service_registry.load("digits-mlp")
    x = DIGITS[:6]
    _, errors, want = version.reconstruct(x)
    body = api.post("/v1/models/digits-mlp/reconstruct", json={"inputs": x.reshape(6, 64).tolist()}).json()
    assert list(body) == ["model", "version", "outputs", "errors", "scores", "percentiles"]
    np.testing.assert_allclose(body["errors"], errors, rtol=1e-5)
    np.testing.assert_allclose(body["scores"], version.scores(x), rtol=1e-5)
    np.testing.assert_allclose(body["percentiles"], want, atol=1e-3)
    np.testing.assert_allclose(want, percentiles(version.anomaly.quantiles, version.scores(x)))


def test_v2_serves_score_and_percentile(api, service_registry):
    version = service_registry.load("digits-pca")
    x = DIGITS[:3].reshape(3, 64)
    body = api.post("/v2/models/digits-pca/infer", json={
        "inputs": [{"name": "input", "shape": [3, 64], "datatype": "FP32", "data": x.ravel().tolist()}],
        "outputs": [{"name": "score"}, {"name": "percentile"}]}).json()
    got = {o["name"]: o for o in body["outputs"]}
    assert got["score"]["shape"] == [3] and got["score"]["datatype"] == "FP32"
    np.testing.assert_allclose(got["score"]["data"], version.scores(x), rtol=1e-5)
    np.testing.assert_allclose(got["percentile"]["data"], version.reconstruct(x)[2], atol=1e-3)


def test_a_version_published_before_scores_answers_its_errors_as_scores(tmp_path):
    shutil.copytree(BEFORE_SCORES, tmp_path / "registry")
    registry = Registry(tmp_path / "registry")
    version = registry.load("digits-old")
    old_quantiles = np.asarray(registry.manifest("digits-old")["metrics"]["error_quantiles"])
    x = DIGITS[:4].reshape(4, 64)
    with make_client(registry) as client:
        wait_ready(client.get)
        body = client.post("/v1/models/digits-old/reconstruct", json={"inputs": x.tolist()}).json()
    assert body["scores"] == body["errors"]
    np.testing.assert_allclose(body["errors"], version.reconstruct(x)[1], rtol=1e-5)
    np.testing.assert_allclose(body["percentiles"], percentiles(old_quantiles, np.asarray(body["errors"])), atol=1e-4)


def buckets(text: str, model: str) -> dict[str, float]:
    """le -> cumulative count of aeserve_percentiles for ``model`` version 1."""
    found = re.findall(rf'^aeserve_percentiles_bucket{{le="([^"]+)",model="{model}",version="1"}} (\S+)$', text, re.M)
    return {le: float(count) for le, count in found}


def test_metrics_show_served_percentiles_move_into_the_tail_when_rows_drift(api):
    api.post("/v1/models/digits-mlp/reconstruct", json={"inputs": DIGITS[:100].reshape(100, 64).tolist()})
    before = buckets(api.get("/metrics").text, "digits-mlp")
    assert list(before) == [str(float(b)) for b in PERCENTILE_BUCKETS] + ["+Inf"] and before["+Inf"] == 100
    normal_tail = before["+Inf"] - before["99.0"]  # rows served above the 99th percentile
    assert normal_tail <= 10
    # The same digits drifted: a checkerboard of +24 over them, beyond the pixels' 0..16.
    drifted = DIGITS[:100] + np.float32(24.0) * (np.indices((8, 8)).sum(axis=0) % 2)
    api.post("/v1/models/digits-mlp/reconstruct", json={"inputs": drifted.reshape(100, 64).tolist()})
    after = buckets(api.get("/metrics").text, "digits-mlp")
    assert after["+Inf"] == 200 and after["99.0"] - before["99.0"] <= 10  # nearly all of the drifted rows beyond 99
    assert after["+Inf"] - after["99.0"] - normal_tail >= 90
    encode_only = api.post("/v1/models/digits-pca/encode", json={"inputs": DIGITS[:2].reshape(2, 64).tolist()})
    assert encode_only.status_code == 200 and buckets(api.get("/metrics").text, "digits-pca") == {}  # only percentiles served count
