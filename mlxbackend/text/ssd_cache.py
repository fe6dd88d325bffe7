"""The SSD tier of the prefix cache (Options `prompt_cache_dir`).

KV is kept in blocks of `prompt_cache_block` tokens (64), one safetensors file per block, named
by a hash chained from what the KV depends on (`root`: weights, adapters, KV type) over every
token up to the block's end. So a prefix that many conversations share (a system prompt and
tools) is one set of files, and a lookup walks the chain until a block is missing.

- Write-through: when the prefix cache keeps a sequence's KV, its complete blocks that are not on
  disk yet are serialized on the worker and written by one writer thread (no MLX there), each
  published atomically: after `kill -9` only complete blocks exist, and the next process finds
  them by name.
- The sequence's last, partial block is written too, as a tail named `<block before>-<hash>`
  with its tokens in the file's metadata: an agent's next turn extends that sequence, so it
  loads the tail (as far as the prompt agrees with it) and recomputes none of it; without one,
  up to `block` - 1 tokens per turn.
- Bounded in bytes (`prompt_cache_disk_bytes`, 8 GiB) with LRU eviction; a block's use time is
  its mtime, so the order survives a restart.
- An unwritable directory or a full disk (nothing left of ours to evict) turns the tier off:
  serving goes on from RAM, Status has `prompt_cache_ssd_off.<reason>` and the log the message.

Only plain KV layers are stored (float `KVCache` or our `QuantKVCache`); rotating, sliding-window
and recurrent caches, and vision-language models, keep whole-entry persistence
(text/prefix_cache.py)."""

import hashlib
import io
import logging
import os
import threading
from array import array
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from mlxbackend import publish
from mlxbackend.errors import NoSpace
from mlxbackend.options import number_option

log = logging.getLogger(__name__)

DEFAULT_BLOCK = 64  # tokens: a miss recomputes at most this many past the stored prefix
DEFAULT_BYTES = 8 << 30
MAX_PENDING = 64  # blocks queued for the writer; past that new ones are skipped, not queued
SUFFIX = ".safetensors"


@dataclass
class Tier:
    folder: Path
    block: int
    budget: int
    off: str = ""  # why the tier is off ("unwritable", "no_space"); "" while it serves
    why: str = ""  # the full message
    files: OrderedDict = field(default_factory=OrderedDict)  # name → bytes, least recent first
    nbytes: int = 0
    pending: set = field(default_factory=set)  # names queued or being written
    tails: dict = field(default_factory=dict)  # block before → {tail name: its tokens or None}
    writes: int = 0
    evictions: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    writer: ThreadPoolExecutor | None = None

    def disable(self, reason: str, message: str) -> "Tier":
        if not self.off:
            log.error("SSD prompt cache off: %s; serving goes on from RAM", message)
        self.off, self.why = reason, message
        return self

    def status(self) -> dict:
        keys = {
            "prompt_cache_ssd_bytes": self.nbytes,
            "prompt_cache_ssd_budget": self.budget,
            "prompt_cache_ssd_blocks": len(self.files),
            "prompt_cache_ssd_queued": len(self.pending),
            "prompt_cache_ssd_writes": self.writes,
            "prompt_cache_ssd_evictions": self.evictions,
        }
        if self.off:
            keys[f"prompt_cache_ssd_off.{self.off}"] = 1
        return keys


def open_tier(folder: Path, options: dict) -> Tier:
    """The tier under `folder`/blocks: stale temp files of a killed writer removed, the blocks
    already there indexed in use order. A folder it cannot write is reported, not raised; bad
    Options values are INVALID_ARGUMENT."""
    tier = Tier(
        folder / "blocks",
        block=number_option(options, "prompt_cache_block", int, 1, default=DEFAULT_BLOCK),
        budget=number_option(options, "prompt_cache_disk_bytes", int, 0, default=DEFAULT_BYTES),
    )
    try:
        tier.folder.mkdir(parents=True, exist_ok=True)
        publish.clean_stale(tier.folder)
        probe = tier.folder / f".probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
        found = [(p.stat().st_mtime, p) for p in tier.folder.glob("*" + SUFFIX)]
    except OSError as exc:
        return tier.disable("unwritable", f"cannot write {folder}: {exc.strerror or exc}")
    for _, path in sorted(found):
        if not path.name.startswith("."):
            _add(tier, path.name[: -len(SUFFIX)], path.stat().st_size)
    with tier.lock:
        _evict(tier, tier.budget)
    tier.writer = ThreadPoolExecutor(1, thread_name_prefix="kv-ssd")
    return tier


def supported(cache) -> bool:
    """Caches whose layers this tier can store: plain float or quantized KV."""
    from mlx_lm.models.cache import KVCache

    from mlxbackend.text.kv_quant import QuantKVCache

    return bool(cache) and all(type(c) in (KVCache, QuantKVCache) for c in cache)


