"""One generation request as a step-wise generator: tokens → text → stop hold-back → deltas.

The engine advances it one decode step per `next()`, so cancellation is seen within a step."""

import time
from dataclasses import dataclass, field

from mlxbackend.errors import InvalidInput
from mlxbackend.text import cpu_softmax
from mlxbackend.text.chat import Prompt
from mlxbackend.text.logprobs import TokenText, entry
from mlxbackend.text.models import TextModel
from mlxbackend.text.parse import Delta, OutputParser
from mlxbackend.text.sampling import SamplingParams, make_processors, make_sampler
from mlxbackend.text.stops import StopMatcher

DEFAULT_PREFILL_CHUNK = 512
# a last prefill chunk longer than this gets its final token a forward pass of its own, so the
# vocabulary projection runs for one position instead of the whole chunk: on SmolLM2 at 3k
# tokens of history this saves ~390 ms for a 400-token chunk and costs ~28 ms for a 30-token one
HEAD_SPLIT = 48


@dataclass
class GenerationRequest:
    sampling: SamplingParams = field(default_factory=SamplingParams)
    max_tokens: int = 0  # 0 = until EOS, a stop string or the context end
    stop: list = field(default_factory=list)
    logprobs: int = 0  # > 0: report logprobs
    top_logprobs: int = 0
    num_draft: int = 0
    grammar: str = ""  # llama.cpp GBNF (or Lark), enforced while sampling
    json_schema: str = ""  # a JSON schema, enforced the same way
    constraint: object = None  # built from grammar/json_schema by the engine (text/grammar.py)
    adapter: str | None = None  # hot-swapped LoRA adapter (Metadata "lora"), None = base model
    received: float = 0.0  # perf_counter when the engine got it (TTFT overhead, Status)
    negative_prompt: str = ""  # refused when set (README "Request fields")
    rope_freq: tuple = (0.0, 0.0)  # PredictOptions RopeFreqBase/Scale: refused when set


@dataclass
class Chunk:
    """What one step produced: raw text, classified delta and logprob entries."""

    text: str = ""
    delta: Delta = field(default_factory=Delta)
    logprobs: list = field(default_factory=list)


@dataclass
class Finish:
    """The closing event, with totals."""

    chunk: Chunk
    reason: str  # "stop" | "length" | "cancelled"
    generated: int
    prompt_tokens: int
    prompt_ms: float
    generation_ms: float
    calls: list  # fully parsed tool calls
    cached: int = 0  # prompt tokens served from the prefix cache (not prefilled)
    cached_ssd: int = 0  # of those, tokens read from its SSD tier
    overhead_ms: float = 0.0  # from arrival to the first prefill step (template, queue, hops)
    drafted: int = 0  # speculative draft tokens verified (prompt lookup or DraftModel)
    accepted: int = 0  # of those, kept


class Cancelled(Exception):
    pass


def fresh_detokenizer(tokenizer):
    """A streaming detokenizer that keeps a reply's leading space (mlx-lm trims it), so that
    prompt + completion concatenates exactly, as llama.cpp returns it."""
    from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer

    detok = tokenizer.detokenizer
    if hasattr(detok, "trim_space"):
        detok.trim_space = False
    elif isinstance(detok, BPEStreamingDetokenizer):
        detok.text, detok.offset = "\0", 1  # non-empty text disables its first-token trim
    return detok


def token_budget(tm: TextModel, prompt: Prompt, max_tokens: int) -> int:
    """Tokens this request may generate; rejects prompts that do not fit the context."""
    if max_tokens < 0:
        raise InvalidInput(f"Tokens must be >= 0 (0 = no limit), got {max_tokens}")
    if tm.max_kv_size and len(prompt.tokens) > tm.max_kv_size:
        raise InvalidInput(
            f"prompt is {len(prompt.tokens)} tokens, more than the rotating KV cache holds "
            f"(Options max_kv_size {tm.max_kv_size}): its start would be dropped before it is "
            "read; shorten it or raise max_kv_size"
        )
    room = tm.context_size - len(prompt.tokens)
    if room <= 0:
        raise InvalidInput(
            f"prompt is {len(prompt.tokens)} tokens, which does not fit the context size "
            f"{tm.context_size}; shorten it or raise ContextSize"
        )
    return min(max_tokens, room) if max_tokens else room


