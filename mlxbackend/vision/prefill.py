"""Prefill of a media prompt before it joins the continuous batch (worker thread).

The prefix cache is looked up with the media-aware key: a second turn about the same image finds
the first turn's KV and, when that prefix covers every media token, skips the vision tower and
joins the batch like a text prompt. Otherwise the vision tower and projector run once
(mlx-vlm's `get_input_embeddings`, the same call its `generate_step` makes) and the language
model prefills from the cached length up to the last prompt token in chunks, as mlx-vlm does;
the last token is fed by `batch.start` (`generate.first_token`), which samples the reply."""

import time

import mlx.core as mx

from mlxbackend.text import prefix_cache
from mlxbackend.text.chat import Prompt
from mlxbackend.text.models import TextModel

DEFAULT_CHUNK = 2048  # mlx-vlm's DEFAULT_PREFILL_STEP_SIZE: the same chunks, the same numbers


def prefill(tm: TextModel, prompt: Prompt, adapter=None, between=lambda: None) -> tuple:
    """(cache, tokens in it, tokens still to feed, tokens reused from the prefix cache, start
    time) for BatchGenerator.insert; the request's prompt time counts from that start. `between()` runs after the vision tower and after each chunk (the
    engine pauses there, and raises if the request was cancelled)."""
    started = time.perf_counter()
    media = prompt.media
    tokens = prompt.tokens
    hit = prefix_cache.fetch(tm, media.key_tokens, adapter)
    cache, cached = hit.cache, hit.cached
    done = reused = len(cached)
    counts = tm.vision.counts
    if done >= media.media_end:  # every media token is in the cached prefix
        counts["media_prompts_from_cache"] += 1
        return cache, tokens[:done], tokens[done:], reused, started
    counts["media_prompts_encoded"] += 1
    if cache is None:
        cache, done = tm.model.make_cache(), 0
    vlm = tm.vision.vlm
    ids = mx.array([tokens])
    extra = {k: v for k, v in media.inputs.items() if k not in ("pixel_values", "attention_mask")}
    pixels, mask = media.inputs.get("pixel_values"), media.inputs.get("attention_mask")
    embedded = vlm.get_input_embeddings(ids, pixels, mask=mask, **extra)
    kwargs = {**extra}
    kwargs.update(
        {k: v for k, v in embedded.to_dict().items() if k != "inputs_embeds" and v is not None}
    )
    embeds = embedded.inputs_embeds
    mx.eval(embeds)
    between()
    lm = vlm.language_model
    if tm.model.mrope:
        lm._position_ids = None
    chunk = int(tm.options.get("vision_prefill_chunk", DEFAULT_CHUNK))
    end = len(tokens) - 1
    while done < end:
        n = min(chunk, end - done)
        lm(
            ids[:, done : done + n],
            inputs_embeds=embeds[:, done : done + n],
            cache=cache,
            n_to_process=n,
            logits_to_keep=1,
            **kwargs,
        )
        mx.eval([c.state for c in cache])
        done += n
        between()
    if tm.model.mrope:
        delta = kwargs.get("rope_deltas")
        delta = int(mx.array(delta).reshape(-1)[0].item()) if delta is not None else 0
        for c in cache:
            c.rope_delta = delta
    return cache, tokens[:end], tokens[end:], reused, started
