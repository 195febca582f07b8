"""Service fixtures: a private copy of the trained registry, and the app in-process on it, ready.

The helpers that start servers and wait for them are in tests/servers.py.
"""
from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from aeserve.models.registry import Registry
from tests.servers import make_client, wait_ready


@pytest.fixture
def service_registry(trained_registry: Registry, tmp_path: Path) -> Registry:
    """A private copy of the trained digits registry, so tests may publish into it."""
    root = tmp_path / "registry"
    shutil.copytree(trained_registry.root, root)
    return Registry(root)


@pytest.fixture
def api(service_registry: Registry) -> Iterator[TestClient]:
    with make_client(service_registry) as client:
        wait_ready(client.get)
        yield client