def refuse_unhonoured(tm: TextModel, req: GenerationRequest) -> None:
    """Request fields this backend cannot honour are refused when set to values that would
    change the reply (README "Request fields"), never silently dropped."""
    if req.negative_prompt:
        raise InvalidInput(
            "NegativePrompt (classifier-free guidance for text generation) is not supported by "
            "this backend; leave it empty"
        )
    if any(req.rope_freq):
        raise InvalidInput(
            f"RopeFreqBase={req.rope_freq[0]} / RopeFreqScale={req.rope_freq[1]} per request: "
            "RoPE comes from the model's config.json here; leave them 0"
        )
    if tm.grammar_triggers and (req.grammar or req.json_schema):
        raise InvalidInput(
            f"GrammarTriggers {list(tm.grammar_triggers)!r} (a lazy grammar started by a "
            "trigger word) are not supported: this backend enforces Grammar from the first "
            "token; load the model without grammar triggers"
        )
    if req.sampling.mirostat:
        req.num_draft = -1  # Mirostat's mu moves token by token: never speculative


def sampling_for(tm: TextModel, req: GenerationRequest):
    """This request's sampler (own RNG key) and logits processors (penalties, bias, grammar)."""
    vocab = tm.model.args.vocab_size if hasattr(tm.model, "args") else len(tm.tokenizer)
    return (
        make_sampler(
            req.sampling,
            vocab,
            xtc_special_ids(tm.tokenizer) if req.sampling.xtc_probability > 0 else (),
        ),
        make_processors(req.sampling, vocab, tm.tokenizer.eos_token_ids, req.constraint),
    )


def xtc_special_ids(tokenizer) -> list:
    """Tokens XTC never drops: EOS and newline, as mlx-lm's server and LocalAI's mlx pass."""
    return sorted(
        set(tokenizer.eos_token_ids) | set(tokenizer.encode("\n", add_special_tokens=False))
    )


def _steps(tm: TextModel, prompt: Prompt, req: GenerationRequest, budget: int, cache, is_cancelled):
    sampler, processors = sampling_for(tm, req)

    def check():
        if is_cancelled():
            raise Cancelled

    fused = _after_first(tm, prompt.tokens, budget, sampler, processors, cache, check)
    return _with_adapter(tm, req.adapter, fused)


def _after_first(tm: TextModel, tokens: list, budget: int, sampler, processors, cache, between):
    """The first token sampled as the batch samples it (`first_token`: the solo and batched
    paths compute the same numbers), then mlx-lm's generate_step from it, its processors
    seeing the prompt before their own context as they do in the batch."""
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    chunk = prefill_chunk(tm)
    first, logprobs = first_token(
        tm.model, cache, tokens, len(tokens), sampler, processors, chunk, between
    )
    yield first, logprobs
    if budget > 1:
        prefix = mx.array(tokens, dtype=mx.int32)
        yield from generate_step(
            mx.array([first]),
            tm.model,
            max_tokens=budget - 1,
            sampler=sampler,
            logits_processors=[_after_prompt(p, prefix) for p in processors],
            prompt_cache=cache,
        )


def _after_prompt(processor, prefix):
    import mlx.core as mx

    return lambda context, logits: processor(
        mx.concatenate([prefix, context.astype(mx.int32)]), logits
    )


def prefill_chunk(tm: TextModel) -> int:
    """Tokens per prefill forward pass (Options prefill_chunk)."""
    return int(tm.options.get("prefill_chunk", DEFAULT_PREFILL_CHUNK))


def _with_adapter(tm: TextModel, adapter, steps):
    """Activate this request's LoRA adapter before each step (others may run in between)."""
    while True:
        if tm.switch is not None:
            tm.switch.active = adapter
        try:
            item = next(steps)
        except StopIteration:
            return
        yield item


