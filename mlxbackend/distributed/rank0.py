"""Rank 0 of a group, inside the private child server: the model the text engine drives.

`DistributedModel` looks like an mlx-lm model to `generate_step`. Each call first broadcasts the
step (cache id + token ids) so every rank runs the same forward on its twin cache, then runs rank
0's part. Sampling, stop strings, hold-back, logprobs and seeds are the single-machine code on
rank 0; the sampled token reaches the other ranks as the next step's input (decided on rank 0,
then broadcast), and stopping is simply rank 0 sending no further step.

Failure handling: a collective that fails (a peer's socket closed) marks the group broken and the
request fails with UNAVAILABLE. A collective that never returns (a frozen or unreachable peer) is
caught by a watchdog thread that writes the reason and exits the process; the parent server sees
the child gone and reports the same."""

import itertools
import logging
import os
import sys
import threading
import time
import weakref
from collections import deque
from contextlib import contextmanager

import mlx.core as mx

from mlxbackend.distributed import GroupBroken, RemoteError, dead_mans_switch, die_with_parent
from mlxbackend.distributed import shard as shards
from mlxbackend.distributed.channel import (
    ERROR_CODES,
    FREE,
    LOAD,
    PING,
    SHUTDOWN,
    Channel,
    error_code,
    error_message,
    memory_row,
)
from mlxbackend.distributed.settings import PING_INTERVAL, GroupSettings
from mlxbackend.errors import InvalidInput
from mlxbackend.text.memory import HEADROOM, available_bytes
from mlxbackend.text.models import (
    DEFAULT_CONTEXT,
    TextModel,
    add_eos_tokens,
    fix_config,
    model_dir,
    read_config,
    remote_code_refused,
    tokenizer_options,
    trusted,
    trusts_remote_code,
)

PHASE, REASON = (
    "mlxbackend-rank0-phase:",
    "mlxbackend-rank0-reason:",
)  # stderr lines the parent reads
IF_SILENT = "mlxbackend-rank0-if-silent:"  # the reason to report if faulthandler's watchdog fires
SILENT_HEADER = "Timeout ("  # how faulthandler.dump_traceback_later's report begins
log = logging.getLogger("mlxbackend.distributed")
WATCHDOG_EXIT = 75


class RankCache(list):
    """Rank 0's KV cache for one request; every worker keeps a twin under the same id."""

    id = 0


class DistributedModel:
    """What generate_step calls as `model`: rank 0's shard behind the group's control plane."""

    solo_only = True  # the text engine runs these requests through its solo path (no batching)

    def __init__(self, shard, channel: Channel, settings: GroupSettings):
        self.local = shard.model
        self.args = getattr(shard.model, "args", None)
        self.shard = shard
        self.channel = channel
        self.settings = settings
        self.ids = itertools.count(1)
        self.freed = deque()  # cache ids rank 0 has dropped; the workers drop theirs next step
        self.weights = shard.weights
        self.memory = ()  # per-rank memory rows from the last exchange
        self.since = None  # the MLX thread has been waiting on the other ranks since then
        self.last = time.monotonic()  # the last completed exchange
        self.broken = ""

    def parameters(self):
        return self.local.parameters()

    @property
    def layers(self):
        return self.local.layers

    def make_cache(self) -> RankCache:
        cache = RankCache(self.shard.new_cache())
        cache.id = next(self.ids)
        weakref.finalize(cache, self.freed.append, cache.id)  # the workers drop the twin later
        return cache

    def __call__(self, inputs, cache=None, input_embeddings=None):
        if input_embeddings is not None:
            raise InvalidInput("input embeddings are not supported in distributed mode")
        if not isinstance(cache, RankCache):
            raise InvalidInput("distributed mode needs the model's own cache (make_cache)")
        with self.exchange():
            self._flush()
            mx.eval(inputs)
            self.channel.send_step(cache.id, inputs)
            out = self.shard.forward(inputs, cache)
            self.shard.settle(cache, out)
        return out

    def ping(self):
        """Idle heartbeat (workers leave a silent group) that also refreshes memory per rank."""
        with self.exchange():
            self._flush()
            self.channel.send(PING)
            self.memory = tuple(self.channel.gather(memory_row(self.weights)))

    def shutdown(self):
        if self.broken:
            return
        try:
            with self.exchange():
                self.channel.send(SHUTDOWN)
        except GroupBroken:
            pass
        self.broken = "the group was shut down by Free"

    def rank_memory(self) -> dict:
        """Bytes per rank: rank{r}_{weights,active,peak,cache}; rank 0 live, others as of the last
        exchange."""
        from mlxbackend.distributed.channel import MEMORY_KEYS

        rows = list(self.memory) or [[0] * len(MEMORY_KEYS)] * self.channel.size
        rows[0] = memory_row(self.weights)
        return {
            f"rank{r}_{k}": int(v)
            for r, row in enumerate(rows)
            for k, v in zip(MEMORY_KEYS, row, strict=True)
        }

    @contextmanager
    def exchange(self):
        """MLX thread: a step every rank takes together. Any failure inside breaks the group."""
        if self.broken:
            raise GroupBroken(f"{self.broken}; call LoadModel to rebuild the group")
        self.since = time.monotonic()
        try:
            yield
        except Exception as exc:
            self.broken = f"distributed group broken: a rank died or became unreachable ({exc})"
            raise GroupBroken(f"{self.broken}; call LoadModel to rebuild the group") from None
        finally:
            self.since, self.last = None, time.monotonic()

    def _flush(self):
        while self.freed:
            self.channel.send(FREE, self.freed.popleft())


