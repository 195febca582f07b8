"""Registries in object storage: the S3 API (moto's server on loopback) and fsspec's memory store.

What must hold on every backend: a reader sees a version whole or not at all, concurrent publishers of one name
get distinct versions and lose nothing, alias updates are compare-and-swap, published objects are never
overwritten, and a version is downloaded once into the local copy, verified by sha256.
"""
from __future__ import annotations

import json
import threading
import uuid

import numpy as np
import pytest

from aeserve.models.checkpoint import MANIFEST, WEIGHTS, sha256_bytes
from aeserve.models.mirror import Changes
from aeserve.models.registry import Registry, RegistryError, open_registry
from aeserve.models.remote import CLAIM, ConflictError, ObjectRegistry
from aeserve.models.served import load_served
from aeserve.models.version import ENCODE
from aeserve.training.trainer import train
from tests.conftest import digits_run


def publish_bytes(registry, name: str, weights: bytes = b"weights", extra: dict[str, bytes] | None = None) -> int:
    """Publish a version with stand-in weights: the registry does not look inside them."""
    return registry.publish(name, {"kind": "pca"}, weights, extra_files=extra)


@pytest.fixture
def memory_registry(tmp_path) -> ObjectRegistry:
    return open_registry(f"memory://aeserve-{uuid.uuid4().hex[:8]}/models", cache=tmp_path / "cache")


@pytest.fixture
def s3_registry(s3_bucket, tmp_path) -> ObjectRegistry:
    return open_registry(f"{s3_bucket}/registry", cache=tmp_path / "cache")


def test_open_registry_forms(tmp_path, monkeypatch):
    assert isinstance(open_registry(tmp_path / "r"), Registry)
    local = open_registry(f"file://{tmp_path}/r")
    assert isinstance(local, Registry) and local.root == tmp_path / "r"
    monkeypatch.setenv("AESERVE_REGISTRY", "memory://from-env/prefix")
    from_env = open_registry(None)
    assert isinstance(from_env, ObjectRegistry) and from_env.location == "memory://from-env/prefix"
    with pytest.raises(RegistryError, match="cannot open the registry nosuchscheme://x"):
        open_registry("nosuchscheme://x")


@pytest.mark.parametrize("backend", ["memory_registry", "s3_registry"])
def test_publish_layout_and_reading(backend, request):
    registry = request.getfixturevalue(backend)
    assert registry.names() == []
    assert publish_bytes(registry, "m", b"one", {"map/sample.json": b"{}"}) == 1
    assert publish_bytes(registry, "m", b"two") == 2
    fs, root = registry.fs, registry.root
    assert fs.cat_file(f"{root}/m/1/{WEIGHTS}") == b"one"
    assert fs.cat_file(f"{root}/m/1/map/sample.json") == b"{}"
    manifest = registry.manifest("m", 1)
    assert (manifest["name"], manifest["version"], manifest["sha256"]) == ("m", 1, sha256_bytes(b"one"))
    assert registry.listing(fresh=True).manifests == {"m": {1, 2}}
    assert registry.names() == ["m"] and registry.versions("m") == [1, 2]
    assert registry.aliases("m") == {"latest": 2} and registry.resolve("m") == 2


@pytest.mark.parametrize("backend", ["memory_registry", "s3_registry"])
def test_a_claimed_number_is_skipped_and_a_half_written_version_is_never_listed(backend, request):
    registry = request.getfixturevalue(backend)
    publish_bytes(registry, "m")
    # Another publisher holds version 2 and has written its weights, but not its manifest (it may have been killed).
    registry.fs.pipe_file(f"{registry.root}/m/2/{CLAIM}", b"{}")
    registry.fs.pipe_file(f"{registry.root}/m/2/{WEIGHTS}", b"half")
    assert registry.listing(fresh=True).manifests == {"m": {1}}
    assert registry.versions("m") == [1] and registry.resolve("m", "latest") == 1
    assert publish_bytes(registry, "m", b"three") == 3
    assert registry.fs.cat_file(f"{registry.root}/m/2/{WEIGHTS}") == b"half"  # nobody overwrote the claimed number's files


