"""Distributed inference across machines with MLX's own `mx.distributed` (ring over TCP; JACCL,
MPI where available).

Rank 0 is the gRPC backend: LoadModel with Options `hostfile:` (or MLX_DISTRIBUTED_HOSTFILE)
starts a private child server that is rank 0 of the group and forwards text RPCs to it; ranks
1..n-1 run `mlxbackend worker --rank N --hostfile FILE`. Modules:

- settings: Options / environment → GroupSettings (validated hostfile, backend, mode)
- channel: the control plane (rank 0 decides, workers mirror) over collectives
- shard: each rank's part of the model (pipeline layer ranges or tensor shards)
- rank0: the model proxy the text engine drives on rank 0, watchdog and pings
- rank: the worker rank process; supervisor: `mlxbackend worker`, which respawns it
- group: the servicer's side (spawn the rank-0 child, forward RPCs, Status, Free)
"""

from mlxbackend.errors import BackendError


class GroupBroken(BackendError):
    """A rank died or stopped answering: the in-flight request fails, LoadModel rebuilds."""

    code = "UNAVAILABLE"


class RemoteError(BackendError):
    """An error another rank (or the rank-0 child) reported, with its status code name."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def dead_mans_switch(seconds: float | None):
    """Re-armed on every tick of a Python watch thread. A collective that blocks inside an MLX
    call keeping the GIL (`.item()`, `.tolist()` evaluate without releasing it) stops every Python
    thread too, so the watch thread alone cannot end such a process; faulthandler's C watchdog
    needs no GIL: when it has not been re-armed for `seconds`, it writes every thread's stack to
    stderr and exits the process (code 1). None disarms it."""
    import faulthandler

    if seconds is None:
        faulthandler.cancel_dump_traceback_later()
    else:
        faulthandler.dump_traceback_later(seconds, exit=True)


def die_with_parent():
    """Linux: the kernel ends this process when its parent dies, even while a blocked MLX call
    holds the GIL (a Python watch thread would be stuck then). Elsewhere a no-op."""
    import ctypes
    import signal
    import sys

    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
