"""An mlx-vlm language model seen as an mlx-lm model, so that VLM requests share the text engine's
continuous batch (mlx-lm's BatchGenerator), prefix cache, samplers and grammar.

Image, video and audio tokens only change the prompt's embeddings, which `vision/prefill.py`
feeds before a request joins the batch; from then on decoding is token by token, as for text.
Families with multimodal rotary positions (Qwen2/2.5/3-VL: `mrope`) also shift each request's
positions by its own `rope_delta`: the caches below carry it per row through every batch
operation (merge, filter, extend, extract), which is where mlx-lm keeps per-row state."""

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models import cache as lm_cache
from mlx_lm.models.cache import BatchKVCache, KVCache, RotatingKVCache


class RopeKVCache(KVCache):
    """A KVCache with the position shift of its request (0 for text-only prompts); the shift is
    part of its state, so a saved prompt cache (Options prompt_cache_dir) keeps it."""

    rope_delta: int = 0

    @property
    def state(self):
        return (*KVCache.state.fget(self), mx.array(self.rope_delta))

    @state.setter
    def state(self, v):
        *kv, delta = v
        KVCache.state.fset(self, tuple(kv))
        self.rope_delta = int(delta.item())

    @classmethod
    def merge(cls, caches):
        return RopeBatchKVCache.merge(caches)


# mlx-lm's load_prompt_cache finds cache classes by name in its own module
lm_cache.RopeKVCache = RopeKVCache


class RopeBatchKVCache(BatchKVCache):
    """mlx-lm's BatchKVCache with one rope delta per row."""

    rope_deltas: mx.array

    @classmethod
    def merge(cls, caches):
        batch = BatchKVCache.merge(caches)
        batch.__class__ = cls  # same layout; adds the per-row deltas
        batch.rope_deltas = mx.array([getattr(c, "rope_delta", 0) for c in caches])
        return batch

    def filter(self, batch_indices):
        super().filter(batch_indices)
        self.rope_deltas = self.rope_deltas[mx.array(batch_indices)]

    def extend(self, other):
        super().extend(other)
        self.rope_deltas = mx.concatenate([self.rope_deltas, other.rope_deltas])

    def extract(self, idx):
        cache = super().extract(idx)
        cache.__class__ = RopeKVCache
        cache.rope_delta = int(self.rope_deltas[idx].item())
        return cache


def _rope_deltas(cache) -> mx.array:
    first = cache[0]
    if isinstance(first, RopeBatchKVCache):
        return first.rope_deltas[:, None]
    return mx.array([[getattr(first, "rope_delta", 0)]])


def _mlx_lm_cache(cache):
    """mlx-lm's class for one of mlx-vlm's cache objects (same behaviour, batchable)."""
    name = type(cache).__name__
    if name == "KVCache":
        return KVCache()
    if name == "RotatingKVCache":
        return RotatingKVCache(max_size=cache.max_size, keep=cache.keep)
    raise ValueError(f"mlx-vlm cache {name} has no batchable mlx-lm counterpart")


class VisionLM(nn.Module):
    """The language model of an mlx-vlm model with mlx-lm's calling convention: tokens (or
    embeddings) and a cache in, logits out."""

    def __init__(self, vlm, text_config: dict, mrope: bool):
        super().__init__()
        self.vlm = vlm
        self.mrope = mrope
        self.model_type = str(text_config.get("model_type", ""))
        self.args = _Args(int(text_config.get("vocab_size") or 0))

    @property
    def language_model(self):
        return self.vlm.language_model

    @property
    def layers(self):
        return self.language_model.layers

    def make_cache(self) -> list:
        if self.mrope:
            return [RopeKVCache() for _ in self.layers]
        lm = self.language_model
        if hasattr(lm, "make_cache"):
            return [_mlx_lm_cache(c) for c in lm.make_cache()]
        return [KVCache() for _ in self.layers]

    def __call__(self, inputs: mx.array, cache=None, input_embeddings=None, **kwargs) -> mx.array:
        lm = self.language_model
        if self.mrope:
            # positions come from each row's cache offset plus its own delta, never from state
            # another request left on the shared module (no cache: a whole prompt at once, e.g.
            # a rerank; its positions are computed from the tokens)
            lm._position_ids = None
            if cache:
                kwargs["rope_deltas"] = _rope_deltas(cache)
        out = lm(inputs, inputs_embeds=input_embeddings, cache=cache, **kwargs)
        return out.logits


class _Args:
    """What the text engine reads from an mlx-lm model's `args`."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