def test_published_objects_are_never_overwritten(s3_registry):
    publish_bytes(s3_registry, "m", b"one")
    with pytest.raises(ConflictError, match="exists already"):
        s3_registry._create(f"{s3_registry.root}/m/1/{WEIGHTS}", b"other")
    assert s3_registry.fs.cat_file(f"{s3_registry.root}/m/1/{WEIGHTS}") == b"one"


def test_concurrent_publishers_get_distinct_versions_and_lose_nothing(s3_registry):
    """Eight threads, each with its own connection to the store, publish three versions each at the same moment."""
    barrier = threading.Barrier(8)
    published: list[tuple[int, bytes]] = []
    errors: list[BaseException] = []

    def publisher(i: int) -> None:
        mine = open_registry(s3_registry.location)
        mine.fs = type(s3_registry.fs)(skip_instance_cache=True)  # no shared client: as separate processes would be
        try:
            barrier.wait()
            for j in range(3):
                weights = f"publisher {i} run {j}".encode()
                published.append((mine.publish("race", {"kind": "pca"}, weights), weights))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=publisher, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    versions = sorted(v for v, _ in published)
    assert versions == sorted(set(versions)) and len(versions) == 24
    assert s3_registry.listing(fresh=True).manifests["race"] == set(versions)
    for version, weights in published:  # each version holds exactly what its publisher wrote
        assert s3_registry.fs.cat_file(f"{s3_registry.root}/race/{version}/{WEIGHTS}") == weights
        assert s3_registry.manifest("race", version)["sha256"] == sha256_bytes(weights)


