"""Model routes: the list, manifests, published files and reload. The operations (encode, decode, …) are declared in operations.py."""
from __future__ import annotations

import asyncio
import re
from typing import TYPE_CHECKING

from fastapi import APIRouter, Request
from starlette.responses import Response

from aeserve.models.registry import NotFoundError
from aeserve.service.api.errors import V1, openapi_errors
from aeserve.service.codec import JSON, json_bytes
from aeserve.service.errors import NotFound, NotReady
from aeserve.service.runtime.store import ModelStore, valid_name

if TYPE_CHECKING:
    from aeserve.models.version import ModelVersion

router = APIRouter(prefix="/v1", tags=["models"], responses=openapi_errors(V1, (
    (401, "missing or wrong API key"), (404, "unknown model or version"), (503, "models still loading"))))


def lookup(store: ModelStore, name: str, ref: str, context: dict[str, str]) -> ModelVersion:
    """The loaded version ``ref`` (number or alias) of ``name``; records model and version in ``context`` (for metrics and logs)."""
    # The name is checked only when the lookup fails (a loaded name is valid), and before anything else is said.
    try:
        version = store.get(name, ref)
    except (NotFoundError, NotReady) as e:
        if not valid_name(name):
            raise NotFound(f"unknown model {name!r}: model names are letters, digits, '_', '.', '-'") from None
        if isinstance(e, NotReady):
            raise
        raise NotFound(str(e.args[0])) from None
    context["model"], context["version"] = name, str(version.version)
    return version


def request_lookup(request: Request, name: str, ref: str) -> ModelVersion:
    return lookup(request.app.state.store, name, ref, request.scope.setdefault("aeserve", {}))


@router.get("/models")
async def list_models(request: Request) -> Response:
    """Names, loaded versions and aliases of every model."""
    store = request.app.state.store
    models = []
    for name in store.names():
        entry = store.entry(name)
        models.append({"name": name, "versions": [str(v) for v in sorted(entry.versions)],
                       "aliases": {a: str(v) for a, v in sorted(entry.aliases.items())}})
    return Response(json_bytes({"models": models}), media_type=JSON)


@router.get("/models/{name}")
async def latest_manifest(request: Request, name: str) -> Response:
    """The manifest of the latest version."""
    version = request_lookup(request, name, "latest")
    return Response(json_bytes(version.manifest), media_type=JSON, headers={"X-Model-Name": name, "X-Model-Version": str(version.version)})


@router.get("/models/{name}/versions/{version}")
async def version_manifest(request: Request, name: str, version: str) -> Response:
    """The manifest of a version (number or alias)."""
    loaded = request_lookup(request, name, version)
    return Response(json_bytes(loaded.manifest), media_type=JSON, headers={"X-Model-Name": name, "X-Model-Version": str(loaded.version)})


VERSION_FILE = re.compile(r"^(report/[a-z0-9_-]+\.(md|png)|map/sample\.json)$")
FILE_TYPES = {".md": "text/markdown; charset=utf-8", ".png": "image/png", ".json": "application/json"}


@router.get("/models/{name}/versions/{version}/files/{path:path}", responses={200: {"content": {t: {} for t in FILE_TYPES.values()}}})
async def version_file(request: Request, name: str, version: str, path: str) -> Response:
    """A file published with the version: report/report.md, report/*.png, or map/sample.json (the map explorer's points)."""
    loaded = request_lookup(request, name, version)
    folder = loaded.folder.resolve() if loaded.folder is not None else None
    target = (folder / path).resolve() if folder is not None and VERSION_FILE.match(path) else None
    if target is None or folder not in target.parents or not target.is_file():
        raise NotFound(f"version {name}:{loaded.version} has no file {path!r}; "
                       "published files are report/report.md, report/*.png and map/sample.json")
    return Response(target.read_bytes(), media_type=FILE_TYPES[target.suffix])


@router.post("/reload")
async def reload(request: Request) -> Response:
    """Look for new versions now; answers what was loaded and what was refused."""
    store = request.app.state.store
    added = await asyncio.to_thread(store.refresh)
    return Response(json_bytes({"loaded": added, "refused": store.failed, "serving": [f"{n}:{v}" for n, v in store.loaded()]}),
                    media_type=JSON)
