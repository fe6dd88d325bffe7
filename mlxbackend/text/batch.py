"""Continuous batching: concurrent requests on one model share mlx-lm's BatchGenerator.

A request is first prefilled on its own (`start`: chunks with pauses between them, so that long
prompts do not stall the batch) up to its first token, sampled from the last chunk's logits and
sent at once; then it joins its model's batch (`BatchDriver.add`). Each request keeps its own
sampler (own RNG key), logits processors, stop hold-back, parser and detokenizer (a `Decoder`);
the forward pass of every decode step is shared."""

import time
from contextlib import nullcontext
from dataclasses import dataclass

from mlxbackend.text import memory, prefix_cache
from mlxbackend.text.chat import Prompt
from mlxbackend.text.generate import (
    Decoder,
    GenerationRequest,
    first_token,
    prefill,
    prefill_chunk,
    sampling_for,
    token_budget,
)
from mlxbackend.text.models import TextModel
from mlxbackend.text.speculate import (
    DEFAULT_DRAFT_MODEL_TOKENS,
    DraftLength,
    NgramIndex,
    SeqSpec,
    measure_step_tokens,
)
from mlxbackend.worker import DONE, Job

DEFAULT_MAX_BATCH = 32


@dataclass
class Started:
    """A request prefilled and past its first token, ready to join a batch."""

    decoder: Decoder
    cache: list
    tokens: list  # the prompt tokens in `cache`
    first: int  # the first reply token (sent, not yet in `cache`)
    budget: int  # tokens it may generate, the first included
    sampler: object
    processors: list
    stops: object  # mlx-lm StopSequences of its EOS tokens
    key: list | None  # the prefix-cache key of a media prompt's tokens
    spec: SeqSpec | None = None  # its speculation state (prompt lookup), None = plain decoding


def start(
    tm: TextModel,
    job: Job,
    prompt: Prompt,
    req: GenerationRequest,
    ready=None,
    between=None,
    on_cache=None,
) -> Started | None:
    """Worker thread: prefill a request and send its first token; the Started state to join a
    batch with, or None when it ended at that token. `ready`: (cache, tokens in it, tokens to
    feed, tokens reused, start) of a media prompt prefilled beforehand (vision/prefill.py).
    `between()` runs between prefill chunks (the engine pauses there and raises if the request
    was cancelled), so this runs before the request's batch is looked up: a batch left empty
    meanwhile closes. `on_cache(cache)`: the KV being filled (Status counts it)."""
    from mlx_lm.generate import StopSequences

    sampler, processors = sampling_for(tm, req)
    decoder = Decoder(tm, prompt, req)
    if ready is not None:  # its prompt time includes the vision tower and the prefill
        cache, cached, rest, decoder.cached_tokens, decoder.start = ready
    else:
        hit = prefix_cache.fetch(tm, prompt.tokens, req.adapter)
        cache, cached, rest = hit.cache, hit.cached, hit.rest
        decoder.cached_tokens, decoder.ssd_tokens = len(cached), hit.from_ssd
        if cache is None:
            from mlxbackend.text.kv_quant import make_cache

            cache = make_cache(tm.model, tm.kv, tm.max_kv_size)
    if on_cache is not None:
        on_cache(cache)
    if tm.switch is not None:
        tm.switch.active = req.adapter
    tokens = list(cached) + list(rest)
    budget = token_budget(tm, prompt, req.max_tokens)
    # a media prompt's prefill started before the vision tower (vision/prefill.py)
    decoder.prefill_at = decoder.start if ready is not None else time.perf_counter()
    first, logprobs = first_token(
        tm.model, cache, tokens, len(rest), sampler, processors, prefill_chunk(tm), between
    )
    out = decoder.add(first, logprobs)
    if out is not None:
        job.put(out)
    key = prompt.media.key_tokens if prompt.media is not None else None
    if decoder.reason or budget <= 1:  # done at its first token: never joins a batch
        prefix_cache.store(tm, _keyed(key, tokens), cache, req.adapter)
        job.put(decoder.finish("length"))
        job.put(DONE)
        return None
    stops = StopSequences([[t] for t in sorted(decoder.eos)] or None)
    spec = make_spec(tm, req, tokens + [first], between)
    decoder.spec = spec.length if spec is not None else None
    return Started(decoder, cache, tokens, first, budget, sampler, processors, stops, key, spec)


def make_spec(tm: TextModel, req: GenerationRequest, tokens: list, between=None) -> SeqSpec | None:
    """A request's speculation state after `tokens` (its prompt and first token), or None when
    it decodes plainly (Options prompt_lookup off; Mirostat, num_draft -1; a vision or
    distributed model). With a DraftModel every request drafts with it (Mirostat: zero drafts,
    the draft still reads its tokens), its KV prefilled here; else prompt lookup. NDraft > 0
    caps the drafts per step."""
    cfg = tm.spec
    if not rewindable(tm):
        return None
    if tm.draft_model is not None:
        from mlxbackend.text.kv_quant import make_cache

        cap = req.num_draft if req.num_draft > 0 else DEFAULT_DRAFT_MODEL_TOKENS
        cache = make_cache(tm.draft_model, None, 0)
        prefill(tm.draft_model, cache, tokens, prefill_chunk(tm), between)
        length = DraftLength(0 if req.num_draft < 0 else cap, start=cap)
        return SeqSpec(None, length, req.constraint, cache)
    if not cfg.lookup or req.num_draft < 0:
        return None
    max_draft = min(cfg.max_draft, req.num_draft) if req.num_draft > 0 else cfg.max_draft
    return SeqSpec(
        NgramIndex(tokens, cfg.min_ngram, cfg.max_ngram), DraftLength(max_draft), req.constraint
    )


