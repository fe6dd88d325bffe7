"""`mlxbackend worker --rank N --hostfile FILE`: keep a rank process ready for the next group.

Each group (one per distributed LoadModel) gets a fresh rank process; when the group ends (Free,
a new LoadModel, rank 0 gone) the process exits and the next one waits for the next group, so a
broken group is rebuilt by LoadModel alone. The ring backend retries its first connection with
a doubling back-off (1, 2, 4, 8, 16 s, then fails): a process that has failed three attempts
(it is then asleep for 4 s) is replaced at once, so a new group forms within about 2 s."""

import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from mlxbackend.distributed.settings import (
    BACKENDS,
    WORKER_IDLE_TIMEOUT,
    GroupSettings,
    read_hostfile,
)
from mlxbackend.errors import BackendError

log = logging.getLogger("mlxbackend.worker")
RETRY = re.compile(r"\[ring\] Attempt (\d+) waiting")
RING_NOISE = re.compile(
    r"^\[ring\] (Rank \d+ (connecting|accepting)|Attempt \d+ waiting|Socket \d+ was closed|Sending to socket|Too many)"
)
REPLACE_AFTER_ATTEMPT = 2


def add_parser(sub):
    env = os.environ
    p = sub.add_parser(
        "worker",
        help="run distributed rank N (1..n-1) for a backend that loads with Options hostfile:",
        description="Joins each group a LoadModel with Options hostfile:FILE forms (rank 0 is the gRPC backend) "
        'and rejoins after it ends. The hostfile is the same file rank 0 uses: ["ip:port", ...], entry N = rank N.',
    )
    p.add_argument(
        "--rank", type=int, default=int(env.get("MLX_RANK", "0") or 0), help="this rank (1..n-1)"
    )
    p.add_argument(
        "--hostfile", default=env.get("MLX_DISTRIBUTED_HOSTFILE") or env.get("MLX_HOSTFILE", "")
    )
    p.add_argument(
        "--backend", choices=BACKENDS, default=env.get("MLX_DISTRIBUTED_BACKEND", "ring") or "ring"
    )
    p.add_argument(
        "--coordinator",
        default=env.get("MLX_JACCL_COORDINATOR", ""),
        help="jaccl: rank 0's ip:port",
    )
    p.add_argument(
        "--model-path",
        default="",
        help="models folder on this machine (default: rank 0's ModelPath)",
    )
    p.add_argument(
        "--idle-timeout",
        type=float,
        default=WORKER_IDLE_TIMEOUT,
        help="leave a group after this many seconds without a word from rank 0 (it pings every 5 s)",
    )
    p.add_argument("--once", action="store_true", help="serve one group, then exit")
    p.add_argument(
        "-v", "--verbose", action="store_true", help="show the ring backend's connection attempts"
    )
    p.set_defaults(func=cmd_worker)
    return p


def cmd_worker(args) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        hosts = read_hostfile(args.hostfile, args.backend)
    except BackendError as exc:
        raise SystemExit(f"mlxbackend worker: {exc}") from None
    if not 1 <= args.rank < len(hosts):
        raise SystemExit(
            f"mlxbackend worker: --rank must be 1..{len(hosts) - 1} (rank 0 is the gRPC backend)"
        )
    if args.backend == "jaccl" and not args.coordinator:
        raise SystemExit("mlxbackend worker: --backend jaccl needs --coordinator IP:PORT")
    settings = GroupSettings(
        hostfile=args.hostfile, hosts=hosts, backend=args.backend, coordinator=args.coordinator
    )
    env = {**os.environ, **settings.rank_env(args.rank), "MLX_RING_VERBOSE": "1"}
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    cmd = [
        sys.executable,
        "-m",
        "mlxbackend.distributed.rank",
        "--backend",
        args.backend,
        "--idle-timeout",
        str(args.idle_timeout),
    ]
    if args.model_path:
        cmd += ["--model-path", args.model_path]

    state = {"proc": None, "stop": False}

    def stop(signum, _frame):
        state["stop"] = True
        if state["proc"] is not None and state["proc"].poll() is None:
            state["proc"].kill()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log.info(
        "rank %d of %d (%s, listening on %s): waiting for rank 0",
        args.rank,
        len(hosts),
        args.backend,
        settings.address(args.rank),
    )
    while not state["stop"]:
        joined, replaced = serve_one(cmd, env, state, args)
        if args.once and joined:
            break
        time.sleep(
            0.1 if replaced else 0.5 if joined else 2.0
        )  # 2.0: it failed on its own, do not spin
    return 0


def serve_one(cmd, env, state, args) -> tuple:
    """Run one rank process to its end: (joined a group, replaced while waiting for rank 0)."""
    proc = state["proc"] = subprocess.Popen(
        cmd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
    )
    joined = replaced = False
    for line in proc.stdout:
        retry = RETRY.search(line)
        if retry and not joined and int(retry.group(1)) >= REPLACE_AFTER_ATTEMPT:
            proc.kill()  # asleep in the back-off: replace it with a fresh, quickly retrying one
            replaced = True
            break
        if line.startswith("mlxbackend-rank: joined"):
            joined = True
            log.info("rank %d: joined a group", args.rank)
            continue
        if RING_NOISE.search(line) and not args.verbose:
            continue
        sys.stderr.write(line)
        sys.stderr.flush()
    code = proc.wait()
    if joined:
        log.info("rank %d: group ended (exit %d); waiting for the next group", args.rank, code)
    return joined, replaced


def localai_argv(argv: list) -> list:
    """LocalAI starts mlx-distributed ranks through run.sh (that is, `serve`): `--worker --rank N
    --hostfile F [--backend B --coordinator C]` becomes `worker …`; rank 0 by hand (`--rank 0
    --hostfile F --addr …`) stays `serve` with MLX_DISTRIBUTED_HOSTFILE / _BACKEND set, so that
    every LoadModel forms the group. Anything else is returned unchanged."""
    flags = ("--rank", "--hostfile", "--backend", "--coordinator")
    if (
        not argv
        or argv[0] != "serve"
        or not any(a == "--worker" or a.split("=")[0] in flags for a in argv)
    ):
        return argv
    rest, found, worker, i = [], {}, False, 1
    while i < len(argv):
        name, eq, value = argv[i].partition("=")
        if argv[i] == "--worker":
            worker = True
        elif name in flags:
            if not eq:
                value, i = (argv[i + 1] if i + 1 < len(argv) else ""), i + 1
            found[name] = value
        else:
            rest.append(argv[i])
        i += 1
    if worker:
        return ["worker"] + [part for item in found.items() for part in item]
    env = {
        "--hostfile": "MLX_DISTRIBUTED_HOSTFILE",
        "--backend": "MLX_DISTRIBUTED_BACKEND",
        "--coordinator": "MLX_JACCL_COORDINATOR",
    }
    for flag, var in env.items():
        if found.get(flag):
            os.environ[var] = found[flag]
    return ["serve"] + rest