@dataclass
class Stored:
    """What the tier holds of a prompt: whole blocks, then maybe the tail of a sequence."""

    names: list  # the blocks, in order
    block: int
    tail: str = ""  # the tail file's name, or ""
    tail_tokens: int = 0

    @property
    def tokens(self) -> int:
        return len(self.names) * self.block + self.tail_tokens


def chain(root: str, tokens: list, block: int, limit: int) -> list:
    """The names of the blocks that hold `tokens[:limit]` (complete blocks only)."""
    names, digest = [], _root(root)
    for end in range(block, limit + 1, block):
        digest = hashlib.sha1(digest + array("q", tokens[end - block : end]).tobytes()).digest()
        names.append(digest.hex())
    return names


def tail_name(root: str, names: list, tokens: list) -> str:
    """The name of a tail: `tokens` (fewer than a block) after the blocks `names`."""
    return f"{_before(root, names)}-{hashlib.sha1(array('q', tokens).tobytes()).hexdigest()}"


def lookup(tier: Tier, root: str, tokens: list, limit: int) -> Stored:
    """The blocks on disk that hold the longest stored prefix of `tokens[:limit]`, and the
    longest stored tail after them that is a prefix of the rest."""
    if tier.off:
        return Stored([], tier.block)
    names = chain(root, tokens, tier.block, limit)
    with tier.lock:
        n = 0
        while n < len(names) and names[n] in tier.files:
            n += 1
        tails = dict(tier.tails.get(_before(root, names[:n]), {}))
    rest, best = tokens[n * tier.block : limit], Stored(names[:n], tier.block)
    for name, stored in tails.items():
        stored = stored if stored is not None else _tail_tokens(tier, name)
        agree = len(os.path.commonprefix([stored, tuple(rest[: len(stored)])]))
        if agree > best.tail_tokens:
            best = Stored(names[:n], tier.block, name, agree)
    return best