_MEASURED_STEP_TOKENS: dict = {}  # (weights folder, their bytes) -> measured step tokens


def step_tokens(tm: TextModel) -> int:
    """Tokens one verification pass of this model's batch may take (Options spec_step_tokens,
    else measured when a batch of two or more first speculates: once per process and weights,
    a reload of the same model reuses it)."""
    if not tm.spec.step_tokens:
        key = (str(tm.path), memory.loaded_bytes(tm.model))
        if key not in _MEASURED_STEP_TOKENS:
            _MEASURED_STEP_TOKENS[key] = measure_step_tokens(tm.model)
        tm.spec.step_tokens = _MEASURED_STEP_TOKENS[key]
    return tm.spec.step_tokens


def rewindable(tm: TextModel) -> bool:
    """Whether this model's batch KV can drop rejected drafts (plain float KV: not quantized,
    not rotating); others decode plainly, their DraftModel unused."""
    return not tm.max_kv_size and (tm.kv is None or not tm.kv.quantized)


class BatchDriver:
    """A worker stepper owning one BatchGenerator for one loaded model."""

    def __init__(self, tm: TextModel, adapter=None, on_close=None):
        from mlxbackend.text.kv_quant import rows_apart
        from mlxbackend.text.spec_batch import SpecBatchGenerator

        max_batch = int(tm.options.get("max_batch", DEFAULT_MAX_BATCH))
        self.tm = tm
        self.adapter = adapter  # every request of this batch uses this LoRA adapter (or none)
        self.on_close = on_close
        self.gen = SpecBatchGenerator(
            tm.model,
            completion_batch_size=max_batch,
            prefill_batch_size=min(8, max_batch),
            prefill_step_size=prefill_chunk(tm),
        )
        self.gen.generation.step_tokens = tm.spec.step_tokens
        self.gen.generation.calibrate = lambda: step_tokens(tm)
        self.gen.generation.draft = tm.draft_model if rewindable(tm) else None
        self.requests: dict[int, tuple[Job, Decoder]] = {}
        # a quantized KV: rows attend apart, so each reply equals its solo run (kv_quant.py)
        self.attention = rows_apart if tm.kv is not None and tm.kv.quantized else nullcontext
        self.keys: dict[int, list] = {}  # prefix-cache keys of media prompts (vision/prompt.py)

    def add(self, job: Job, started: Started):
        """Worker thread: queue a request whose first token was sent (`start`) into the batch."""
        (uid,) = self.gen.insert(
            [[started.first]],  # the batch feeds it (its KV) and reports tokens from the second on
            max_tokens=[started.budget - 1],
            caches=[started.cache],
            all_tokens=[started.tokens],
            samplers=[started.sampler],
            logits_processors=[started.processors],
            stop_sequences=[started.stops],
        )
        if started.spec is not None:
            self.gen.speculate(uid, started.spec)
        self.requests[uid] = (job, started.decoder)
        if started.key is not None:
            self.keys[uid] = started.key

    @property
    def nbytes(self) -> int:
        return self.gen.prompt_cache_nbytes

    def step(self) -> bool:
        cancelled = [uid for uid, (job, _) in self.requests.items() if job.cancelled.is_set()]
        if cancelled:
            self._remove(cancelled)
            for uid in cancelled:
                self._close(uid, "cancelled")
        if not self.requests:
            self._shutdown()
            return False
        if self.tm.switch is not None:
            self.tm.switch.active = self.adapter
        try:
            with self.attention():
                _, responses = self.gen.next()
        except Exception as exc:  # e.g. an allocation failure: fail these requests, keep serving
            for job, _ in self.requests.values():
                job.put(exc)
            self.requests.clear()
            self._shutdown()
            return False
        for r in responses:
            if r.uid not in self.requests:
                continue
            job, decoder = self.requests[r.uid]
            chunk = decoder.add(r.token, r.logprobs)
            if chunk is not None:
                job.put(chunk)
            if decoder.reason or r.finish_reason:
                if r.finish_reason is None:  # a stop string: leave the batch now
                    self._remove([r.uid])
                else:
                    key = self._key(r.uid, r.all_tokens)
                    prefix_cache.store(self.tm, key, r.prompt_cache, self.adapter)
                self._close(r.uid, r.finish_reason)
        return True

    def _remove(self, uids):
        """Take sequences out of the batch, keeping their KV for later prefixes."""
        for uid, (cache, tokens) in self.gen.remove(uids, return_prompt_caches=True).items():
            prefix_cache.store(self.tm, self._key(uid, tokens), cache, self.adapter)

    def _key(self, uid: int, tokens: list) -> list:
        return _keyed(self.keys.get(uid), tokens)

    def _close(self, uid: int, reason):
        self.keys.pop(uid, None)
        job, decoder = self.requests.pop(uid)
        job.put(decoder.finish(reason))
        job.put(DONE)

    def _shutdown(self):
        import mlx.core as mx

        self.gen.close()
        if self.on_close:
            self.on_close(self)
        mx.clear_cache()  # the batch is empty: give MLX's buffer cache back while idle

    def abort(self, exc: BaseException | None = None):
        """End every request: with exc (the host's Aborted, shutdown) or a cancelled finish."""
        for uid in list(self.requests):
            if exc is None:
                self._close(uid, "cancelled")
            else:
                job, _ = self.requests.pop(uid)
                job.put(exc)
        self.requests.clear()
        self._shutdown()


def _keyed(key: list | None, tokens: list) -> list:
    """The prefix-cache key of a sequence's tokens: media tokens stand for their content."""
    return tokens if key is None else key + list(tokens[len(key) :])