class Decoder:
    """Per-request output state shared by the solo and batched paths: token → detokenized text →
    stop hold-back → classified deltas (+ logprobs). Timings start at construction."""

    def __init__(self, tm: TextModel, prompt: Prompt, req: GenerationRequest):
        tokenizer = tm.tokenizer
        self.prompt_tokens = len(prompt.tokens)
        self.eos = set() if req.sampling.ignore_eos else tokenizer.eos_token_ids
        self.detok = fresh_detokenizer(tokenizer)
        self.stopper = StopMatcher(req.stop)
        self.parser = OutputParser(tokenizer, prompt.tools, prompt.starts_in_reasoning)
        self.token_text = TokenText(tokenizer) if req.logprobs > 0 else None
        self.top_logprobs = req.top_logprobs
        self.start = time.perf_counter()
        self.received = req.received
        self.prefill_at = None  # when its first forward pass starts
        self.first_at = None
        self.generated = 0
        self.cached_tokens = 0
        self.ssd_tokens = 0  # of cached_tokens, read from the SSD tier
        self.reason = None  # set once the request is over
        self.spec = None  # its speculation counters (drafted, accepted), if it speculates
        self.pending = Chunk()
        if prompt.assistant_prefix:
            self._text(prompt.assistant_prefix)

    def _text(self, text: str):
        text = self.stopper.feed(text)
        if text:
            self.pending.text += text
            self.pending.delta.extend(self.parser.feed(text))

    def add(self, token: int, logprobs) -> Chunk | None:
        """Consume one sampled token; returns a Chunk when there is something to send."""
        if self.first_at is None:
            self.first_at = time.perf_counter()
        if token in self.eos:
            self.reason = "stop"
            return None
        self.generated += 1
        if self.token_text is not None:
            self.pending.logprobs.append(entry(self.token_text, token, logprobs, self.top_logprobs))
        self.detok.add_token(token)
        self._text(self.detok.last_segment)
        if self.stopper.stopped:
            self.reason = "stop"
            return None
        if self.pending.text or self.pending.delta:
            chunk, self.pending = self.pending, Chunk()
            return chunk
        return None

    def finish(self, reason: str | None = None) -> Finish:
        """Flush what was held back and close with totals."""
        reason = self.reason or reason or "length"
        now = time.perf_counter()
        first_at = self.first_at or now
        if not self.stopper.stopped:
            self.detok.finalize()
            self._text(self.detok.last_segment)
            text = self.stopper.flush()
            self.pending.text += text
            self.pending.delta.extend(self.parser.feed(text))
        self.pending.delta.extend(self.parser.finish())
        return Finish(
            chunk=self.pending,
            reason=reason,
            generated=self.generated,
            prompt_tokens=self.prompt_tokens,
            prompt_ms=(first_at - self.start) * 1000,
            generation_ms=(now - first_at) * 1000,
            calls=self.parser.calls,
            cached=self.cached_tokens,
            cached_ssd=self.ssd_tokens,
            drafted=self.spec.drafted if self.spec is not None else 0,
            accepted=self.spec.accepted if self.spec is not None else 0,
            overhead_ms=(self.prefill_at - self.received) * 1000
            if self.received and self.prefill_at
            else 0.0,
        )


def run(tm: TextModel, prompt: Prompt, req: GenerationRequest, is_cancelled, on_cache=None):
    """Solo path (a distributed model, distributed/rank0.py): yield Chunks, then one Finish."""
    from mlxbackend.text.kv_quant import make_cache

    budget = token_budget(tm, prompt, req.max_tokens)
    cache = make_cache(tm.model, tm.kv, tm.max_kv_size)
    if on_cache:
        on_cache(cache)
    decoder = Decoder(tm, prompt, req)
    decoder.prefill_at = time.perf_counter()
    reason = None
    try:
        for token, logprobs in _steps(tm, prompt, req, budget, cache, is_cancelled):
            if is_cancelled():
                reason = "cancelled"
                break
            chunk = decoder.add(token, logprobs)
            if chunk is not None:
                yield chunk
            if decoder.reason:
                break
    except Cancelled:
        reason = "cancelled"
    yield decoder.finish(reason)


def first_token(model, cache, tokens, n_new, sampler, processors, chunk, between=None):
    """Prefill the last `n_new` of `tokens` into `cache` in chunks and sample the first reply
    token from the last position's logits, as a batch decode step would (processors see every
    prompt token, the sampler the normalized log-probabilities). mlx-lm's batch prefills all
    but the last token and feeds that one in a decode step of its own: one forward pass more
    and two batch steps before the first token. A last chunk longer than HEAD_SPLIT is split
    as mlx-lm splits it: its final token is fed alone."""
    import mlx.core as mx

    new = tokens[len(tokens) - n_new :]
    last = (len(new) - 1) // chunk * chunk  # the last chunk starts here, as in `prefill`
    if len(new) - last > HEAD_SPLIT:
        last = len(new) - 1
    prefill(model, cache, new[:last], chunk, between)
    with cpu_softmax.scope(model):
        logits = model(mx.array(new[last:])[None], cache=cache)[:, -1, :]
    if processors:
        context = mx.array(tokens, dtype=mx.int32)
        for processor in processors:
            logits = processor(context, logits)
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    token = sampler(logprobs)
    mx.eval(token, logprobs, [c.state for c in cache])
    return token.item(), logprobs[0]


def prefill(model, cache, tokens: list, chunk: int, between=None) -> None:
    """Feed `tokens` into `cache` in chunks of `chunk`, evaluating each and calling `between()`
    after it (a pause, a cancellation check)."""
    import mlx.core as mx

    for start in range(0, len(tokens), chunk):
        with cpu_softmax.scope(model):
            model(mx.array(tokens[start : start + chunk])[None], cache=cache)
        mx.eval([c.state for c in cache])
        mx.clear_cache()
        if between is not None:
            between()