def test_alias_updates_are_compare_and_swap(s3_registry):
    for _ in range(3):
        publish_bytes(s3_registry, "m")
    s3_registry.set_alias("m", "1", "prod")
    key = f"{s3_registry.root}/m/aliases.json"
    _, tag = s3_registry._read_tagged(key)
    s3_registry.set_alias("m", "2", "canary")  # changes the object: the tag read before is stale now
    with pytest.raises(ConflictError, match="changed since it was read"):
        s3_registry._swap(key, b'{"prod": "3"}', tag)
    assert s3_registry.aliases("m") == {"canary": 2, "latest": 3, "prod": 1}

    # Updates racing from many threads: each retries on a lost swap, so none is lost.
    barrier = threading.Barrier(6)

    def setter(i: int) -> None:
        mine = open_registry(s3_registry.location)
        mine.fs = type(s3_registry.fs)(skip_instance_cache=True)
        barrier.wait()
        mine.set_alias("m", str(1 + i % 3), f"a{i}")

    threads = [threading.Thread(target=setter, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    aliases = s3_registry.aliases("m")
    assert {f"a{i}": 1 + i % 3 for i in range(6)}.items() <= aliases.items()
    assert aliases["prod"] == 1 and aliases["canary"] == 2


def test_alias_rules_are_the_local_ones(memory_registry):
    publish_bytes(memory_registry, "m")
    with pytest.raises(RegistryError, match="'latest' is kept at the highest version"):
        memory_registry.set_alias("m", "1", "latest")
    with pytest.raises(LookupError, match="has no version or alias '7'"):
        memory_registry.set_alias("m", "7", "prod")
    memory_registry.set_alias("m", "1", "prod")
    assert memory_registry.aliases("m") == {"latest": 1, "prod": 1}


def test_the_local_copy_downloads_each_version_once_and_verifies_it(s3_registry, tmp_path):
    publish_bytes(s3_registry, "m", b"one", {"map/sample.json": b"[1]"})
    mirror = s3_registry.mirror()
    assert mirror.sync().copied == ["m:1"]
    first = mirror.bytes_fetched
    assert first > len(b"one")
    folder = mirror.local.version_dir("m", 1)
    assert sorted(p.name for p in folder.iterdir()) == [MANIFEST, "map", WEIGHTS]
    assert (folder / WEIGHTS).read_bytes() == b"one" and (mirror.cache / "sha256" / sha256_bytes(b"one")).read_bytes() == b"one"
    assert mirror.sync() == Changes() and mirror.bytes_fetched == first  # a poll with nothing new lists, and fetches nothing

    # A version whose weights do not match its manifest is refused, not copied, and not fetched again.
    publish_bytes(s3_registry, "m", b"two")
    s3_registry.fs.call_s3("put_object", Bucket=s3_registry.root.split("/")[0], Key="registry/m/2/" + WEIGHTS, Body=b"tampered")
    assert mirror.sync().copied == []
    assert "sha256" in mirror.refused["m:2"] and mirror.local.versions("m") == [1]
    fetched = mirror.bytes_fetched
    assert mirror.sync().copied == [] and mirror.bytes_fetched == fetched

    # The same weights published under another name are not downloaded again: the copy is keyed by sha256.
    publish_bytes(s3_registry, "n", b"one")
    before = mirror.bytes_fetched
    assert mirror.sync().copied == ["n:1"]
    assert mirror.bytes_fetched - before < 1000  # the manifest only

    # Aliases follow the store, fetched only when the aliases file changed.
    s3_registry.set_alias("m", "1", "prod")
    mirror.sync()
    assert mirror.local.aliases("m") == {"latest": 1, "prod": 1}


def test_the_local_copy_is_kept_per_store_url_and_endpoint(tmp_path, monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    from_env = ObjectRegistry("s3://bars/registry", tmp_path, skip_instance_cache=True).mirror()
    other = ObjectRegistry("s3://bars/registry", tmp_path, endpoint_url="http://127.0.0.1:10", skip_instance_cache=True).mirror()
    same = ObjectRegistry("s3://bars/registry/", tmp_path, skip_instance_cache=True).mirror()
    assert from_env.local.root != other.local.root and same.local.root == from_env.local.root
    assert (from_env.local.root / "source.txt").read_text() == "s3://bars/registry\nhttp://127.0.0.1:9\n"
    assert (other.local.root / "source.txt").read_text() == "s3://bars/registry\nhttp://127.0.0.1:10\n"
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    default = ObjectRegistry("s3://bars/registry", tmp_path, skip_instance_cache=True)
    assert default.identity == "s3://bars/registry at the default endpoint"
    assert default.mirror().local.root not in (from_env.local.root, other.local.root)


def test_a_version_the_store_no_longer_lists_leaves_the_local_copy(s3_registry):
    for weights in (b"one", b"two", b"three"):
        publish_bytes(s3_registry, "m", weights)
    s3_registry.set_alias("m", "3", "prod")
    mirror = s3_registry.mirror()
    assert mirror.sync().copied == ["m:1", "m:2", "m:3"]
    assert mirror.local.aliases("m") == {"latest": 3, "prod": 3}

    s3_registry.fs.rm(f"{s3_registry.root}/m/3", recursive=True)
    assert mirror.sync() == Changes(removed=["m:3"])
    assert mirror.local.versions("m") == [1, 2]
    assert mirror.local.aliases("m") == {"latest": 2}  # the store's aliases.json still says prod: 3, a version it no longer has
    assert s3_registry.mirror().sync() == Changes()  # a restart finds the copy as the store is

    # Removed while no copy was running: a restart takes it out; a number published again is copied again.
    s3_registry.fs.rm(f"{s3_registry.root}/m/1", recursive=True)
    assert publish_bytes(s3_registry, "m", b"three again") == 3
    restarted = s3_registry.mirror()
    assert restarted.sync() == Changes(copied=["m:3"], removed=["m:1"])
    assert (restarted.local.version_dir("m", 3) / WEIGHTS).read_bytes() == b"three again"

    # A name gone from the store is gone from the copy.
    s3_registry.fs.rm(f"{s3_registry.root}/m", recursive=True)
    assert restarted.sync() == Changes(removed=["m:2", "m:3"])
    assert restarted.local.names() == [] and restarted.local.aliases("m") == {}


def test_a_recreated_bucket_replaces_the_copies_of_its_versions(s3_registry):
    bucket = s3_registry.root.split("/")[0]

    def recreate_with(weights: bytes) -> None:
        s3_registry.fs.rm(bucket, recursive=True)  # the objects and the bucket
        s3_registry.fs.mkdir(bucket)
        assert publish_bytes(s3_registry, "m", weights) == 1

    publish_bytes(s3_registry, "m", b"old")
    mirror = s3_registry.mirror()
    assert mirror.sync().copied == ["m:1"]

    recreate_with(b"new")
    assert mirror.sync() == Changes(replaced=["m:1"])
    assert (mirror.local.version_dir("m", 1) / WEIGHTS).read_bytes() == b"new"
    assert mirror.local.manifest("m", 1)["sha256"] == sha256_bytes(b"new") == s3_registry.manifest("m", 1)["sha256"]

    # After a restart too: the copy is checked against the store's manifest once, and replaced.
    recreate_with(b"newer")
    restarted = s3_registry.mirror()
    assert restarted.sync() == Changes(replaced=["m:1"])
    assert (restarted.local.version_dir("m", 1) / WEIGHTS).read_bytes() == b"newer"
    assert restarted.sync() == Changes()

    # Other contents that cannot be copied (weights that do not match their manifest): the old copy is taken out all the same.
    recreate_with(b"newest")
    s3_registry.fs.call_s3("put_object", Bucket=bucket, Key="registry/m/1/" + WEIGHTS, Body=b"tampered")
    assert restarted.sync() == Changes(removed=["m:1"])
    assert restarted.local.versions("m") == [] and "sha256" in restarted.refused["m:1"]


def test_train_publishes_to_object_storage_and_loads_back(s3_registry, tmp_path):
    version = train(digits_run("digits", "pca"), s3_registry, progress=False)
    assert version == 1
    loaded = s3_registry.load("digits")
    assert json.loads(s3_registry.fs.cat_file(f"{s3_registry.root}/digits/1/{MANIFEST}"))["sha256"] == loaded.manifest["sha256"]
    assert (tmp_path / "cache" / "sha256" / loaded.manifest["sha256"]).is_file()
    x = np.random.default_rng(0).random((3, 64), dtype=np.float32)
    assert loaded.encode(x).shape == (3, 4)
    # The stored graphs travel with the version: in the store, listed with their sha256, and in the server's local copy.
    listed = loaded.manifest["files"]
    assert {"graphs/encode.onnx", "graphs/decode.onnx", "graphs/project.onnx"} <= set(listed)
    for relative, entry in listed.items():
        assert sha256_bytes(s3_registry.fs.cat_file(f"{s3_registry.root}/digits/1/{relative}")) == entry["sha256"]
    served = load_served(s3_registry.mirror().local.version_dir("digits", 1))
    np.testing.assert_allclose(served.run(ENCODE, x)[0], loaded.encode(x), rtol=1e-4, atol=1e-5)


def test_a_copy_polling_while_versions_are_published_sees_each_whole(s3_registry):
    """A poll that lists a version folder before its manifest exists must still see the version once it does."""
    mirror = s3_registry.mirror()
    writer = open_registry(s3_registry.location)
    writer.fs = type(s3_registry.fs)(skip_instance_cache=True, use_listings_cache=False)
    stop, failures = threading.Event(), []

    def poll() -> None:
        while not stop.is_set():
            try:
                mirror.sync()
            except BaseException as e:  # noqa: BLE001 - reported below
                failures.append(e)
                return

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        for i in range(8):
            publish_bytes(writer, "m", f"weights {i}".encode(), {"map/sample.json": b"{}"})
    finally:
        stop.set()
        poller.join()
    assert not failures and not mirror.refused
    mirror.sync()
    assert mirror.local.versions("m") == list(range(1, 9))
    for version in range(1, 9):
        assert (mirror.local.version_dir("m", version) / WEIGHTS).read_bytes() == f"weights {version - 1}".encode()
