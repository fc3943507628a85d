"""Errors the service turns into HTTP responses: a status code and one line of reason."""

from __future__ import annotations

from ..errors import OffsiteError


class ServiceError(OffsiteError):
    """A request the service refuses; `status` is the HTTP status it answers with."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.headers = headers


class RemoteError(OffsiteError):
    """The client's view of a refused request (or of a server it cannot reach)."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status
