"""A vision-feature cache: the same image in a new conversation skips the vision tower.

mlx-vlm computes image features inside each family's `get_input_embeddings`; its own feature
cache (`cached_image_features`) is fed only for the few families with an `encode_image` method.
Here the vision tower itself is memoized, keyed on the exact pixel inputs it receives (all the
images of a prompt, their grids and flags), so the embeddings are bit-identical to a fresh run.
Families whose tower returns every layer's hidden states (SigLIP towers of Gemma 3, Idefics3 /
SmolVLM) keep only the output their model reads (the first), not hundreds of MB of activations.
Bounded in bytes (Options `vision_cache_bytes`, default 256 MiB; 0 turns it off), LRU."""

import hashlib
from collections import OrderedDict

import mlx.core as mx
import numpy as np

DEFAULT_BYTES = 256 << 20
# model_type → which part of the tower's output to keep ("all" or "first"); families not listed
# run their tower every time (no cache) until their output contract is checked
KEEP = {
    "qwen2_vl": "all",
    "qwen2_5_vl": "all",
    "qwen3_vl": "all",
    "qwen3_vl_moe": "all",
    "gemma4": "all",
    "gemma3": "first",
    "idefics3": "first",
    "smolvlm": "first",
}
TOWERS = ("vision_tower", "vision_model")


class FeatureCache:
    """Tower outputs by input hash, LRU within a byte budget."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.entries: OrderedDict = OrderedDict()
        self.nbytes = 0
        self.hits = 0
        self.misses = 0

    def get(self, key: str):
        if key not in self.entries:
            return None
        self.entries.move_to_end(key)
        self.hits += 1
        return self.entries[key][0]

    def put(self, key: str, value) -> None:
        size = sum(a.nbytes for a in _arrays(value))
        if size > self.max_bytes:
            return
        self.entries[key] = (value, size)
        self.nbytes += size
        while self.nbytes > self.max_bytes:
            _, (_, dropped) = self.entries.popitem(last=False)
            self.nbytes -= dropped

    def clear(self) -> None:
        self.entries.clear()
        self.nbytes = 0


def install(vlm, model_type: str, options: dict) -> FeatureCache | None:
    """Memoize the model's vision tower (in place); None when off or the family is not listed."""
    keep = KEEP.get(model_type)
    budget = int(options.get("vision_cache_bytes", DEFAULT_BYTES))
    tower_name = next((n for n in TOWERS if getattr(vlm, n, None) is not None), None)
    if keep is None or budget <= 0 or tower_name is None:
        return None
    cache = FeatureCache(budget)
    tower = getattr(vlm, tower_name)
    base = type(tower)

    def __call__(self, *args, **kwargs):
        key = _key(args, kwargs)
        if key is not None:
            hit = cache.get(key)
            if hit is not None:
                return hit
        out = base.__call__(self, *args, **kwargs)
        if key is not None:
            kept = out if keep == "all" or not isinstance(out, tuple) else _first(out)
            mx.eval(list(_arrays(kept)))
            cache.misses += 1
            cache.put(key, kept)
        return out

    # a subclass of the tower's own class: every attribute and weight stays where the model
    # reads it, only the call consults the cache
    tower.__class__ = type(f"Cached{base.__name__}", (base,), {"__call__": __call__})
    return cache


def _first(out: tuple) -> tuple:
    return (out[0], *([None] * (len(out) - 1)))


def _arrays(value):
    if isinstance(value, mx.array):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _arrays(v)


def _key(args: tuple, kwargs: dict) -> str | None:
    """A hash of the call's inputs (array bytes, shapes, dtypes and plain arguments); None when
    no array is passed."""
    digest = hashlib.sha256()
    found = False
    for name, value in [*enumerate(args), *sorted(kwargs.items())]:
        digest.update(str(name).encode())
        if isinstance(value, mx.array):
            found = True
            digest.update(f"{value.shape}{value.dtype}".encode())
            digest.update(
                np.asarray(
                    value.astype(mx.float32) if value.dtype == mx.bfloat16 else value
                ).tobytes()
            )
        else:
            digest.update(repr(value).encode())
    return digest.hexdigest() if found else None
