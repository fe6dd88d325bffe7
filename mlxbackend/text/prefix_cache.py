"""Token-prefix KV reuse across requests, on mlx-lm's LRUPromptCache (bounded in bytes, LRU).

A multi-turn chat prefills only what is new; an exact hit re-feeds only its last token (the
cache is trimmed by one so the model still produces fresh logits)."""

from mlxbackend.text.models import TextModel

DEFAULT_BYTES = 512 << 20
DEFAULT_ENTRIES = 32


def cache_for(tm: TextModel):
    """The model's prefix cache (created on first use), or None when disabled by Options."""
    if tm.options.get("prompt_cache", True) is False:
        return None
    if tm.prompt_cache is None:
        from mlx_lm.models.cache import LRUPromptCache

        tm.prompt_cache = LRUPromptCache(
            max_size=int(tm.options.get("prompt_cache_entries", DEFAULT_ENTRIES)),
            max_bytes=int(tm.options.get("prompt_cache_bytes", DEFAULT_BYTES)),
        )
    return tm.prompt_cache


def fetch(tm: TextModel, tokens: list):
    """(kv cache or None, tokens already in it, tokens still to prefill — never empty)."""
    from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache

    lru = cache_for(tm)
    if lru is None:
        return None, [], tokens
    cache, rest = lru.fetch_nearest_cache(id(tm), tokens)
    if cache is None:
        return None, [], tokens
    if not rest:  # exact hit: re-feed the last token
        if not can_trim_prompt_cache(cache):
            return None, [], tokens
        trim_prompt_cache(cache, 1)
        rest = tokens[-1:]
    return cache, tokens[: len(tokens) - len(rest)], rest


def store(tm: TextModel, tokens: list, cache):
    """Keep a finished request's KV (its prompt and reply) for later prefixes."""
    lru = cache_for(tm)
    if lru is not None and cache and tokens:
        lru.insert_cache(id(tm), list(tokens), cache)


def nbytes(tm: TextModel | None) -> int:
    return tm.prompt_cache.nbytes if tm is not None and tm.prompt_cache is not None else 0
