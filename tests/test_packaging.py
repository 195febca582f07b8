"""The packages install as aeserve.models, aeserve.training and aeserve.service, and nothing else at the top level."""
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_the_packages_import_from_outside_the_repository(tmp_path):
    code = ("import importlib.util, aeserve.models.checkpoint, aeserve.training.trainer, aeserve.service.app, aeserve_client; "
            "print(sorted(n for n in ('models', 'training', 'service') if importlib.util.find_spec(n)))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_a_bare_aeserve_folder_first_on_the_path_does_not_hide_the_installed_subpackages(tmp_path):
    """Run from a checkout's root, ./aeserve/ (without models/ and the others) comes before an installed aeserve."""
    shadow, installed = tmp_path / "checkout" / "aeserve", tmp_path / "site" / "aeserve"
    shadow.mkdir(parents=True)
    shutil.copy(ROOT / "aeserve" / "__init__.py", shadow / "__init__.py")
    (installed / "models").mkdir(parents=True)
    shutil.copy(ROOT / "aeserve" / "__init__.py", installed / "__init__.py")
    (installed / "models" / "__init__.py").write_text("WHERE = 'installed'\n")
    code = "import aeserve.models; print(aeserve.models.WHERE)"
    env = {"PYTHONPATH": f"{shadow.parent}:{installed.parent}", "PATH": ""}
    out = subprocess.run([sys.executable, "-S", "-c", code], cwd=shadow.parent, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "installed"


@pytest.mark.slow
def test_the_wheel_holds_only_aeserve_and_aeserve_client(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
                   check=True, capture_output=True)
    (wheel,) = tmp_path.glob("aeserve-*.whl")
    tops = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist() if not name.split("/")[0].endswith(".dist-info")}
    assert tops == {"aeserve", "aeserve_client"}
    names = zipfile.ZipFile(wheel).namelist()
    assert "aeserve/models/checkpoint.py" in names and "aeserve/service/runtime/engines.py" in names and "aeserve/service/static/index.html" in names
