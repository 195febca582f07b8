"""The batch job on Ray: ``aeserve encode --engine ray`` on a local cluster of 2 CPUs writes the file the local job
writes, and a Ray Data pipeline of ``aeserve.batch.Encoder`` actors gives the same codes (slow: Ray starts a cluster)."""
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sklearn.datasets import load_digits

import aeserve.training.batch.inputs as inputs
from aeserve.cli import main
from aeserve.models.registry import Registry
from aeserve.training.config import build_run_config
from aeserve.training.trainer import train

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


@pytest.fixture
def reg(trained_registry: Registry, tmp_path) -> Registry:
    root = tmp_path / "registry"
    shutil.copytree(trained_registry.root / "digits-mlp", root / "digits-mlp")
    return Registry(root)


def codes(path) -> np.ndarray:
    return np.stack(pq.read_table(path).column("code").to_numpy(zero_copy_only=False))


def test_engine_ray_writes_the_local_jobs_file(cluster, reg, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(inputs, "BLOCK_BYTES", 64 * 64 * 4)  # blocks of 64 rows: 5 blocks over the 2 actors
    path = tmp_path / "digits.npy"
    np.save(path, load_digits().images[:300].astype(np.float32))
    args = ["encode", "digits-mlp", "--data", str(path), "--registry", str(reg.root), "--quiet", "--codes", "int8", "--with", "reconstruct"]
    assert main([*args, "--out", str(tmp_path / "local.parquet")]) == 0
    assert main([*args, "--out", str(tmp_path / "ray.parquet"), "--engine", "ray"]) == 0
    assert "wrote 300 codes of digits-mlp:1" in capsys.readouterr().out
    local, on_ray = pq.read_table(tmp_path / "local.parquet"), pq.read_table(tmp_path / "ray.parquet")
    assert on_ray.schema == local.schema and on_ray.column("row").to_pylist() == list(range(300))
    assert pq.ParquetFile(tmp_path / "ray.parquet").num_row_groups == 5
    # The same blocks through the same code: the same bits (the actors run torch on one core, this process on two;
    # the small model's kernels give the same sums either way).
    np.testing.assert_array_equal(codes(tmp_path / "ray.parquet"), codes(tmp_path / "local.parquet"))
    np.testing.assert_array_equal(on_ray.column("scores").to_numpy(), local.column("scores").to_numpy())


def test_a_ray_data_pipeline_of_encoders_gives_the_jobs_codes(cluster, tmp_path):
    from aeserve.batch import Encoder

    rng = np.random.default_rng(0)
    table = pa.table({"id": [f"k{i:03d}" for i in range(200)], "small": rng.normal(0.05, 0.01, 200), "large": rng.normal(2000, 400, 200),
                      "colour": rng.choice(["red", "green", "blue"], 200)})
    pq.write_table(table, tmp_path / "rows.parquet", row_group_size=50)
    registry = Registry(tmp_path / "registry")
    train(build_run_config({"name": "rows", "data": {"source": "table", "path": str(tmp_path / "rows.parquet"), "exclude": ["id"],
                                                     "categorical": ["colour"]},
                            "model": {"kind": "mlp", "code_dim": 2, "hidden": [16]}, "train": {"epochs": 2, "batch_size": 16, "report": False}}),
          registry, progress=False)
    assert main(["encode", "rows", "--data", str(tmp_path / "rows.parquet"), "--id", "id", "--out", str(tmp_path / "job.parquet"),
                 "--registry", str(registry.root), "--quiet"]) == 0
    ds = ray.data.read_parquet(str(tmp_path / "rows.parquet"), override_num_blocks=4).map_batches(
        Encoder, fn_constructor_kwargs=dict(registry=str(registry.root), name="rows", version=1), concurrency=2, batch_size=50,
        num_cpus=0.5)  # half a CPU each: on a 2-CPU cluster two whole-CPU actors would leave the read tasks none
    answer = sorted(ds.take_all(), key=lambda row: row["id"])
    assert [row["id"] for row in answer] == table.column("id").to_pylist()
    got = np.stack([row["code"] for row in answer])
    # Ray Data may hand the actors other batches than the job's blocks, and float32 sums over other batch shapes may
    # differ in the last bits: equal within a few ulps rather than bit for bit.
    np.testing.assert_allclose(got, codes(tmp_path / "job.parquet"), rtol=1e-6, atol=1e-6)
