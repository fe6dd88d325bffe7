"""Token-prefix KV reuse across requests, on mlx-lm's LRUPromptCache (bounded in bytes, LRU).

A multi-turn chat prefills only what is new; an exact hit re-feeds only its last token (the
cache is trimmed by one so the model still produces fresh logits). With Options
`prompt_cache_dir`, a second tier on disk (text/ssd_cache.py) keeps KV blocks written as they
become reusable; a lookup takes the longer of the RAM and the disk prefix. Models whose cache
that tier cannot store (rotating, sliding-window or recurrent layers, vision-language models)
save whole entries there on Free and shutdown instead, restored at the next load."""

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from mlxbackend import publish
from mlxbackend.errors import NoSpace
from mlxbackend.options import number_option
from mlxbackend.text import ssd_cache
from mlxbackend.text.models import TextModel

log = logging.getLogger(__name__)

DEFAULT_BYTES = 512 << 20
DEFAULT_ENTRIES = 32


@dataclass
class Hit:
    cache: list | None  # the KV to extend, None = start empty
    cached: list  # the prompt tokens already in it
    rest: list  # the tokens still to prefill (never empty)
    from_ssd: int = 0  # of `cached`, tokens read from the SSD tier


def max_entries(options: dict) -> int:
    """Options prompt_cache_entries, else max_cache_entries (LocalAI's mlx backend's name)."""
    key = "prompt_cache_entries" if "prompt_cache_entries" in options else "max_cache_entries"
    return number_option(options, key, int, low=1, default=DEFAULT_ENTRIES)


def cache_for(tm: TextModel):
    """The model's prefix cache (created on first use), or None when disabled by Options."""
    if tm.options.get("prompt_cache", True) is False:
        return None
    if tm.prompt_cache is None:
        from mlx_lm.models.cache import LRUPromptCache

        tm.prompt_cache = LRUPromptCache(
            max_size=max_entries(tm.options),
            max_bytes=int(tm.options.get("prompt_cache_bytes", DEFAULT_BYTES)),
        )
        folder = _folder(tm)
        if folder is not None and _blocks_fit(tm):
            tm.ssd = ssd_cache.open_tier(folder, tm.options)
        else:
            restore(tm)
    return tm.prompt_cache


def _blocks_fit(tm: TextModel) -> bool:
    """Whether the SSD tier can store this model's KV (plain layers, text only)."""
    from mlxbackend.text.kv_quant import make_cache

    return (
        tm.vision is None
        and not tm.max_kv_size
        and ssd_cache.supported(make_cache(tm.model, tm.kv, 0))
    )


