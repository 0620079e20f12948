"""Errors that the backend turns into JSON HTTP responses (never stack traces)."""

from __future__ import annotations

from typing import Any


def short_repr(value: Any, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters: error messages never echo a huge payload."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10 ** 30:
        return f"an integer of {len(str(abs(value)))} digits"
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


class BackendError(Exception):
    """An error with an HTTP status and a message meant for the Label Studio admin.

    `details` are extra JSON-safe fields added to the response body next to "error".
    """

    status: int = 500

    def __init__(self, message: str, status: int | None = None, **details: Any) -> None:
        super().__init__(message)
        if status is not None:
            if not 400 <= int(status) <= 599:
                raise ValueError(f"BackendError status must be an HTTP error code 400..599, got {status}")
            self.status = int(status)
        self.message = message
        self.details = details

    def to_json(self) -> dict[str, Any]:
        """Body of the error response: {"error": message, **details}."""
        return {"error": self.message, **self.details}


class ImageAccessError(BackendError):
    """The image of a task could not be fetched or decoded.

    `url` is the URL as the task gave it (never a presigned or token-bearing URL) and
    `reason` says what went wrong and, where the admin can fix it, which setting to change.
    """

    status = 502

    def __init__(self, url: str, reason: str, status: int | None = None) -> None:
        super().__init__(f"Cannot load image {url!r}: {reason}", status=status, url=url, reason=reason)
        self.url = url
        self.reason = reason
