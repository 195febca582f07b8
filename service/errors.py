"""What can go wrong with a request, in the service's own words: typed errors that know no protocol.

The codecs, the pipeline, the batcher and the store raise these; each protocol maps every type to its own status
and error body once, in ``service/api/errors.py`` (so overload can become 429, or a new protocol be added, without
touching the core). An error carries what a client needs to act on it: its message, which says what was wrong and
what is allowed, and for some a fact a protocol may advertise (how long to wait, the row limit).
"""
from __future__ import annotations


class ServiceError(Exception):
    """A request the service will not answer as sent; ``message`` says why and what is allowed."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class Malformed(ServiceError):
    """The body cannot be read as what it claims to be: its framing, JSON, a .npy header, a multipart body, an image."""


class Invalid(ServiceError):
    """The body was read, but is not what the call takes: wrong shape or type, a non-finite number, an option not allowed."""


class NotFound(ServiceError):
    """No model, version, operation or file by that name."""


class Conflict(ServiceError):
    """The request holds what another version made: codes of another version (``code_version``) than the one asked."""


class Unauthenticated(ServiceError):
    """The API key is missing or wrong."""


class TooLarge(ServiceError):
    """The body, or the images in it, over a limit."""


class TooManyRows(TooLarge):
    """More rows than a request may hold; ``limit`` is that most, ``where`` starts the message (say "input 'input': ")."""

    def __init__(self, rows: int, limit: int, where: str = "") -> None:
        super().__init__(f"{where}{rows} rows exceed the limit of {limit} rows per request")
        self.rows, self.limit = rows, limit


class UnsupportedMedia(ServiceError):
    """A body of a media type the call does not take."""


class NeedsFullInstall(ServiceError):
    """What the request needs cannot run on this server: a version without stored graphs, or map coordinates without a
    projector graph, where torch is not installed. Sending it again will not help; the full install or a re-publish will."""


class Unavailable(ServiceError):
    """The request was refused before any work, and may succeed later: send it again after ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Overloaded(Unavailable):
    """Too many requests waiting or in progress."""


class NotReady(Unavailable):
    """Models are still loading."""