def load(tier: Tier, stored: Stored, cache: list, start: int = 0) -> int:
    """Fill `cache` from the tier (worker thread); returns the tokens now in it. `cache` is empty,
    or holds the first `start` tokens of the prompt (a multiple of the block, from RAM): only the
    blocks after them are read. A block gone meanwhile (evicted, unreadable) ends the prefix
    there."""
    import mlx.core as mx

    parts, files = [], stored.names[start // tier.block :] + ([stored.tail] if stored.tail else [])
    for name in files:
        try:
            parts.append(mx.load(str(tier.folder / (name + SUFFIX))))
        except Exception:  # noqa: BLE001 — evicted or damaged: use the blocks before it
            break
    if not parts:
        return start
    if stored.tail and len(parts) == len(files):  # the tail, as far as the prompt agrees
        parts[-1] = {k: x[..., : stored.tail_tokens, :] for k, x in parts[-1].items()}
    n = start + sum(p["0.0"].shape[-2] for p in parts)
    for i, layer in enumerate(cache):
        count = sum(1 for k in parts[0] if k.startswith(f"{i}."))
        before = _arrays(layer, 0, start) if start else []
        arrays = [
            mx.concatenate(([before[j]] if start else []) + [p[f"{i}.{j}"] for p in parts], -2)
            for j in range(count)
        ]
        _fill(layer, arrays, n)
    mx.eval([c.state for c in cache])
    _touch(tier, files[: len(parts)])
    return n


def save(tier: Tier, root: str, tokens: list, cache: list) -> int:
    """Queue the complete blocks of `cache` (holding `tokens`) that are not on disk yet, and its
    tail; marks the others as just used. Worker thread: the blocks are copied and serialized
    here, written by the writer thread. Returns the files queued."""
    import mlx.core as mx

    if tier.off or not supported(cache):
        return 0
    limit = min(len(tokens), cache[0].offset)
    names = chain(root, tokens, tier.block, limit)
    spans = [(i * tier.block, (i + 1) * tier.block, name) for i, name in enumerate(names)]
    tail = ""
    if limit % tier.block:
        a = len(names) * tier.block
        tail = tail_name(root, names, tokens[a:limit])
        spans.append((a, limit, tail))
    with tier.lock:
        todo = [s for s in spans if s[2] not in tier.files and s[2] not in tier.pending]
        room = MAX_PENDING - len(tier.pending)
        todo = todo[: max(room, 0)]
        tier.pending.update(name for _, _, name in todo)
    _touch(tier, [s[2] for s in spans if s[2] in tier.files])
    for a, b, name in todo:
        tensors = {
            f"{li}.{j}": mx.contiguous(x)
            for li, layer in enumerate(cache)
            for j, x in enumerate(_arrays(layer, a, b))
        }
        buffer = io.BytesIO()
        own = tuple(tokens[a:b]) if name == tail else None  # a tail's tokens, kept in its file
        meta = {"tokens": ",".join(map(str, own))} if own else None
        mx.save_safetensors(buffer, tensors, meta)  # a file object: mx writes to it as is
        tier.writer.submit(_write, tier, name, buffer.getvalue(), own)
    return len(todo)


def flush(tier: Tier | None) -> None:
    """Wait for queued blocks to be written (Free, shutdown); the tier keeps serving."""
    if tier is not None and tier.writer is not None:
        tier.writer.submit(lambda: None).result()


def _write(tier: Tier, name: str, data: bytes, tokens: tuple | None) -> None:
    """Writer thread: publish one block; on a full disk evict ours and retry once."""
    path = tier.folder / (name + SUFFIX)
    try:
        for attempt in range(2):
            try:
                publish.write_bytes(path, data)
                break
            except NoSpace as exc:
                with tier.lock:
                    freed = _evict(tier, max(tier.nbytes - 4 * len(data), 0))
                if attempt or not freed:
                    tier.disable("no_space", str(exc))
                    return
        with tier.lock:
            _add(tier, name, len(data), tokens)
            tier.writes += 1
            _evict(tier, tier.budget)
    except OSError as exc:
        tier.disable("unwritable", f"cannot write {path}: {exc.strerror or exc}")
    finally:
        with tier.lock:
            tier.pending.discard(name)


def _evict(tier: Tier, upto: int) -> int:
    """Remove least recently used blocks until the tier holds at most `upto` bytes (lock held);
    returns the bytes freed."""
    freed = 0
    while tier.files and tier.nbytes > upto:
        name, size = tier.files.popitem(last=False)
        tier.nbytes -= size
        parent = _parent(name)
        if parent in tier.tails:
            tier.tails[parent].pop(name, None)
            if not tier.tails[parent]:
                del tier.tails[parent]
        tier.evictions += 1
        freed += size
        try:
            (tier.folder / (name + SUFFIX)).unlink()
        except OSError:
            pass
    return freed


def _root(root: str) -> bytes:
    return hashlib.sha1(root.encode()).digest()


def _before(root: str, names: list) -> str:
    """What a tail after the blocks `names` is filed under: the last block, or the root."""
    return names[-1] if names else _root(root).hex()


def _parent(name: str) -> str:
    """What a tail file is filed under (tail_name's first part); "" for a whole block."""
    return name.split("-")[0] if "-" in name else ""


def _add(tier: Tier, name: str, size: int, tokens: tuple | None = None) -> None:
    """Index a file on disk (lock held, or before the tier is shared)."""
    if name in tier.files:
        tier.nbytes -= tier.files[name]
    tier.files[name] = size
    tier.nbytes += size
    if _parent(name):
        tier.tails.setdefault(_parent(name), {})[name] = tokens


def _tail_tokens(tier: Tier, name: str) -> tuple:
    """A tail's tokens, from its metadata (tails found on disk at start are read on first use);
    () when it cannot be read."""
    import mlx.core as mx

    try:
        _, meta = mx.load(str(tier.folder / (name + SUFFIX)), return_metadata=True)
        tokens = tuple(int(t) for t in meta["tokens"].split(","))
    except Exception:  # noqa: BLE001 — evicted, damaged or foreign: never matches
        tokens = ()
    with tier.lock:
        known = tier.tails.get(_parent(name), {})
        if name in known:
            known[name] = tokens
    return tokens


def _touch(tier: Tier, names: list) -> None:
    """Mark blocks as just used: last in the LRU order, and their mtime (the order on disk)."""
    with tier.lock:
        for name in names:
            if name in tier.files:
                tier.files.move_to_end(name)
    for name in names:
        try:
            os.utime(tier.folder / (name + SUFFIX))
        except OSError:
            pass


def _arrays(layer, a: int, b: int) -> list:
    """One layer's KV for positions a..b, as arrays with the sequence on axis -2."""
    from mlxbackend.text.kv_quant import QuantKVCache

    if isinstance(layer, QuantKVCache):
        keys, values = layer._upto(b)
        return [x[..., a:, :] for x in (*keys, *values)]
    return [layer.keys[..., a:b, :], layer.values[..., a:b, :]]


def _fill(layer, arrays: list, n: int) -> None:
    from mlxbackend.text.kv_quant import QuantKVCache

    if isinstance(layer, QuantKVCache):
        keys = 1 if not layer.kv.key_bits else 3
        layer.keys, layer.values = tuple(arrays[:keys]), tuple(arrays[keys:])
    else:
        layer.keys, layer.values = arrays
    layer.offset = n
