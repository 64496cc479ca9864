"""Errors of the serving layer, named for what went wrong rather than for a transport.

Each front end maps them once (zenjax/serve/grpc_api.py: `_GRPC_CODE`, zenjax/serve/http_api.py:
`_HTTP_STATUS`):

    error             code               gRPC                 HTTP
    InvalidRequest    invalid_request    INVALID_ARGUMENT     400 (param = the field)
    QueueFull         queue_full         RESOURCE_EXHAUSTED   429
    Unavailable       unavailable        UNAVAILABLE          503 (loading, draining, stopped)
    DeadlineExceeded  deadline_exceeded  DEADLINE_EXCEEDED    504
    Unauthenticated   unauthenticated    UNAUTHENTICATED      401
    Internal          internal           INTERNAL             500
"""
from __future__ import annotations


class ServiceError(Exception):
    code = "internal"

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param

    def renamed(self, names: dict[str, str], prefix: str = "") -> str:
        """The message with its leading field name spelled as a front end calls it, e.g.
        "max_new_tokens=0 must be >= 1" -> "max_tokens=0 must be >= 1" (HTTP) or
        "sampling.max_new_tokens=0 must be >= 1" (gRPC)."""
        p = self.param
        if p is None or not self.message.startswith(p):
            return self.message
        head = p.split("[", 1)[0].split(".", 1)[0]
        new = prefix + names.get(head, head) + p[len(head):]
        return new + self.message[len(p):]


class InvalidRequest(ServiceError, ValueError):
    code = "invalid_request"


class QueueFull(ServiceError):
    code = "queue_full"


class Unavailable(ServiceError):
    code = "unavailable"


class DeadlineExceeded(ServiceError):
    code = "deadline_exceeded"


class Unauthenticated(ServiceError):
    code = "unauthenticated"


class Internal(ServiceError):
    code = "internal"


BY_CODE = {c.code: c for c in (InvalidRequest, QueueFull, Unavailable, DeadlineExceeded, Unauthenticated,
                               Internal)}