def init_group(settings: GroupSettings):
    """mx.distributed.init. The ring backend waits for a missing rank while holding the GIL, so the
    deadline (distributed_init_timeout) is kept by the parent, which reads the phase file."""
    set_phase("forming")
    die_with_parent()  # a parent that dies while this waits must not leave it behind
    try:
        group = mx.distributed.init(strict=True, backend=settings.backend)
    except Exception as exc:
        raise GroupBroken(
            f"mx.distributed.init(backend={settings.backend!r}) failed: {exc} ({settings.workers()})"
        ) from None
    if group.size() != settings.size:
        hint = (
            " (MPI ranks must be started by mpirun)" if settings.backend in ("mpi", "any") else ""
        )
        raise GroupBroken(
            f"backend {settings.backend} formed a group of {group.size()} rank(s) but the hostfile lists "
            f"{settings.size}{hint}"
        )
    set_phase("loading")
    return group


def set_phase(phase: str):
    """Tell the parent what rank 0 is waiting for (it keeps the init/load deadlines)."""
    print(f"{PHASE} {phase}", file=sys.stderr, flush=True)


def load(spec, settings: GroupSettings):
    """Form the group, have every rank load its shard, and return rank 0's TextModel."""

    path = model_dir(spec.model, spec.model_file, spec.model_path)
    config = read_config(path)
    config.update(fix_config(config))
    trust = trusts_remote_code(spec)
    started = time.perf_counter()
    log.info("rank 0: forming a group of %d ranks (%s)", settings.size, settings.backend)
    group = init_group(settings)
    log.info("rank 0: group formed in %.1f s", time.perf_counter() - started)
    channel = Channel(group)
    with _during_load():
        channel.send_json(
            LOAD,
            {
                "model": spec.model,
                "model_file": spec.model_file,
                "model_path": spec.model_path,
                "mode": settings.mode,
                "split": settings.split,
                "timeout": settings.timeout,
                "trust_remote_code": trust,
            },
        )
    shard, tokenizer, error = None, None, None
    try:  # every rank loads at the same time; the results are gathered below
        from mlx_lm.utils import load_tokenizer  # imports transformers: after the group formed

        shard = shards.load(path, group, settings.mode, settings.split, trust)
        tokenizer_config = trusted(tokenizer_options(spec.options), trust)
        tokenizer = load_tokenizer(path, tokenizer_config, eos_token_ids=config.get("eos_token_id"))
        add_eos_tokens(tokenizer, spec.options)
    except ValueError as exc:
        error = remote_code_refused(path, exc) or exc
    except Exception as exc:
        error = exc
    with _during_load():
        rows = channel.gather([error_code(error)] + memory_row(shard.weights if shard else 0))
        texts = channel.gather_text(error_message(error) if error else "")
    failed = [(r, row[0]) for r, row in enumerate(rows) if row[0]]
    if failed:
        try:
            channel.send(SHUTDOWN)
        except Exception:
            pass
        r, code = failed[0]
        raise RemoteError(
            ERROR_CODES[code],
            texts[r] if r == 0 else f"rank {r} ({settings.address(r)}): {texts[r]}",
        )
    model = DistributedModel(shard, channel, settings)
    model.memory = tuple(row[1:] for row in rows)
    context = spec.context_size or config.get("max_position_embeddings") or DEFAULT_CONTEXT
    budget = int(spec.options.get("max_kv_bytes", 0)) or int(HEADROOM * available_bytes())
    tm = TextModel(
        model, tokenizer, config, path, int(context), None, dict(spec.options), kv_budget=budget
    )
    start_watchdog(model, settings)
    set_phase("ready")
    return tm


@contextmanager
def _during_load():
    try:
        yield
    except Exception as exc:
        raise GroupBroken(
            f"distributed group broken while loading: a rank died or became unreachable ({exc})"
        ) from None


def start_watchdog(model: DistributedModel, settings: GroupSettings):
    """Exit the process when a step waits on the other ranks longer than the timeout: MLX offers
    no way to interrupt a blocked collective, and the parent rebuilds the group from scratch.
    This thread names the reason; while a blocked call keeps the GIL it cannot run, and the
    dead-man's switch it re-arms ends the process after timeout + 1 s instead (the parent then
    reports the reason announced here up front)."""
    reason = (
        f"distributed group broken: no answer from the other ranks for {settings.timeout:g} s "
        f"(distributed_timeout; {settings.workers()}): a rank died, froze or became unreachable"
    )
    print(f"{IF_SILENT} {reason}", file=sys.stderr, flush=True)

    def watch():
        while model.broken != "the group was shut down by Free":
            dead_mans_switch(settings.timeout + 1.0)
            since = model.since
            if since is not None and time.monotonic() - since > settings.timeout:
                exit_with(reason)
            time.sleep(0.2)
        dead_mans_switch(None)

    threading.Thread(target=watch, name="mlx-distributed-watchdog", daemon=True).start()


def exit_with(reason: str):
    print(f"{REASON} {reason}", file=sys.stderr, flush=True)  # the parent reports it to the client
    os._exit(WATCHDOG_EXIT)


def ping_interval(settings: GroupSettings) -> float:
    return min(PING_INTERVAL, settings.timeout / 3)


async def pinger(worker, model: DistributedModel, settings: GroupSettings):
    """Event loop task: a heartbeat whenever the group has been quiet for a ping interval. A
    group that breaks while idle ends this process, so the parent notices at once."""
    import asyncio

    interval = ping_interval(settings)
    while not model.broken:
        await asyncio.sleep(interval / 4)
        if model.since is None and time.monotonic() - model.last >= interval:
            try:
                await worker.run(model.ping)
            except GroupBroken:
                if not model.broken.startswith("the group was shut down"):
                    exit_with(model.broken)
                return