def fetch(tm: TextModel, tokens: list, adapter=None) -> Hit:
    """The longest cached prefix of `tokens`, from RAM or the SSD tier."""
    from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache

    lru = cache_for(tm)
    if lru is None:
        return Hit(None, [], tokens)
    cache, rest = lru.fetch_nearest_cache(adapter or "", tokens)
    if cache is not None and not rest:  # exact hit: re-feed the last token
        if can_trim_prompt_cache(cache):
            trim_prompt_cache(cache, 1)
            rest = tokens[-1:]
        else:
            cache = None
    in_ram = len(tokens) - len(rest) if cache is not None else 0
    if tm.ssd is not None and in_ram + 1 < len(tokens):
        stored = ssd_cache.lookup(tm.ssd, _fingerprint(tm, adapter or ""), tokens, len(tokens) - 1)
        if stored.tokens > in_ram:
            # the blocks RAM holds are kept; the tier supplies only what follows them
            start = min(in_ram // tm.ssd.block, len(stored.names)) * tm.ssd.block
            if start:
                trim_prompt_cache(cache, in_ram - start)
                target = cache
            else:
                from mlxbackend.text.kv_quant import make_cache

                target = make_cache(tm.model, tm.kv, 0)
            n = ssd_cache.load(tm.ssd, stored, target, start)
            if start or n > in_ram:
                return Hit(target, tokens[:n], tokens[n:], n - start)
    if cache is None:
        return Hit(None, [], tokens)
    return Hit(cache, tokens[:in_ram], rest)


def store(tm: TextModel, tokens: list, cache, adapter=None):
    """Keep a finished request's KV (its prompt and reply) for later prefixes, in RAM and in the
    SSD tier's blocks; entries are keyed by the LoRA adapter that produced them ("" = the base
    model)."""
    lru = cache_for(tm)
    if lru is not None and cache and tokens:
        materialize(cache)
        lru.insert_cache(adapter or "", list(tokens), cache)
        if tm.ssd is not None:
            ssd_cache.save(tm.ssd, _fingerprint(tm, adapter or ""), list(tokens), cache)


def materialize(cache):
    """Evaluate a cache extracted from a batch so that it owns its memory.

    mlx-lm's `BatchKVCache.extract` returns lazy `contiguous(keys[i, :, a:b])` slices: until
    evaluated, each one keeps the whole batch's KV buffer of that moment alive while its `nbytes`
    counts only the slice. Stored unevaluated, 32 entries pinned ~2-3 GB that the byte bound
    of the cache never saw (the soak's growth, issue 15)."""
    import mlx.core as mx

    mx.eval([c.state for c in cache])


def status(tm: TextModel | None) -> dict:
    """Status keys of the SSD tier (none without one)."""
    return tm.ssd.status() if tm is not None and tm.ssd is not None else {}


def nbytes(tm: TextModel | None) -> int:
    return tm.prompt_cache.nbytes if tm is not None and tm.prompt_cache is not None else 0


def _fingerprint(tm: TextModel, adapter: str) -> str:
    """What the cached KV depends on: the weights, the fused adapters, the hot-swapped one, and
    the KV type (a quantized KV is not the float one)."""
    key = [str(tm.path), [list(a) for a in tm.adapters], adapter]
    if tm.kv is not None and tm.kv.quantized:
        key.append(tm.kv.label())
    return json.dumps(key)


def _folder(tm: TextModel):
    folder = tm.options.get("prompt_cache_dir")
    return Path(str(folder)) if folder else None


def persist(tm: TextModel | None):
    """On Free and shutdown: wait for the SSD tier's queued blocks, or (models without the tier)
    save the cache's entries to `prompt_cache_dir` (one file each, published atomically). Must
    not fail: a full disk is logged as an error naming the file; the entries saved before stay
    loadable and nothing half-written is left."""
    if tm is not None and tm.ssd is not None:
        ssd_cache.flush(tm.ssd)
        return
    try:
        _persist(tm)
    except NoSpace as exc:
        log.error("prompt cache not saved: %s; the entries saved before are kept", exc)


def _persist(tm: TextModel | None):
    from mlx_lm.models.cache import save_prompt_cache

    folder = _folder(tm) if tm is not None else None
    if folder is None or tm.prompt_cache is None:
        return
    folder.mkdir(parents=True, exist_ok=True)
    lru, kept = tm.prompt_cache, set()
    for entries in lru._lru._lrus.values():
        for model, tokens in list(entries):
            fingerprint = _fingerprint(tm, model)
            name = hashlib.sha1(f"{fingerprint}{tokens}".encode()).hexdigest() + ".safetensors"
            kept.add(name)
            if (folder / name).exists():
                continue
            meta = {
                "fingerprint": fingerprint,
                "adapter": model,
                "tokens": json.dumps(list(tokens)),
            }
            with publish.atomic_file(folder / name) as f:  # a file object: mx writes it as is
                save_prompt_cache(f, lru._trie.get(model, tokens).prompt_cache, meta)
    for old in folder.glob("*.safetensors"):
        if old.name not in kept and not old.name.startswith("."):
            try:
                meta = _read_meta(old)
                meta_matches = meta.get("fingerprint") == _fingerprint(tm, meta.get("adapter", ""))
            except Exception:
                meta_matches = False
            if meta_matches:
                old.unlink()  # evicted since it was saved


def _read_meta(path: Path) -> dict:
    import mlx.core as mx

    return mx.load(str(path), return_metadata=True)[1]


def restore(tm: TextModel):
    """Load this model's saved entries from `prompt_cache_dir`."""
    from mlx_lm.models.cache import load_prompt_cache

    folder = _folder(tm)
    if folder is None or not folder.is_dir():
        return
    publish.clean_stale(folder)  # temp files a killed writer left
    for path in sorted(folder.glob("*.safetensors"), key=lambda p: p.stat().st_mtime):
        if path.name.startswith("."):
            continue
        try:
            cache, meta = load_prompt_cache(str(path), return_metadata=True)
        except Exception:
            continue  # unreadable: ignore, it will be replaced
        adapter = meta.get("adapter", "")
        if meta.get("fingerprint") == _fingerprint(tm, adapter):
            tm.prompt_cache.insert_cache(adapter, json.loads(meta["tokens"]), cache)
