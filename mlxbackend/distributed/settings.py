"""Group settings from LoadModel Options and the environment (contract §11), validated up front
so that a bad hostfile or option fails LoadModel before any process is started."""

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from mlxbackend.errors import InvalidInput, NotFound

BACKENDS = ("ring", "jaccl", "mpi", "any")
MODES = ("pipeline", "tensor")
DEFAULT_TIMEOUT = 30.0  # s a rank may stay silent inside a step before the group is declared broken
DEFAULT_INIT_TIMEOUT = 60.0  # s for the workers to join a new group
DEFAULT_LOAD_TIMEOUT = 600.0  # s for every rank to load its shard
PING_INTERVAL = (
    5.0  # s between idle heartbeats from rank 0 (workers leave after WORKER_IDLE_TIMEOUT)
)
WORKER_IDLE_TIMEOUT = 60.0


@dataclass
class GroupSettings:
    hostfile: str  # the file as given (Options hostfile / MLX_DISTRIBUTED_HOSTFILE)
    hosts: list  # ring: one list of "ip:port" per rank; jaccl: the RDMA device matrix rows
    backend: str = "ring"
    mode: str = "pipeline"
    timeout: float = DEFAULT_TIMEOUT
    init_timeout: float = DEFAULT_INIT_TIMEOUT
    load_timeout: float = DEFAULT_LOAD_TIMEOUT
    coordinator: str = ""  # jaccl: ip:port of rank 0's side channel
    split: list = field(
        default_factory=list
    )  # pipeline: layers per rank, rank 0 first (empty = even)

    @property
    def size(self) -> int:
        return len(self.hosts)

    def rank_env(self, rank: int) -> dict:
        """The environment MLX reads in `mx.distributed.init` for this rank. Both accepted ring
        formats are MLX's own, so MLX reads the user's file as it is."""
        env = {"MLX_RANK": str(rank)}
        if self.backend == "jaccl":
            env["MLX_IBV_DEVICES"] = os.path.abspath(self.hostfile)
            env["MLX_JACCL_COORDINATOR"] = self.coordinator
        else:
            env["MLX_HOSTFILE"] = os.path.abspath(self.hostfile)
        return env

    def workers(self) -> str:
        return "; ".join(f"rank {r} at {self.address(r)}" for r in range(1, self.size))

    def not_formed(self) -> str:
        return (
            f"the distributed group did not form within {self.init_timeout:g} s (distributed_init_timeout; "
            f"waiting for {self.workers()}); start each worker with `mlxbackend worker --rank N --hostfile FILE`"
        )

    def address(self, rank: int) -> str:
        row = self.hosts[rank]
        return ", ".join(str(a) for a in row if a) if self.backend == "jaccl" else ", ".join(row)


def wanted(options: dict) -> bool:
    """Does this LoadModel ask for a distributed group?"""
    return bool(options.get("hostfile") or os.environ.get("MLX_DISTRIBUTED_HOSTFILE"))


def from_options(options: dict) -> GroupSettings:
    """Options win over the environment; raises NotFound / InvalidInput with clear messages."""
    path = str(options.get("hostfile") or os.environ.get("MLX_DISTRIBUTED_HOSTFILE", "")).strip()
    backend = str(
        options.get("distributed_backend") or os.environ.get("MLX_DISTRIBUTED_BACKEND") or "ring"
    )
    backend = backend.strip().lower()
    if backend not in BACKENDS:
        raise InvalidInput(
            f"distributed_backend {backend!r} is not supported; use one of {', '.join(BACKENDS)}"
        )
    mode = str(options.get("distributed_mode", "pipeline")).strip().lower()
    if mode not in MODES:
        raise InvalidInput(f"distributed_mode {mode!r} is not supported; use pipeline or tensor")
    coordinator = str(
        options.get("coordinator") or os.environ.get("MLX_JACCL_COORDINATOR", "")
    ).strip()
    if backend == "jaccl" and not coordinator:
        raise InvalidInput(
            "distributed_backend jaccl needs Options coordinator:IP:PORT (or MLX_JACCL_COORDINATOR)"
        )
    hosts = read_hostfile(path, backend)
    settings = GroupSettings(
        hostfile=path,
        hosts=hosts,
        backend=backend,
        mode=mode,
        coordinator=coordinator,
        timeout=_seconds(options, "distributed_timeout", DEFAULT_TIMEOUT),
        init_timeout=_seconds(options, "distributed_init_timeout", DEFAULT_INIT_TIMEOUT),
        load_timeout=_seconds(options, "distributed_load_timeout", DEFAULT_LOAD_TIMEOUT),
        split=_split(options.get("distributed_split", ""), len(hosts)),
    )
    if settings.split and mode != "pipeline":
        raise InvalidInput("distributed_split only applies to distributed_mode pipeline")
    return settings


def read_hostfile(path: str, backend: str = "ring") -> list:
    """Normalise a hostfile to one list per rank.

    Ring: `["ip:port", ...]` (LocalAI's format) or MLX's `[["ip:port", ...], ...]` (several
    connections per rank). JACCL: the RDMA device matrix (`MLX_IBV_DEVICES`, null diagonal)."""
    if not path:
        raise InvalidInput(
            "distributed inference needs Options hostfile:/path.json (or MLX_DISTRIBUTED_HOSTFILE)"
        )
    file = Path(path)
    if not file.is_file():
        raise NotFound(f"hostfile not found: {path}")
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise InvalidInput(f"hostfile {path} is not valid JSON: {exc}") from None
    example = '["192.168.1.10:5000", "192.168.1.11:5000"] (entry i = rank i\'s ip:port)'
    if not isinstance(data, list):
        raise InvalidInput(f"hostfile {path} must be a JSON array, e.g. {example}")
    if len(data) < 2:
        raise InvalidInput(
            f"hostfile {path} lists {len(data)} rank(s); distributed inference needs at least 2 "
            "(rank 0 = this backend, ranks 1.. = `mlxbackend worker --rank N --hostfile FILE`)"
        )
    if backend == "jaccl":
        if not all(isinstance(row, list) and len(row) == len(data) for row in data):
            raise InvalidInput(
                f"hostfile {path}: jaccl expects the RDMA device matrix (n lists of n names, null diagonal)"
            )
        return data
    hosts = []
    for rank, entry in enumerate(data):
        row = [entry] if isinstance(entry, str) else entry
        if (
            not isinstance(row, list)
            or not row
            or not all(isinstance(a, str) and _is_address(a) for a in row)
        ):
            raise InvalidInput(
                f'hostfile {path}: entry {rank} ({entry!r}) is not "ip:port"; expected e.g. {example}'
            )
        hosts.append(row)
    if len({len(row) for row in hosts}) != 1:
        raise InvalidInput(f"hostfile {path}: every rank needs the same number of addresses")
    return hosts


def _is_address(text: str) -> bool:
    host, sep, port = text.strip().rpartition(":")
    return bool(sep and host and port.isdigit() and 0 < int(port) < 65536)


def _seconds(options: dict, key: str, default: float) -> float:
    value = options.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise InvalidInput(f"{key} must be a positive number of seconds, got {value!r}")
    return float(value)


def _split(value, size: int) -> list:
    if value in ("", None):
        return []
    try:
        split = [int(v) for v in str(value).split(",")]
    except ValueError:
        raise InvalidInput(
            f"distributed_split must be comma-separated layer counts, got {value!r}"
        ) from None
    if len(split) != size or any(v <= 0 for v in split):
        raise InvalidInput(
            f"distributed_split needs {size} positive layer counts (rank 0 first), got {value!r}"
        )
    return split
