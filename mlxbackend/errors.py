"""Typed errors raised by capability code; the servicer maps them to gRPC status codes."""


class BackendError(Exception):
    """Base class; `code` names a grpc.StatusCode member."""

    code = "INTERNAL"


class InvalidInput(BackendError):
    code = "INVALID_ARGUMENT"


class NotLoaded(BackendError):
    code = "FAILED_PRECONDITION"

    def __init__(self, message: str = "model not loaded: call LoadModel first"):
        super().__init__(message)


class Precondition(BackendError):
    code = "FAILED_PRECONDITION"


class NotFound(BackendError):
    code = "NOT_FOUND"


class OutOfMemory(BackendError):
    code = "RESOURCE_EXHAUSTED"


class Overloaded(BackendError):
    """Admission refused: the request queue is full."""

    code = "RESOURCE_EXHAUSTED"


class Unsupported(BackendError):
    code = "UNIMPLEMENTED"


class Cancelled(BackendError):
    code = "CANCELLED"


class EmptyOutput(BackendError):
    """The model produced nothing usable; reported so LocalAI does not retry blindly."""

    code = "INTERNAL"
