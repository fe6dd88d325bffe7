"""The control plane: rank 0 decides, every other rank mirrors.

Each command is a fixed-size int64 header summed over the group (workers contribute zeros, so
the sum is rank 0's header), optionally followed by a payload of a size the header announces.
Everything runs on the CPU stream and is evaluated at once, so ranks move in lockstep."""

import json

import mlx.core as mx

from mlxbackend.errors import BackendError

HEADER = 16
INLINE = HEADER - 4  # a step with this many tokens or fewer carries them in its header (decode)
SHUTDOWN, PING, FORWARD, LOAD, FREE = -1, 0, 1, 2, 3
MESSAGE_BYTES = 1024  # per rank, for load errors


class Channel:
    def __init__(self, group):
        self.group = group
        self.rank = group.rank()
        self.size = group.size()

    def _sum(self, x: mx.array) -> mx.array:
        out = mx.distributed.all_sum(x, group=self.group, stream=mx.cpu)
        mx.eval(out)
        return out

    # -- rank 0 ------------------------------------------------------------------------------
    def send(self, cmd: int, *args: int, payload: mx.array | None = None):
        header = [cmd, *args] + [0] * (HEADER - 1 - len(args))
        self._sum(mx.array(header, dtype=mx.int64))
        if payload is not None:
            self._sum(payload)

    def send_step(self, cache_id: int, tokens: mx.array):
        """FORWARD: the cache id and the token ids every rank feeds its part of the model."""
        batch, length = tokens.shape
        if batch * length <= INLINE:
            self.send(FORWARD, cache_id, batch, length, *tokens.reshape(-1).tolist())
        else:
            self.send(FORWARD, cache_id, batch, length, payload=tokens.astype(mx.int32))

    def send_json(self, cmd: int, value):
        data = json.dumps(value).encode()
        self.send(cmd, len(data), payload=mx.array(list(data), dtype=mx.uint8))

    # -- workers -----------------------------------------------------------------------------
    def receive(self) -> list:
        return self._sum(mx.zeros(HEADER, dtype=mx.int64)).tolist()

    def receive_step(self, header: list) -> mx.array:
        batch, length = header[2], header[3]
        if batch * length <= INLINE:
            return mx.array(header[4 : 4 + batch * length], dtype=mx.int32).reshape(batch, length)
        return self.receive_payload((batch, length), mx.int32)

    def receive_payload(self, shape, dtype) -> mx.array:
        return self._sum(mx.zeros(shape, dtype=dtype))

    def receive_json(self, nbytes: int):
        data = self.receive_payload((nbytes,), mx.uint8)
        return json.loads(bytes(data.tolist()).decode())

    # -- everyone ----------------------------------------------------------------------------
    def gather(self, values: list) -> list:
        """Each rank's int64 row, for every rank (rank order)."""
        out = mx.distributed.all_gather(
            mx.array([values], dtype=mx.int64), group=self.group, stream=mx.cpu
        )
        mx.eval(out)
        return out.tolist()

    def gather_text(self, text: str) -> list:
        raw = text.encode()[:MESSAGE_BYTES]
        row = list(raw) + [0] * (MESSAGE_BYTES - len(raw))
        out = mx.distributed.all_gather(
            mx.array([row], dtype=mx.uint8), group=self.group, stream=mx.cpu
        )
        mx.eval(out)
        return [bytes(r).rstrip(b"\0").decode(errors="replace") for r in out.tolist()]


def memory_row(weights: int) -> list:
    """[weights, active, peak, cache] bytes of this process."""
    return [int(weights), mx.get_active_memory(), mx.get_peak_memory(), mx.get_cache_memory()]


MEMORY_KEYS = ("weights", "active", "peak", "cache")

ERROR_CODES = (
    "OK",
    "NOT_FOUND",
    "INVALID_ARGUMENT",
    "RESOURCE_EXHAUSTED",
    "UNAVAILABLE",
    "INTERNAL",
)


def error_code(exc: BaseException | None) -> int:
    """A load error as a small int every rank can gather."""
    if exc is None:
        return 0
    code = getattr(exc, "code", "INTERNAL")
    return ERROR_CODES.index(code) if code in ERROR_CODES else len(ERROR_CODES) - 1


def error_message(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, BackendError) else f"{type(exc).__name__}: {exc}"
