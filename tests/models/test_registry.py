"""Registry layout, atomic publishing, aliases, and names and folders that lead out of the registry."""
import json
import os
import time
from pathlib import Path

import pytest

from aeserve.models.checkpoint import MANIFEST, WEIGHTS, sha256_bytes
from aeserve.models.registry import NotFoundError, RegistryError
from aeserve.training.trainer import train
from tests.conftest import digits_run


@pytest.fixture
def published(registry):
    train(digits_run("digits", "pca"), registry, progress=False)
    return registry


def test_layout_versions_and_latest(published):
    train(digits_run("digits", "pca"), published, progress=False)
    folder = published.root / "digits"
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) == ["1", "2", "aliases.json"]
    assert json.loads((folder / "aliases.json").read_text()) == {"latest": "2"}
    for version in ("1", "2"):
        assert sorted(p.name for p in (folder / version).iterdir()) == ["graphs", MANIFEST, "map", "report", WEIGHTS]
    manifest = published.manifest("digits", 2)
    assert manifest["version"] == 2 and manifest["name"] == "digits"
    assert manifest["sha256"] == sha256_bytes((folder / "2" / WEIGHTS).read_bytes())
    # Every other file is listed with its sha256 and size; the graphs are named in the graphs section.
    others = sorted(str(p.relative_to(folder / "2")) for p in (folder / "2").rglob("*") if p.is_file() and p.name not in (MANIFEST, WEIGHTS))
    assert sorted(manifest["files"]) == others and "graphs/encode.onnx" in others
    for relative, entry in manifest["files"].items():
        data = (folder / "2" / relative).read_bytes()
        assert entry == {"sha256": sha256_bytes(data), "bytes": len(data)}
    assert manifest["graphs"]["files"] == {name: f"graphs/{name}.onnx" for name in ("encode", "decode", "project")}
    for key in ("kind", "config", "input_shape", "code_dim", "preprocessing", "created_at", "training", "metrics"):
        assert key in manifest
    for key in ("dataset", "data_fingerprint", "epochs", "seed", "seconds"):
        assert key in manifest["training"]
    for key in ("test_sq_err", "test_mse", "pca_sq_err", "error_quantiles"):
        assert key in manifest["metrics"]
    assert not [p for p in folder.iterdir() if p.name.startswith(".tmp")]  # no leftovers of the atomic write


def test_aliases(published):
    train(digits_run("digits", "pca"), published, progress=False)
    published.set_alias("digits", "1", "prod")
    assert published.aliases("digits") == {"latest": 2, "prod": 1}
    assert published.resolve("digits", "prod") == 1
    assert published.resolve("digits", "latest") == 2
    assert published.resolve("digits") == 2
    with pytest.raises(RegistryError, match="'latest' is kept at the highest version"):
        published.set_alias("digits", "1", "latest")
    with pytest.raises(NotFoundError, match=r"model 'digits' has no version or alias '7'; versions: \[1, 2\]"):
        published.set_alias("digits", "7", "prod")
    with pytest.raises(RegistryError, match="invalid alias '9lives'"):
        published.set_alias("digits", "1", "9lives")
    with pytest.raises(NotFoundError, match="unknown model 'nope'"):
        published.set_alias("nope", "1", "prod")
    assert not (published.root / "nope").exists()  # refused before the model's folder is made


def test_published_files_are_readable_as_the_models_folder_is(published):
    """Another user (a server in a container) reads what was published: the version folder and aliases.json take
    the model folder's permissions, not mkdtemp's 0700 and mkstemp's 0600."""
    folder = published.root / "digits"
    folder.chmod(0o750)
    train(digits_run("digits", "pca"), published, progress=False)
    published.set_alias("digits", "2", "prod")
    assert (folder / "2").stat().st_mode & 0o777 == 0o750
    assert (folder / "aliases.json").stat().st_mode & 0o777 == 0o640


@pytest.mark.parametrize("name", ["../x", "..", "a/b", "%2e%2e", "", ".hidden", "a" * 101])
def test_path_like_names_are_refused(published, name):
    with pytest.raises((RegistryError, NotFoundError)):
        published.load(name)


def test_unknown_model_and_version(published):
    with pytest.raises(NotFoundError, match=r"unknown model 'nope'; available: \['digits'\]"):
        published.resolve("nope")
    with pytest.raises(NotFoundError, match="has no version or alias 'staging'"):
        published.resolve("digits", "staging")
    for digit in ("²", "１", "١"):  # str.isdigit says yes to each; int() refuses the first and reads the others as 1
        with pytest.raises(NotFoundError, match=f"has no version or alias '{digit}'"):
            published.resolve("digits", digit)


def test_version_folder_symlinked_out_of_the_registry_is_refused(published, tmp_path):
    outside = tmp_path / "outside"
    os.rename(published.version_dir("digits", 1), outside)
    os.symlink(outside, published.root / "digits" / "1")
    with pytest.raises(RegistryError, match="resolves outside the registry"):
        published.load("digits")


def test_the_registry_is_the_flag_else_the_variable_else_a_folder_here(monkeypatch, tmp_path):
    from aeserve.models.registry import open_registry

    monkeypatch.delenv("AESERVE_REGISTRY", raising=False)
    monkeypatch.chdir(tmp_path)
    assert open_registry().root == Path("registry")
    monkeypatch.setenv("AESERVE_REGISTRY", "/srv/reg")
    assert open_registry().root == Path("/srv/reg")
    assert open_registry("/x").root == Path("/x")
    assert open_registry("file:///y").root == Path("/y")


def test_publishing_leaves_no_lock_even_when_it_fails(registry, monkeypatch):
    from aeserve.models import registry as registry_module

    def full_disk(path, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(registry_module, "write_synced", full_disk)
    with pytest.raises(OSError, match="No space left on device"):
        registry.publish("m", {"kind": "pca"}, b"weights", extra_files={"note.txt": b"1"})
    assert sorted(p.name for p in (registry.root / "m").iterdir()) == []
    monkeypatch.undo()
    assert registry.publish("m", {"kind": "pca"}, b"weights") == 1
    assert sorted(p.name for p in (registry.root / "m").iterdir()) == ["1", "aliases.json"]


def test_extra_files_stay_inside_the_version_folder(registry):
    for relative in ("../escape.txt", "/etc/passwd", MANIFEST, WEIGHTS):
        with pytest.raises(RegistryError, match=f"extra file {relative!r} must stay inside the version folder"):
            registry.publish("m", {"kind": "pca"}, b"weights", extra_files={relative: b""})
    assert registry.versions("m") == []


def test_concurrent_publishers_get_different_versions_though_the_lock_file_comes_and_goes(registry, monkeypatch):
    from concurrent.futures import ThreadPoolExecutor

    from aeserve.models import registry as registry_module

    write = registry_module.write_synced

    def slow_write(path, data):
        time.sleep(0.005)  # hold the lock a while, so that the others wait on it
        write(path, data)

    monkeypatch.setattr(registry_module, "write_synced", slow_write)
    with ThreadPoolExecutor(8) as pool:
        versions = list(pool.map(lambda i: registry.publish("m", {"kind": "pca"}, bytes([i]), extra_files={"note.txt": str(i).encode()}),
                                 range(16)))
    assert sorted(versions) == list(range(1, 17))
    for i, version in enumerate(versions):
        folder = registry.version_dir("m", version)
        assert (folder / WEIGHTS).read_bytes() == bytes([i]) and (folder / "note.txt").read_text() == str(i)
    assert ".lock" not in {p.name for p in (registry.root / "m").iterdir()}
