"""A loaded version run in this process: nothing changes global state to run it, and request bodies' read-only
buffers go through without a warning."""
import subprocess
import sys

from aeserve.training.trainer import train
from tests.conftest import digits_run

# In a fresh interpreter: torch warns about a read-only array once per process, and a test run has many.
RUN = """
import sys, warnings
import numpy as np, torch
before = list(warnings.filters)
from aeserve.models.registry import Registry
import aeserve.service.runtime.engines
assert warnings.filters == before, "importing aeserve changed the warnings filters"
version = Registry(sys.argv[1]).load("digits")
warnings.simplefilter("error")
def read_only(a):
    return np.frombuffer(np.ascontiguousarray(a, np.float32).tobytes(), np.float32).reshape(a.shape)
rows = read_only(np.arange(128).reshape(2, 64) % 17)
codes = read_only(version.encode(rows))
assert not rows.flags.writeable and not codes.flags.writeable
np.testing.assert_array_equal(version.decode(codes), version.decode(codes.copy()))
np.testing.assert_array_equal(version.reconstruct(rows)[0], version.reconstruct(rows.copy())[0])
print("ok")
"""


def test_read_only_rows_and_codes_run_without_a_warning_or_a_global_filter(registry):
    train(digits_run("digits", "mlp", epochs=1, report=False), registry, progress=False)
    out = subprocess.run([sys.executable, "-c", RUN, str(registry.root)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
