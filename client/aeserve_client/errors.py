"""Error answers of the service as exceptions: one base class with the HTTP ``status`` and the service's ``detail``."""
from __future__ import annotations


class AeserveError(Exception):
    """An error answer from the service: ``status`` and the service's ``detail``."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"{status}: {detail}")
        self.status = status
        self.detail = detail


class NotFoundError(AeserveError, LookupError):
    """404: no model, version or alias by that name."""


class InvalidInputError(AeserveError, ValueError):
    """400, 413, 415 or 422: the request was refused as sent (shape, type, a non-finite number, a body over the limit)."""


class ConflictError(AeserveError):
    """409: codes of another version than the one asked (decode's ``code_version``); the detail names both."""


class UnauthorizedError(AeserveError):
    """401 or 403: the API key is missing or wrong."""


class OverloadedError(AeserveError):
    """503 or 429, still so after the client's retries; ``retry_after``: the server's last wait in seconds, if it sent one."""

    def __init__(self, status: int, detail: str, retry_after: float | None = None) -> None:
        super().__init__(status, detail)
        self.retry_after = retry_after


_BY_STATUS: dict[int, type[AeserveError]] = {
    400: InvalidInputError, 413: InvalidInputError, 415: InvalidInputError, 422: InvalidInputError,
    401: UnauthorizedError, 403: UnauthorizedError,
    404: NotFoundError,
    409: ConflictError,
    429: OverloadedError, 503: OverloadedError,
}


def error_for(status: int, detail: str, retry_after: float | None = None) -> AeserveError:
    """The exception for an error answer; statuses without a class of their own get the base class."""
    error_class = _BY_STATUS.get(status, AeserveError)
    if error_class is OverloadedError:
        return OverloadedError(status, detail, retry_after)
    return error_class(status, detail)
