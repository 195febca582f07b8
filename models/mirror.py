"""The local copy of a registry in object storage (``models/remote.py``): what the server loads from, brought up to
date with the store at each poll, and served on its own while the store is unreachable.

Whenever the store answers, it is the source of truth: the copy is kept per store (URL and endpoint), a version the
store no longer lists is taken out of it, and one whose manifest differs from the store's is replaced.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from aeserve.models.files import MANIFEST, WEIGHTS, sha256_bytes
from aeserve.models.registry import Registry, RegistryError
from aeserve.models.remote import CLAIM

if TYPE_CHECKING:
    from aeserve.models.remote import ObjectRegistry

log = logging.getLogger("aeserve.registry")


def cache_root(explicit: str | os.PathLike[str] | None = None) -> Path:
    """Where local copies of remote registries live: ``explicit``, else ``$AESERVE_CACHE``, else ``~/.cache/aeserve``."""
    return Path(explicit or os.environ.get("AESERVE_CACHE") or Path.home() / ".cache" / "aeserve")


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
