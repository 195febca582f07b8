"""Where a registry or data lives: a local folder, or object storage named by an fsspec URL.

One rule for every command: a plain path or a ``file://`` URL is on this machine, any other URL (``s3://``,
``gs://``, …) is object storage, whose fsspec package comes with an extra of this distribution.
"""
from __future__ import annotations

import os

DEFAULT_REGISTRY = "registry"
REGISTRY_VARIABLE = "AESERVE_REGISTRY"
EXTRAS = {"s3": "aeserve[s3]", "s3a": "aeserve[s3]", "gs": "aeserve[gcs]", "gcs": "aeserve[gcs]"}


def registry_location(explicit: str | os.PathLike[str] | None = None) -> str:
    """``--registry``, else ``$AESERVE_REGISTRY``, else ``./registry``."""
    return str(explicit or os.environ.get(REGISTRY_VARIABLE) or DEFAULT_REGISTRY)


def is_url(path: str) -> bool:
    """Whether ``path`` names object storage (``s3://``, ``gs://``, …) rather than a local path or ``file://`` URL."""
    scheme, sep, _ = path.partition("://")
    return bool(sep) and len(scheme) > 1 and scheme != "file"  # a one-letter scheme is a Windows drive


def local_path(path: str) -> str:
    """A local path as given, or a ``file://`` URL's path."""
    return path.removeprefix("file://")


def install_hint(url: str) -> str:
    """``"; install aeserve[s3]"`` for a URL whose fsspec package comes with an extra, else ``""``."""
    extra = EXTRAS.get(url.partition("://")[0])
    return f"; install {extra}" if extra else ""
