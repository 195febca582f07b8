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

Models are loaded from a local copy (``Mirror``, models/mirror.py): a version is downloaded once, its weights verified by
sha256 and kept under their hash, and installed into a local registry folder atomically; the server serves
from that copy, so a restart with the store unreachable serves what was copied before. Whenever the store
answers, it is the source of truth: the copy is kept per store (URL and endpoint), a version the store no
longer lists is taken out of it, and one whose manifest differs from the store's is replaced.
"""
from __future__ import annotations

import json
import logging
import os
import socket
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from aeserve.models.files import MANIFEST
from aeserve.models.registry import (
    ALIASES,
    NAME_PATTERN,
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

if TYPE_CHECKING:
    import torch

    from aeserve.models.mirror import Mirror
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
        from aeserve.models.mirror import Mirror, cache_root  # the copy's module imports this one

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
        files = version_files(finished_manifest(name, version, manifest, weights, extra_files), weights, extra_files)
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
