"""The ONNX export child never outlives the server that started it."""
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest


def gone(pid: int) -> bool:
    """The process has exited (a zombie waiting for a reaper counts as exited)."""
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0] == "Z"
    except (FileNotFoundError, IndexError):
        return True


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc")
def test_the_export_child_stops_and_cleans_up_when_its_server_is_killed(trained_registry):
    folder = trained_registry.version_dir("digits-conv", 1)
    script = textwrap.dedent(f"""
        import time
        from pathlib import Path
        from aeserve.service.runtime.export import GraphExport
        export = GraphExport([Path({str(folder)!r})])
        print(export._child.pid, export._out.name, flush=True)
        time.sleep(120)
    """)
    server = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        pid, out = server.stdout.readline().split()
        time.sleep(0.5)
        assert not gone(int(pid))  # exporting
    finally:
        server.kill()
        server.wait()
    deadline = time.monotonic() + 30
    while not (gone(int(pid)) and not Path(out).exists()):
        assert time.monotonic() < deadline, "the export child outlived its server, or left its files"
        time.sleep(0.1)
