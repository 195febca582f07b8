"""Bearer API key: when set, every route but the health routes needs it."""
from __future__ import annotations

import secrets

from fastapi import Request

from aeserve.service.errors import Unauthenticated


def check_api_key(expected: str | None, authorization: str | None) -> None:
    """Raise Unauthenticated unless ``authorization`` is ``Bearer <expected>``; nothing to check when no key is set."""
    if not expected:
        return
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(given.strip().encode(), expected.encode()):
        raise Unauthenticated("missing or wrong API key: send 'Authorization: Bearer KEY'")


async def require_api_key(request: Request) -> None:
    """The FastAPI dependency form of check_api_key."""
    check_api_key(request.app.state.settings.api_key, request.headers.get("authorization"))
