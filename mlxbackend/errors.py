"""Typed errors raised by capability code, and `status_of`, the one map from an exception to a
gRPC status (a code name and a message). No gRPC import: any layer may use this module."""

import errno


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


class Aborted(BackendError):
    """Work in flight ended by the host: its model was freed or replaced (see host.py)."""

    code = "ABORTED"


class NoSpace(BackendError):
    """A file could not be published: the disk (or quota) is full. Nothing was left half-written."""

    code = "RESOURCE_EXHAUSTED"


class EmptyOutput(BackendError):
    """The model produced nothing usable; reported so LocalAI does not retry blindly."""

    code = "INTERNAL"


NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
OUT_OF_MEMORY_WORDS = ("out of memory", "unable to allocate", "[malloc")


MAX_STATUS_MESSAGE = 2000  # characters; gRPC clients drop a status whose details pass 8 KB


def status_of(exc: BaseException) -> tuple[str, str]:
    """(grpc.StatusCode member name, message) for an exception from capability code. Messages
    that echo a huge request value are cut: past 8 KB of trailers a C-core client (Python's)
    replaces the real status with RESOURCE_EXHAUSTED "received metadata size exceeds limit"."""
    code, message = _status(exc)
    if len(message) > MAX_STATUS_MESSAGE:
        message = f"{message[:MAX_STATUS_MESSAGE]}… ({len(message)} characters in all)"
    return code, message


def _status(exc: BaseException) -> tuple[str, str]:
    if isinstance(exc, BackendError):
        return exc.code, str(exc)
    if isinstance(exc, OSError) and exc.errno in NO_SPACE:
        where = f" writing {exc.filename}" if exc.filename else ""
        return "RESOURCE_EXHAUSTED", f"no space left on device{where}: {exc.strerror or exc}"
    if (
        isinstance(exc, OSError) and exc.errno == errno.ENAMETOOLONG
    ):  # always a path from the request
        name = str(exc.filename or "")
        return "INVALID_ARGUMENT", f"file name too long ({len(name)} characters): {name[:200]!r}…"
    if isinstance(exc, ValueError) and "embedded null" in str(
        exc
    ):  # os.stat & co. on a request path
        return "INVALID_ARGUMENT", "a path in the request contains a NUL character"
    text = str(exc).lower()
    if isinstance(exc, MemoryError) or any(k in text for k in OUT_OF_MEMORY_WORDS):
        return "RESOURCE_EXHAUSTED", f"out of memory: {exc}"
    return "INTERNAL", f"{type(exc).__name__}: {exc}"
