"""A worker rank (1..n-1) for one group: join, load this rank's shard when rank 0 says so, then
mirror rank 0's steps until SHUTDOWN or until the group breaks. It exits either way; the
`mlxbackend worker` supervisor starts a fresh one for the next group.

Run by the supervisor as `python -m mlxbackend.distributed.rank` with MLX_RANK and MLX_HOSTFILE
(or MLX_IBV_DEVICES / MLX_JACCL_COORDINATOR) set."""

import argparse
import logging
import os
import sys
import threading
import time

import mlx.core as mx

from mlxbackend.distributed import dead_mans_switch, die_with_parent
from mlxbackend.distributed import shard as shards
from mlxbackend.distributed.channel import (
    FORWARD,
    FREE,
    LOAD,
    PING,
    SHUTDOWN,
    Channel,
    error_code,
    error_message,
    memory_row,
)
from mlxbackend.distributed.settings import PING_INTERVAL, WORKER_IDLE_TIMEOUT
from mlxbackend.text.models import model_dir

JOINED = "mlxbackend-rank: joined"
log = logging.getLogger("mlxbackend.worker")


class Rank:
    def __init__(self, group, model_path: str = "", idle_timeout: float = WORKER_IDLE_TIMEOUT):
        self.group = group
        self.channel = Channel(group)
        self.model_path = model_path
        self.timeout = idle_timeout
        self.shard = None
        self.caches = {}
        self.since = None
        self.loading = False  # a long load may keep the GIL: the dead-man's switch is off meanwhile
        self.switch = threading.Lock()
        threading.Thread(target=self.watch, name="rank-watchdog", daemon=True).start()

    def run(self) -> int:
        while True:
            header = self.wait(self.channel.receive)
            cmd = header[0]
            if cmd == SHUTDOWN:
                log.info("rank %d: shutdown by rank 0", self.channel.rank)
                return 0
            if cmd == FORWARD:
                self.forward(header)
            elif cmd == FREE:
                self.caches.pop(header[1], None)
            elif cmd == PING:
                self.wait(self.channel.gather, memory_row(self.shard.weights if self.shard else 0))
            elif cmd == LOAD:
                self.load(self.wait(self.channel.receive_json, header[1]))
            else:
                raise RuntimeError(f"unknown command {cmd} from rank 0")

    def forward(self, header: list):
        tokens = self.wait(self.channel.receive_step, header)
        cache = self.caches.get(header[1])
        if cache is None:
            cache = self.caches[header[1]] = self.shard.new_cache()

        def step():
            out = self.shard.forward(tokens, cache)
            self.shard.settle(cache, out)

        self.wait(step)

    def load(self, job: dict):
        with self.switch:
            self.loading = True
            dead_mans_switch(None)
        try:
            self._load(job)
        finally:
            self.loading = False

    def _load(self, job: dict):
        error, started = None, time.perf_counter()
        try:
            model, model_file, model_path = job["model"], job["model_file"], job["model_path"]
            if self.model_path:  # this machine keeps its models elsewhere
                model_path = self.model_path
                model = os.path.basename(model) if os.path.isabs(model) else model
                model_file = (
                    os.path.join(model_path, os.path.basename(model_file)) if model_file else ""
                )
            path = model_dir(model, model_file, model_path)
            self.shard = shards.load(
                path, self.group, job["mode"], job["split"], job["trust_remote_code"]
            )
            self.timeout = max(self.timeout, 2 * float(job["timeout"]) + PING_INTERVAL)
            log.info(
                "rank %d: loaded %s (%s, %.0f MiB) in %.1f s",
                self.channel.rank,
                path,
                self.shard.describe(),
                self.shard.weights / 2**20,
                time.perf_counter() - started,
            )
        except Exception as exc:
            error = exc
            log.error("rank %d: load failed: %s", self.channel.rank, error_message(exc))
        self.wait(
            self.channel.gather,
            [error_code(error)] + memory_row(self.shard.weights if self.shard else 0),
        )
        self.wait(self.channel.gather_text, error_message(error) if error else "")

    def wait(self, fn, *args):
        """Run a step that needs rank 0; the watchdog ends a rank left waiting too long."""
        self.since = time.monotonic()
        try:
            return fn(*args)
        finally:
            self.since = None

    def watch(self):
        """Leave a group whose rank 0 went silent (also while a blocked call keeps the GIL: the
        dead-man's switch re-armed here then ends the process a second later)."""
        while True:
            with self.switch:
                dead_mans_switch(None if self.loading else self.timeout + 1.5)
            time.sleep(0.5)
            since = self.since
            if since is not None and time.monotonic() - since > self.timeout:
                print(
                    f"mlxbackend worker rank {self.channel.rank}: nothing from rank 0 for {self.timeout:.0f} s; "
                    "leaving the group",
                    file=sys.stderr,
                    flush=True,
                )
                os._exit(3)


def watch_parent():
    """Exit with the supervisor (also when it is SIGKILLed)."""
    die_with_parent()
    parent = os.getppid()

    def watch():
        while True:
            time.sleep(0.5)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m mlxbackend.distributed.rank")
    p.add_argument("--backend", default="ring")
    p.add_argument("--model-path", default="")
    p.add_argument("--idle-timeout", type=float, default=WORKER_IDLE_TIMEOUT)
    args = p.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    watch_parent()
    try:
        group = mx.distributed.init(strict=True, backend=args.backend)
    except Exception as exc:
        print(f"mlxbackend-rank: init failed: {exc}", flush=True)
        os._exit(2)
    print(f"{JOINED} rank {group.rank()} of {group.size()}", flush=True)
    try:
        code = Rank(group, args.model_path, args.idle_timeout).run()
    except Exception as exc:  # a peer is gone: the group is over
        print(f"mlxbackend-rank: group lost: {exc}", flush=True)
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # skip teardown (MLX's thread-local state, blocked sockets)


if __name__ == "__main__":
    main()
