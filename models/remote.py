"""A registry in object storage (``s3://``, ``gs://``, or any fsspec URL), and its local copy.

The layout is the local one: ``<prefix>/<name>/<version>/{manifest.json,weights.safetensors,...}`` and
``<prefix>/<name>/aliases.json``. Object stores have no rename, so a version is published in three steps:

1. claim: a tiny ``<name>/<version>/.claim`` object created only if absent (S3 ``If-None-Match: *``, GCS
   ``ifGenerationMatch=0``); a publisher that loses the race for a number takes the next one;
2. the weights and other files, under the claimed number that nobody else writes;
3. ``manifest.json``, also create-if-absent: the commit marker. Readers list a version only once its
   manifest exists, and check the weights against the manifest's sha256 when they fetch them.

A publisher killed between 1 and 3 leaves a claimed number without a manifest; it is never listed and the
next publisher skips it. Alias updates are compare-and-swap on ``aliases.json`` (S3 ``If-Match`` on its
ETag); stores whose fsspec backend offers no such condition fall back to read, write and read back, which
tells a loser of the race that its update was lost (see docs/deploy.md).

Models are loaded from a local copy (``Mirror``): a version is downloaded once, its weights verified by
sha256 and kept under their hash, and installed into a local registry folder atomically; the server serves
from that copy, so a restart with the store unreachable serves what was copied before. Whenever the store
answers, it is the source of truth: the copy is kept per store (URL and endpoint), a version the store no
longer lists is taken out of it, and one whose manifest differs from the store's is replaced.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from aeserve.models.checkpoint import MANIFEST, WEIGHTS, sha256_bytes
from aeserve.models.registry import (
    ALIASES,
    NAME_PATTERN,
    Registry,
    RegistryError,
    aliases_json,
    check_alias_update,
    check_name,
    finished_manifest,
    is_number,
    resolve,
    valid_aliases,
    version_files,
)
from aeserve.models.version import ModelVersion

log = logging.getLogger("aeserve.registry")

CLAIM = ".claim"
# Tries at claiming a version number, and at an alias update that keeps losing its compare-and-swap.
CLAIM_TRIES = 1000
ALIAS_TRIES = 20


# No listings cache: a registry is listed to see what changed, and fsspec's cache would keep a version folder's listing
# from before its manifest arrived. Fail fast when the store is down: a failed poll is retried at the next one anyway,
# and a server whose store went away must notice in seconds, not minutes (botocore: 60 s to connect, 5 attempts).
STORAGE_OPTIONS: dict[str, dict[str, Any]] = {
    "s3": {"use_listings_cache": False,
           "config_kwargs": {"connect_timeout": 2, "read_timeout": 30, "retries": {"max_attempts": 2, "mode": "standard"}}},
    "gs": {"use_listings_cache": False},
}
STORAGE_OPTIONS["s3a"] = STORAGE_OPTIONS["s3"]
STORAGE_OPTIONS["gcs"] = STORAGE_OPTIONS["gs"]
# Where a backend takes its endpoint from the environment when no option names one (botocore reads the S3 one first).
ENDPOINT_ENVIRONMENT = {"s3": ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"), "gs": ("STORAGE_EMULATOR_HOST",)}


class ConflictError(RuntimeError):
    """A conditional write lost: the object exists already, or changed since it was read."""


def precondition_failed(error: OSError) -> bool:
    """Whether a store refused a conditional write (s3fs reports it as EINVAL with the store's message)."""
    return "precondition" in str(error).lower().replace("-", "")


def cache_root(explicit: str | os.PathLike[str] | None = None) -> Path:
    """Where local copies of remote registries live: ``explicit``, else ``$AESERVE_CACHE``, else ``~/.cache/aeserve``."""
    return Path(explicit or os.environ.get("AESERVE_CACHE") or Path.home() / ".cache" / "aeserve")


def object_tag(info: dict[str, Any]) -> str:
    """What changes when an object is written again: its ETag or generation, else its size and time."""
    return str(info.get("ETag") or info.get("generation") or (info.get("size"), info.get("LastModified") or info.get("mtime") or info.get("created")))


@dataclass(frozen=True)
class Listing:
    """One listing of the store: what a poll costs (a paginated LIST, no GETs)."""
    manifests: dict[str, set[int]]  # name -> versions with a manifest (published)
    taken: dict[str, set[int]]  # name -> versions with any object (published or claimed)
    alias_tags: dict[str, str]  # name -> the aliases file's tag (``object_tag``)
    manifest_tags: dict[str, dict[int, str]]  # name -> version -> its manifest's tag


class ObjectRegistry:
    """A registry at an fsspec URL; the same methods as the local ``Registry``."""

    def __init__(self, url: str, cache: str | os.PathLike[str] | None = None, **storage_options: Any) -> None:
        """``storage_options`` go to the fsspec backend (say ``endpoint_url`` for s3); by default it reads the standard
        environment of its store (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``GOOGLE_APPLICATION_CREDENTIALS``, …)."""
        import fsspec

        self.location = url.rstrip("/")
        scheme = self.location.partition("://")[0]
        self.fs, self.root = fsspec.core.url_to_fs(self.location, **{**STORAGE_OPTIONS.get(scheme, {}), **storage_options})
        self.root = self.root.rstrip("/")
        self.protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        self.endpoint = self._endpoint()
        self._cache = cache
        self._listing: Listing | None = None

    def _endpoint(self) -> str:
        """The server this URL reaches: the backend's endpoint option, else the standard environment's; '' for the
        store's default (AWS S3, Google Cloud Storage)."""
        fs = self.fs
        explicit = getattr(fs, "endpoint_url", None) or (getattr(fs, "client_kwargs", None) or {}).get("endpoint_url")
        found = explicit or next((os.environ[v] for v in ENDPOINT_ENVIRONMENT.get(self.protocol, ()) if os.environ.get(v)), "")
        return str(found).rstrip("/")

    @property
    def identity(self) -> str:
        """URL and endpoint: two stores that share a URL (a local S3 server and AWS, say) are two registries."""
        return f"{self.location} at {self.endpoint or 'the default endpoint'}"

    def _key(self, *parts: object) -> str:
        return "/".join([self.root, *(str(p) for p in parts)])

    # --- conditional writes ------------------------------------------------------

    def _create(self, key: str, data: bytes) -> None:
        """Write ``key`` only if no object has that name. Raises ConflictError if one has."""
        try:
            self.fs.pipe_file(key, data, mode="create")
        except FileExistsError as e:
            raise ConflictError(f"{self.protocol}://{key} exists already") from e
        except OSError as e:
            if precondition_failed(e):
                raise ConflictError(f"{self.protocol}://{key} exists already") from e
            raise

    def _read(self, key: str) -> bytes | None:
        """An object's bytes, or None when it is absent."""
        try:
            return self.fs.cat_file(key)
        except FileNotFoundError:
            return None

    def _read_tagged(self, key: str) -> tuple[bytes | None, str | None]:
        """An object's bytes and the tag a compare-and-swap must match; (None, None) when it is absent."""
        self.fs.invalidate_cache(key)
        try:
            info = self.fs.info(key)
        except FileNotFoundError:
            return None, None
        return self._read(key), info.get("ETag") or info.get("generation")

    def _swap(self, key: str, data: bytes, tag: str | None) -> None:
        """Replace ``key`` if it still has ``tag`` (None: if it is still absent). Raises ConflictError if not."""
        if tag is None:
            return self._create(key, data)
        if self.protocol in ("s3", "s3a"):
            bucket, path, _ = self.fs.split_path(key)
            try:
                self.fs.call_s3("put_object", Bucket=bucket, Key=path, Body=data, IfMatch=tag)
            except OSError as e:
                if precondition_failed(e):
                    raise ConflictError(f"{self.protocol}://{key} changed since it was read") from e
                raise
            self.fs.invalidate_cache(key)
            return None
        # No If-Match here: check, write, and read back. A concurrent writer can still slip in between the check
        # and the write; the read-back then tells the loser (docs/deploy.md says which stores this applies to).
        current, current_tag = self._read_tagged(key)
        if current_tag != tag:
            raise ConflictError(f"{self.protocol}://{key} changed since it was read")
        self.fs.pipe_file(key, data)
        if self._read_tagged(key)[0] != data:
            raise ConflictError(f"{self.protocol}://{key} was changed by another writer at the same moment")
        return None

    # --- reading -----------------------------------------------------------------

    def listing(self, fresh: bool = False) -> Listing:
        """Names, versions and aliases' tags from one recursive listing of the prefix (cached until ``fresh``)."""
        if self._listing is not None and not fresh:
            return self._listing
        self.fs.invalidate_cache(self.root)
        try:
            found = self.fs.find(self.root, detail=True)
        except FileNotFoundError:
            found = {}
        manifests: dict[str, set[int]] = {}
        taken: dict[str, set[int]] = {}
        alias_tags: dict[str, str] = {}
        manifest_tags: dict[str, dict[int, str]] = {}
        prefix = self.root + "/" if self.root else ""
        for key, info in found.items():
            parts = key[len(prefix):].split("/") if key.startswith(prefix) else []
            if len(parts) < 2 or not NAME_PATTERN.match(parts[0]):
                continue
            name = parts[0]
            if len(parts) == 2 and parts[1] == ALIASES:
                alias_tags[name] = object_tag(info)
            elif len(parts) >= 3 and is_number(parts[1]) and not parts[1].startswith("0"):
                taken.setdefault(name, set()).add(int(parts[1]))
                if len(parts) == 3 and parts[2] == MANIFEST:
                    manifests.setdefault(name, set()).add(int(parts[1]))
                    manifest_tags.setdefault(name, {})[int(parts[1])] = object_tag(info)
        self._listing = Listing(manifests, taken, alias_tags, manifest_tags)
        return self._listing

    def names(self) -> list[str]:
        return sorted(self.listing().manifests)

    def versions(self, name: str) -> list[int]:
        return sorted(self.listing().manifests.get(check_name(name), ()))

    def aliases(self, name: str) -> dict[str, int]:
        return valid_aliases(self._read(self._key(check_name(name), ALIASES)), self.versions(name))

    def resolve(self, name: str, ref: str | int = "latest") -> int:
        return resolve(self, name, ref)

    def manifest(self, name: str, ref: str | int = "latest") -> dict[str, Any]:
        return json.loads(self.fs.cat_file(self._key(name, self.resolve(name, ref), MANIFEST)))

    def mirror(self) -> Mirror:
        return Mirror(self, cache_root(self._cache))

    def load(self, name: str, ref: str | int = "latest", device: str | torch.device = "cpu") -> ModelVersion:
        """Fetch the version into the local copy (once) and load it from there."""
        mirror = self.mirror()
        version = self.resolve(name, ref)
        mirror.fetch(name, version)
        return mirror.local.load(name, version, device)

    # --- writing -----------------------------------------------------------------

    def publish(self, name: str, manifest: dict[str, Any], weights: bytes, extra_files: dict[str, bytes] | None = None) -> int:
        """Claim the next free version number, write the files, then the manifest (the commit marker). Returns the version."""
        check_name(name)
        claim = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "at": datetime.now(UTC).isoformat(timespec="seconds")}).encode()
        version = max(self.listing(fresh=True).taken.get(name, {0})) + 1
        for _ in range(CLAIM_TRIES):
            try:
                self._create(self._key(name, version, CLAIM), claim)
                break
            except ConflictError:  # another publisher has this number: the next one
                version += 1
        else:
            raise RegistryError(f"could not claim a version number of {name!r} in {self.location} after {CLAIM_TRIES} tries")
        files = version_files(finished_manifest(name, version, manifest, weights), weights, extra_files)
        for relative, data in files.items():  # the manifest comes last
            self._create(self._key(name, version, relative), data)
        self._listing = None
        log.info("published %s:%d in %s", name, version, self.location)
        return version

    def set_alias(self, name: str, version: int | str, alias: str) -> None:
        check_alias_update(alias, version)
        resolved = self.resolve(name, str(version))
        key = self._key(name, ALIASES)
        for _ in range(ALIAS_TRIES):
            stored, tag = self._read_tagged(key)
            aliases = valid_aliases(stored, self.versions(name))
            aliases[alias] = resolved
            try:
                self._swap(key, aliases_json(aliases), tag)
                return
            except ConflictError:  # someone else changed the aliases in between: read theirs and apply ours again
                continue
        raise RegistryError(f"the aliases of {name!r} in {self.location} kept changing; {alias!r} was not set, try again")


