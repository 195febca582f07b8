"""The model store: hostile versions, aliases and folders are refused alone while the good ones load; new versions are
published before their engine arrives, and a refresh runs torch on one thread."""
import json
import logging
import shutil
import struct
import threading

import numpy as np
import pytest
import torch

from aeserve.models.checkpoint import MANIFEST
from aeserve.service.runtime import engines as engines_module
from aeserve.service.runtime.engines import Engines
from aeserve.service.runtime.store import ModelStore
from aeserve.training.trainer import train
from tests.conftest import digits_run, strip_graphs, tamper_version

IMAGES = (np.random.default_rng(5).random((3, 8, 8)) * 16).astype(np.float32)


def _tamper(registry, name, weights: bytes | None = None, **manifest_changes):
    tamper_version(registry, name, weights, **manifest_changes)


def safetensors_bytes(header: dict, data: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


HOSTILE = {
    "header-claims-huge-length": lambda r, n: _tamper(r, n, weights=struct.pack("<Q", 2**60) + b"{}"),
    "offsets-past-the-end": lambda r, n: _tamper(r, n, weights=safetensors_bytes(
        {"model.mean": {"dtype": "F32", "shape": [64], "data_offsets": [0, 256]}}, b"\0" * 16)),
    "overlapping-offsets": lambda r, n: _tamper(r, n, weights=safetensors_bytes(
        {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}, "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}},
        b"\0" * 24)),
    "pickle-instead-of-weights": lambda r, n: _tamper(r, n, weights=b"\x80\x04\x95\x10\x00\x00\x00\x00\x00\x00\x00}\x94."),
    "unknown-kind": lambda r, n: _tamper(r, n, kind="os.system"),
    "absurd-sizes": lambda r, n: _tamper(r, n, config={"code_dim": 10**9}),
    "wrong-sha256": lambda r, n: _tamper(r, n, sha256="0" * 64),
    "manifest-not-json": lambda r, n: (r.version_dir(n, 1) / MANIFEST).write_text("{not json"),
    "manifest-contradicts-its-model": lambda r, n: _tamper(r, n, code_dim=9, input_shape=[64]),
}


@pytest.mark.parametrize("attack", sorted(HOSTILE))
def test_hostile_versions_are_refused_logged_and_the_good_model_keeps_serving(registry, trained_registry, attack, caplog):
    for name in ("good", "bad"):  # copies of a trained version (training each would cost a second per attack)
        shutil.copytree(trained_registry.version_dir("digits-pca", 1), registry.root / name / "1")
    HOSTILE[attack](registry, "bad")
    store = ModelStore(registry)
    with caplog.at_level(logging.ERROR, logger="aeserve.store"):
        store.refresh()
    assert store.names() == ["good"]
    assert "bad:1" in store.failed
    assert any("refused bad:1" in record.getMessage() for record in caplog.records)
    assert store.get("good").encode(IMAGES).shape == (3, 4)


def test_aliases_and_symlinks_that_lead_out_of_the_registry_are_ignored(registry, tmp_path):
    train(digits_run("m", "pca"), registry, progress=False)
    folder = registry.root / "m"
    (folder / "aliases.json").write_text(json.dumps({"latest": "1", "prod": "../../etc", "x": "/tmp"}))
    (tmp_path / "elsewhere").mkdir()
    (folder / "2").symlink_to(tmp_path / "elsewhere")
    (tmp_path / "elsewhere" / MANIFEST).write_text("{}")
    store = ModelStore(registry)
    store.refresh()
    assert store.entry("m").aliases == {"latest": 1}
    assert sorted(store.entry("m").versions) == [1]
    assert "outside the registry" in store.failed["m:2"]


def test_new_versions_serve_before_their_engine_arrives(service_registry, monkeypatch):
    exports = []

    class RecordingExport:
        def __init__(self, folders):
            self.folders = folders
            exports.append(self)

        def collect(self, versions, take):
            self.serving = {name: [v for n, v in store.loaded() if n == name] for name in store.names()}
            self.versions = [f"{v.name}:{v.version}" for v in versions]

    monkeypatch.setattr(engines_module, "GraphExport", RecordingExport)
    strip_graphs(service_registry, "digits-mlp")  # published before graphs were stored: the server exports them
    store = ModelStore(service_registry, engines=Engines("cpu", "onnx", engine_process=False), only=["digits-mlp"])
    assert store.refresh() == ["digits-mlp:1"]
    (export,) = exports
    assert export.folders == [service_registry.version_dir("digits-mlp", 1)]
    assert export.serving == {"digits-mlp": [1]}  # published before the engine was attached
    assert export.versions == ["digits-mlp:1"]
    assert store.refresh() == [] and len(exports) == 1  # nothing new: no export


def test_stored_graphs_go_to_the_small_engine_without_an_export(service_registry, monkeypatch):
    exports, taken = [], []
    monkeypatch.setattr(engines_module, "GraphExport", lambda folders: exports.append(folders))
    engines = Engines("cpu", "onnx", engine_process=False)
    monkeypatch.setattr(engines.small, "take", lambda version, graphs: taken.append((version.name, sorted(graphs), graphs["encode"][:4])))
    store = ModelStore(service_registry, engines=engines, only=["digits-mlp"])
    assert store.refresh() == ["digits-mlp:1"]
    encode = (service_registry.version_dir("digits-mlp", 1) / "graphs" / "encode.onnx").read_bytes()
    assert exports == [] and taken == [("digits-mlp", ["decode", "encode", "project"], encode[:4])]


def test_a_refresh_runs_torch_on_its_own_thread_alone(service_registry, monkeypatch):
    """Loading and warm-up run torch on one thread, so that OpenMP starts teams of threads for the model threads
    only (more teams than cores and libgomp stops spin-waiting in all of them); the thread's setting comes back."""
    during, after, load = [], [], service_registry.load

    def recording(*args, **kwargs):
        during.append(torch.get_num_threads())
        return load(*args, **kwargs)

    def refresh():
        torch.set_num_threads(2)
        store = ModelStore(service_registry, only=["digits-mlp"])
        monkeypatch.setattr(store.registry, "load", recording)
        assert store.refresh() == ["digits-mlp:1"]
        after.append(torch.get_num_threads())

    thread = threading.Thread(target=refresh)
    thread.start()
    thread.join()
    assert during == [1] and after == [2]


def test_a_refresh_that_fails_after_loading_stops_its_export(service_registry, monkeypatch):
    closed = []

    class RecordingExport:
        def __init__(self, folders):
            pass

        def close(self):
            closed.append(True)

    def unreadable(name):
        raise PermissionError(f"aliases.json of {name}: permission denied")
    monkeypatch.setattr(engines_module, "GraphExport", RecordingExport)
    strip_graphs(service_registry, "digits-mlp")
    store = ModelStore(service_registry, engines=Engines("cpu", "onnx", engine_process=False), only=["digits-mlp"])
    monkeypatch.setattr(store.registry, "aliases", unreadable)
    with pytest.raises(PermissionError, match="aliases.json of digits-mlp"):
        store.refresh()
    assert closed == [True]


@pytest.mark.parametrize("aliases", ['[' * 100_000 + ']' * 100_000, '{"prod": "' + '9' * 5000 + '"}', '{"prod": ' + '9' * 5000 + '}'])
def test_an_unreadable_aliases_file_counts_as_no_aliases_and_stops_no_model(registry, trained_registry, aliases):
    """Nested past the parser's recursion limit, or a version of thousands of digits: that model keeps its versions
    without aliases, and every other model still loads (the refresh used to raise for all of them)."""
    for name in ("good", "bad"):
        shutil.copytree(trained_registry.version_dir("digits-pca", 1), registry.root / name / "1")
    (registry.root / "bad" / "aliases.json").write_text(aliases)
    store = ModelStore(registry)
    store.refresh()
    assert store.names() == ["bad", "good"] and store.loaded_once
    assert store.entry("bad").aliases == {"latest": 1}


def test_a_version_folder_copied_under_another_number_or_with_linked_files_is_refused(registry, trained_registry, tmp_path):
    shutil.copytree(trained_registry.version_dir("digits-pca", 1), registry.root / "m" / "1")
    shutil.copytree(registry.root / "m" / "1", registry.root / "m" / "2")  # its manifest says version 1
    shutil.copytree(registry.root / "m" / "1", registry.root / "m" / "3")
    outside = tmp_path / "manifest.json"
    shutil.move(registry.root / "m" / "3" / MANIFEST, outside)
    (registry.root / "m" / "3" / MANIFEST).symlink_to(outside)
    store = ModelStore(registry)
    store.refresh()
    assert sorted(store.entry("m").versions) == [1]
    assert "the manifest is of version 1, but it sits in m/2" in store.failed["m:2"]
    assert "manifest.json: not a regular file" in store.failed["m:3"]