@dataclass
class Changes:
    """What syncs did to the local copy, as 'name:version', recorded as it happens (so a sync that the store cut short
    still tells what it changed before)."""
    copied: list[str] = field(default_factory=list)  # new here
    replaced: list[str] = field(default_factory=list)  # here before with other contents than the store's; now the store's
    removed: list[str] = field(default_factory=list)  # taken out: the store no longer lists it, or holds other contents that it refused


class Mirror:
    """The local copy of an ObjectRegistry: a local registry folder, filled version by version.

    ``<cache>/registries/<hash of the URL and endpoint>/`` is a plain registry (the server loads from it), with the
    store it copies in ``source.txt``; ``<cache>/sha256/<hash>`` holds each weights file once, verified: a version whose
    weights are there already (the same weights under another name or registry, or a copy lost from its folder) is
    installed without downloading them.
    """

    def __init__(self, source: ObjectRegistry, cache: Path) -> None:
        self.source = source
        self.cache = cache
        folder = cache / "registries" / hashlib.sha256(source.identity.encode()).hexdigest()[:16]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "source.txt").write_text(f"{source.location}\n{source.endpoint}\n")
        self.local = Registry(folder)
        self.local.location = f"{source.location} (local copy in {folder})"
        self._alias_tags: dict[str, str] = {}
        # name -> version -> the manifest's tag when this copy was last checked against it (copied, found equal or
        # refused); empty at start, so each process compares every copied version with the store's once.
        self._checked: dict[str, dict[int, str]] = {}
        self.refused: dict[str, str] = {}  # 'name:version' -> why it was not copied; tried again only if its manifest changes
        self.bytes_fetched = 0

    def fetch(self, name: str, version: int, manifest_bytes: bytes | None = None) -> bool:
        """Make the copy of one published version the store's: copy it unless the copy here has the store's manifest
        (``manifest_bytes`` when already read); one with another manifest (the store now holds other contents under
        that number) is replaced whole. True when it was copied."""
        fs, key = self.source.fs, self.source._key(name, version)
        if manifest_bytes is None:
            manifest_bytes = fs.cat_file(f"{key}/{MANIFEST}")
        here = version in self.local.versions(name)
        if here and (self.local.version_dir(name, version) / MANIFEST).read_bytes() == manifest_bytes:
            return False
        manifest = json.loads(manifest_bytes)
        files: dict[str, bytes] = {}
        self.source.fs.invalidate_cache(key)
        for path in sorted(fs.find(key)):
            relative = path[len(key) + 1:]
            if relative == WEIGHTS:
                files[relative] = self._weights(path, manifest.get("sha256", ""))  # counts what it downloads
            elif relative not in (CLAIM, MANIFEST):
                files[relative] = fs.cat_file(path)
                self.bytes_fetched += len(files[relative])
        if WEIGHTS not in files:
            raise RegistryError(f"{self.source.protocol}://{key}: the manifest is there but {WEIGHTS} is not")
        files[MANIFEST] = manifest_bytes  # last, as everywhere
        self.bytes_fetched += len(manifest_bytes)
        return self.local.install(name, version, files, replace=here)

    def _weights(self, key: str, sha256: str) -> bytes:
        """A weights file by its hash: from ``<cache>/sha256`` when there, else downloaded, verified and kept there."""
        blob = self.cache / "sha256" / sha256
        if len(sha256) == 64 and blob.is_file():
            data = blob.read_bytes()
            if sha256_bytes(data) == sha256:
                return data
        data = self.source.fs.cat_file(key)
        self.bytes_fetched += len(data)
        if sha256_bytes(data) != sha256:
            raise RegistryError(f"{self.source.protocol}://{key}: sha256 {sha256_bytes(data)} does not match the manifest's {sha256!r}")
        blob.parent.mkdir(parents=True, exist_ok=True)
        tmp = blob.with_name(f".{sha256}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, blob)
        return data

    def sync(self, names: list[str] | None = None, changes: Changes | None = None) -> Changes:
        """Make the copy follow the store: copy versions not here yet, replace those whose manifest differs from the
        store's, take out those the store no longer lists, and take the aliases from the store. Returns ``changes``
        (a new one if not given), with what this sync did added.

        Costs one listing when nothing changed; a version's manifest is read again only when its tag in the listing
        differs from the one this copy was last checked against (so once per version after a start). Raises OSError
        (and the store's own errors) when the store cannot be reached; what is in the copy stays.
        """
        changes = changes if changes is not None else Changes()
        listing = self.source.listing(fresh=True)
        for name in sorted(set(listing.manifests) | set(self.local.names())):
            if names and name not in names:
                continue
            listed = listing.manifest_tags.get(name, {})
            checked = self._checked.setdefault(name, {})
            for version in self.local.versions(name):
                if version not in listed and self.local.remove(name, version):
                    changes.removed.append(f"{name}:{version}")
                    log.warning("%s:%d is no longer in %s: taken out of the local copy", name, version, self.source.location)
            for version in set(checked) - set(listed):  # should the number be published again, it is checked again
                del checked[version]
                self.refused.pop(f"{name}:{version}", None)
            stale = [v for v, tag in sorted(listed.items()) if checked.get(v) != tag]
            paths = {v: self.source._key(name, v, MANIFEST) for v in stale}
            manifests = self.source.fs.cat(list(paths.values())) if stale else {}  # one concurrent batch of GETs
            for version in stale:
                self._check(name, version, manifests[paths[version]], changes)
                checked[version] = listed[version]
            tag = listing.alias_tags.get(name, "")
            if self._alias_tags.get(name) != tag:
                self.local.write_aliases(name, self.source.aliases(name) if tag else {})
                self._alias_tags[name] = tag
        return changes

    def _check(self, name: str, version: int, manifest_bytes: bytes, changes: Changes) -> None:
        """Copy, keep or replace one version after its manifest was read from the store; a bad one is refused."""
        key = f"{name}:{version}"
        here = version in self.local.versions(name)
        self.refused.pop(key, None)  # its manifest changed (or was never checked here): a new chance
        try:
            if self.fetch(name, version, manifest_bytes):
                (changes.replaced if here else changes.copied).append(key)
                if here:
                    log.warning("%s in %s differs from the local copy (its manifest changed): replaced", key, self.source.location)
        except (RegistryError, ValueError) as e:  # a bad version must not stop the others
            self.refused[key] = str(e)
            log.error("not copied %s from %s: %s", key, self.source.location, e)
            if here and self.local.remove(name, version):  # the copy here is not what the store holds under that number
                changes.removed.append(key)
                log.warning("%s in %s differs from the local copy, which is taken out", key, self.source.location)
