"""Text capability: the loaded model, and requests run on the shared MLX worker."""

import asyncio
import gc
import logging
import time
from dataclasses import dataclass, field

from mlxbackend.errors import (
    Aborted,
    Cancelled,
    EmptyOutput,
    InvalidInput,
    NotLoaded,
    OutOfMemory,
    Overloaded,
)
from mlxbackend.options import number_option
from mlxbackend.text import batch, chat, cpu_softmax, memory, prefix_cache, warm
from mlxbackend.text.batch import BatchDriver
from mlxbackend.text.generate import (
    Finish,
    GenerationRequest,
    refuse_unhonoured,
    run,
    token_budget,
)
from mlxbackend.text.models import LoadSpec, TextModel, load_text_model
from mlxbackend.text.parse import Delta
from mlxbackend.text.sampling import validate, with_option_defaults
from mlxbackend.text.tool_formats import format_for
from mlxbackend.vision import prompt as vision_prompt
from mlxbackend.worker import Job, Worker, pause

log = logging.getLogger("mlxbackend.text")
DEFAULT_MAX_QUEUE = 1024
# Status counters of finished requests since start: prompt tokens served from the prefix cache
# in RAM, from its SSD tier and computed, and how many requests had a hit
SERVED_COUNTERS = (
    "requests_finished",
    "prompt_tokens_total",
    "prompt_tokens_from_ram",
    "prompt_tokens_from_ssd",
    "prompt_tokens_computed",
    "prompt_cache_hits",
    "request_to_prefill_us_total",
    "spec_drafted_tokens",
    "spec_accepted_tokens",
)


@dataclass
class Completion:
    """A finished non-streaming request."""

    text: str
    delta: Delta
    finish: Finish
    logprobs: list = field(default_factory=list)


@dataclass
class Metrics:
    tokens_per_second: float = 0.0
    tokens_generated: int = 0
    prompt_tokens: int = 0
    drafted: int = 0  # speculative drafts verified for the last request
    accepted: int = 0  # of those, kept


class TextEngine:
    def __init__(self, worker: Worker, why_absent=lambda: ""):
        self.worker = worker
        self.current: TextModel | None = None
        self.why_absent = (
            why_absent  # () -> why there is no text model (the host knows what is loaded)
        )
        self.jobs: set[Job] = set()  # requests in flight (event-loop side), ended by free()
        self.caches: dict[int, list] = {}  # live KV of solo requests and prefills, for Status
        self.drivers: dict[tuple, BatchDriver] = {}  # continuous batches by (model, adapter)
        self.last = Metrics()
        self.served = dict.fromkeys(SERVED_COUNTERS, 0)  # since start (Status)
        self.last_overhead_us = 0  # the last request's arrival → first prefill step
        self.inflight = 0  # admitted requests (event-loop side)
        self.kv_reserved = 0  # worst-case KV bytes those requests may use

    # -- lifecycle (called by the host only) ----------------------------------------------------
    async def load(self, spec: LoadSpec) -> TextModel:
        sources = await asyncio.to_thread(warm.warm_sources, spec.options, spec.model_path)
        tm = await self.worker.run(load_text_model, spec)
        await self.worker.run(memory.apply_cache_limit, tm.options)  # Options mlx_cache_bytes
        await self.worker.run(memory.apply_wired_limit, tm.options)  # Options wired_limit_bytes
        cpu_softmax.enable(tm.model, tm.options)  # Options cpu_softmax
        await self.worker.run(prefix_cache.cache_for, tm)  # RAM and SSD tiers, saved entries
        if sources:  # Options warm_prompt[.name]: into the prefix cache before the first request
            tm.warmed = await self.worker.run(warm.prefill_all, tm, sources)
        # the vocabulary scan behind the length check, done here rather than on the event loop
        # at the first request
        await asyncio.to_thread(chat.longest_token, tm.tokenizer)
        self.current = tm
        return tm

    def install(self, tm: TextModel):
        """Serve a model loaded elsewhere (a distributed group's rank-0 shard)."""
        self.current = tm

    async def persist(self):
        """Save the prefix cache to Options prompt_cache_dir, if set (Free, shutdown)."""
        await self.worker.run(prefix_cache.persist, self.current)

    async def free(self, reason: str = "the model was freed"):
        """End every request in flight (ABORTED now; their worker tasks stop at once), save the
        prefix cache, drop the model and return its memory."""
        aborted = Aborted(f"generation aborted: {reason}")
        for job in list(self.jobs):
            job.abort(aborted)
        if self.current is None:
            return

        def drop():
            import mlx.core as mx

            self.worker.abort_owned(self.current, aborted)
            try:
                prefix_cache.persist(self.current)
            except Exception as exc:  # noqa: BLE001 — Free must free whatever the disk says
                log.warning("prompt cache not saved: %s", exc)
            self.current = None
            gc.collect()
            mx.clear_cache()

        await self.worker.run(drop)

    def model(self) -> TextModel:
        if self.current is None:
            why = self.why_absent()
            raise NotLoaded(why) if why else NotLoaded()
        return self.current

    # -- requests ----------------------------------------------------------------------------
    async def prepare(self, spec: chat.PromptSpec, req: GenerationRequest):
        """Validate and render off the event loop (tokenizers are thread-safe)."""
        req.received = time.perf_counter()
        tm = self.model()
        with_option_defaults(req.sampling, tm.options)
        if not req.max_tokens:
            req.max_tokens = number_option(tm.options, "max_tokens", int, low=0, default=0)
        validate(req.sampling)
        refuse_unhonoured(tm, req)
        chat.check_length(tm.tokenizer, spec, tm.context_size)
        if spec.media:
            prompt = await self.media_prompt(tm, spec)
        else:
            prompt = await asyncio.to_thread(chat.render, tm.tokenizer, spec, tm.options)
        token_budget(tm, prompt, req.max_tokens)
        if tm.switch is not None or spec.metadata.get("lora"):
            from mlxbackend.text.adapters import requested

            req.adapter = requested(spec.metadata, tm.switch, tm.adapter_names)
        schema = req.json_schema or str(tm.options.get("json_schema", ""))
        if req.grammar or schema:
            from mlxbackend.text.grammar import make_constraint

            req.constraint = await asyncio.to_thread(
                make_constraint, tm.tokenizer, req.grammar, "" if req.grammar else schema
            )
            req.sampling.ignore_eos = False  # a complete grammar allows only EOS: it must end
        return tm, prompt

    async def media_prompt(self, tm: TextModel, spec: chat.PromptSpec) -> chat.Prompt:
        """A prompt with images / video / audio: decoded and placed off the event loop, then
        expanded by the model's processor on the worker (vision/prompt.py)."""
        if tm.vision is None:
            raise InvalidInput(
                f"model {tm.path.name} takes no image, video or audio input (this request has "
                f"{spec.media.describe()}); load a vision-language model for media"
            )
        decoded = await asyncio.to_thread(
            vision_prompt.decode, tm.vision, spec.media, tm.options, tm.path.name
        )
        prompt = await asyncio.to_thread(
            vision_prompt.render, tm.tokenizer, tm.vision, spec, decoded, tm.options
        )
        return await self.worker.run(vision_prompt.expand, tm.vision, prompt, decoded)

    def admit(self, tm, prompt, req) -> int:
        """Bounded admission. Requests in flight: Options max_queue (default 1024, LocalAI's
        own cap). Memory: each request reserves its worst-case KV (prompt + token budget)
        against the model's KV budget, so one that cannot fit is refused on its own
        (RESOURCE_EXHAUSTED) instead of an allocation failure hitting the whole batch.
        Returns the bytes reserved; `release` gives them back."""
        limit = int(tm.options.get("max_queue", DEFAULT_MAX_QUEUE))
        if self.inflight >= limit:
            raise Overloaded(
                f"too many requests in flight ({self.inflight}, max_queue {limit}); retry later"
            )
        tokens = len(prompt.tokens) + token_budget(tm, prompt, req.max_tokens)
        if tm.max_kv_size:
            tokens = min(tokens, tm.max_kv_size)  # a rotating cache never holds more
        need = memory.kv_bytes(tm.config, tokens, memory.dtype_bytes(tm.config), tm.kv)
        if tm.kv_budget and self.kv_reserved + need > tm.kv_budget:
            raise OutOfMemory(
                f"not enough memory for this request: its KV cache may need {need / 2**20:.0f} MiB "
                f"({tokens} tokens), {self.kv_reserved / 2**20:.0f} of {tm.kv_budget / 2**20:.0f} MiB "
                f"are reserved by running requests; lower Tokens or retry later"
            )
        self.inflight += 1
        self.kv_reserved += need
        return need

    def release(self, reserved: int):
        self.inflight -= 1
        self.kv_reserved -= reserved

    def start(self, tm, prompt, req: GenerationRequest):
        """Start a generation; iterate the returned job for Chunk events and one Finish.

        Requests join the model's continuous batch, which speculates (prompt lookup or the
        DraftModel, text/spec_batch.py) for one request as for many."""
        if getattr(tm.model, "solo_only", False):  # a distributed model (distributed/rank0.py)
            return self._start_solo(tm, prompt, req)
        job = Job(asyncio.get_running_loop())

        def attach():
            try:
                ready = None
                if prompt.media is not None:  # images / video / audio: prefilled, then joins
                    from mlxbackend.vision.prefill import prefill

                    ready = prefill(tm, prompt, req.adapter, lambda: _between_chunks(job))
                started = batch.start(
                    tm,
                    job,
                    prompt,
                    req,
                    ready,
                    lambda: _between_chunks(job),
                    lambda cache: self.caches.__setitem__(id(job), cache),
                )
                if started is None:  # it ended at its first token
                    return
                key = (id(tm), req.adapter)  # one continuous batch per model and LoRA adapter
                driver = self.drivers.get(key)
                if driver is None:
                    driver = BatchDriver(
                        tm, req.adapter, on_close=lambda d: self.drivers.pop(key, None)
                    )
                    self.drivers[key] = driver
                    self.worker.add(driver, owner=tm)
                driver.add(job, started)
            except BaseException as exc:
                job.put(exc)
            finally:
                self.caches.pop(id(job), None)  # in the batch now, counted there

        self.worker.call_owned(tm, attach)  # Free / LoadModel abort it at a prefill pause
        return job

    def _start_solo(self, tm, prompt, req: GenerationRequest):
        def steps(is_cancelled):
            key = id(prompt)
            try:
                yield from run(
                    tm, prompt, req, is_cancelled, lambda c: self.caches.__setitem__(key, c)
                )
            finally:
                self.caches.pop(key, None)

        return self.worker.start_job(steps, owner=tm)

    def record(self, finish: Finish):
        secs = finish.generation_ms / 1000
        self.served["prompt_tokens_total"] += finish.prompt_tokens
        self.served["prompt_tokens_from_ram"] += finish.cached - finish.cached_ssd
        self.served["prompt_tokens_from_ssd"] += finish.cached_ssd
        self.served["prompt_tokens_computed"] += finish.prompt_tokens - finish.cached
        self.served["prompt_cache_hits"] += 1 if finish.cached else 0
        self.served["requests_finished"] += 1
        self.served["request_to_prefill_us_total"] += int(finish.overhead_ms * 1000)
        self.served["spec_drafted_tokens"] += finish.drafted
        self.served["spec_accepted_tokens"] += finish.accepted
        self.last_overhead_us = int(finish.overhead_ms * 1000)
        self.last = Metrics(
            tokens_per_second=(finish.generated - 1) / secs
            if secs > 0 and finish.generated > 1
            else 0.0,
            tokens_generated=finish.generated,
            prompt_tokens=finish.prompt_tokens - finish.cached,  # actually prefilled
            drafted=finish.drafted,
            accepted=finish.accepted,
        )

    async def complete(self, spec: chat.PromptSpec, req: GenerationRequest) -> Completion:
        tm, prompt = await self.prepare(spec, req)
        reserved = self.admit(tm, prompt, req)
        job = self.start(tm, prompt, req)
        self.jobs.add(job)
        text, delta, logprobs = [], Delta(), []
        try:
            async for event in job:
                chunk = event.chunk if isinstance(event, Finish) else event
                text.append(chunk.text)
                delta.extend(chunk.delta)
                logprobs.extend(chunk.logprobs)
                if isinstance(event, Finish):
                    finish = event
        finally:
            job.cancel()
            self.jobs.discard(job)
            self.release(reserved)
        self.record(finish)
        full = "".join(text)
        # one delta with the final content, reasoning and every fully parsed tool call
        merged = Delta(delta.content, delta.reasoning, list(finish.calls))
        if not full.strip() and not merged.tool_calls and not _hit_cap(req, finish):
            raise EmptyOutput(
                f"the model produced no text ({finish.generated} tokens, finish: {finish.reason})"
            )
        return Completion(full, merged, finish, logprobs)

    async def stream(self, spec: chat.PromptSpec, req: GenerationRequest):
        tm, prompt = await self.prepare(spec, req)
        reserved = self.admit(tm, prompt, req)
        job = self.start(tm, prompt, req)
        self.jobs.add(job)
        sent = False
        try:
            async for event in job:
                if isinstance(event, Finish):
                    self.record(event)
                    chunk = event.chunk
                    if (
                        not sent
                        and not chunk.text.strip()
                        and not chunk.delta
                        and not _hit_cap(req, event)
                    ):
                        raise EmptyOutput(
                            f"the model produced no text ({event.generated} tokens, finish: {event.reason})"
                        )
                else:
                    sent = sent or bool(event.text.strip() or event.delta)
                yield event
        finally:
            job.cancel()
            self.jobs.discard(job)
            self.release(reserved)

    async def tokenize(self, spec: chat.PromptSpec) -> list:
        tm = self.model()
        prompt = await asyncio.to_thread(chat.render, tm.tokenizer, spec, tm.options)
        return prompt.tokens

    # -- introspection -----------------------------------------------------------------------
    def memory(self) -> dict:
        """Bytes: weights, KV caches of running requests, other MLX memory."""
        import mlx.core as mx

        weights = 0
        if self.current is not None:
            weights = memory.loaded_bytes(self.current.model)
            if self.current.draft_model is not None:
                weights += memory.loaded_bytes(self.current.draft_model)
        kv = 0
        for driver in list(self.drivers.values()):
            try:
                kv += driver.nbytes
            except Exception:  # read while the worker mutates it: an estimate is fine
                pass
        for cache in list(self.caches.values()):
            for c in cache:
                try:
                    kv += c.nbytes
                except Exception:
                    pass
        cached = prefix_cache.nbytes(self.current)
        vision = self.current.vision if self.current is not None else None
        features = vision.features.nbytes if vision is not None and vision.features else 0
        mlx_cache = mx.get_cache_memory()
        other = max(mx.get_active_memory() - weights - kv - cached - features, 0)
        usage = {
            "weights": weights,
            "kv_cache": kv,
            "prompt_cache": cached,
            "vision_cache": features,
            "mlx_cache": mlx_cache,
            "other": other,
        }
        return {**usage, **self.budgets()}

    def budgets(self) -> dict:
        """Status's budget and occupancy keys (not bytes in use: `usage_total` leaves them out).

        Each memory part is bounded by an Options budget: `kv_budget` (max_kv_bytes) for the KV of
        running requests, which reserve their worst case (`kv_reserved`); `prompt_cache_budget`
        (prompt_cache_bytes) and `prompt_cache_max_entries` (prompt_cache_entries) for the prefix
        cache; `mlx_cache_limit` (mlx_cache_bytes) for MLX's buffer cache; `wired_limit`
        (wired_limit_bytes) for the memory Metal keeps wired (0 without Metal, `metal` 0).
        The model's shape of KV: `context_size`, `max_kv_size` (0 = not rotating),
        `kv_key_bits` / `kv_value_bits` (0 = the model's float KV), `kv_window` (positions a quantized
        KV also keeps in float), `warm_prompt_tokens`; the
        SERVED_COUNTERS since start, `prompt_cache_hit_permille` and `request_to_prefill_us_last`
        (arrival at the engine → first prefill step: templating, admission, the worker hop); with Options
        prompt_cache_dir, the SSD tier's `prompt_cache_ssd_bytes` / `_budget` / `_blocks` /
        `_queued` / `_writes` / `_evictions`, and `prompt_cache_ssd_off.<reason>` (1) while it is off. `requests_in_flight`, `batch_slots` (sequences in
        continuous batches and solo runs) and `kv_reserved` are 0 once every request has ended;
        `process_rss` is the whole process, as the OS counts it."""
        import mlx.core as mx

        tm = self.current
        slots = len(self.caches)
        for driver in list(self.drivers.values()):
            slots += len(driver.requests)
        lru = tm.prompt_cache if tm is not None else None
        options = tm.options if tm is not None else {}
        return {
            "requests_in_flight": self.inflight, "kv_reserved": self.kv_reserved, "batch_slots": slots,
            "kv_budget": tm.kv_budget if tm is not None else 0,
            "prompt_cache_entries": len(lru) if lru is not None else 0,
            "prompt_cache_max_entries": prefix_cache.max_entries(options),
            "prompt_cache_budget": int(options.get("prompt_cache_bytes", prefix_cache.DEFAULT_BYTES)),
            "mlx_cache_limit": memory.mlx_cache_limit(), "mlx_peak": mx.get_peak_memory(),
            "wired_limit": memory.wired_limit(), "metal": int(memory.metal()),
            "context_size": tm.context_size if tm is not None else 0,
            "warm_prompt_tokens": tm.warmed.tokens if tm is not None and tm.warmed else 0,
            **self.served,
            "request_to_prefill_us_last": self.last_overhead_us,
            "prompt_cache_hit_permille": 1000 * self.served["prompt_cache_hits"] // max(self.served["requests_finished"], 1),
            **prefix_cache.status(tm),
            "max_kv_size": tm.max_kv_size if tm is not None else 0,
            "spec_step_tokens": tm.spec.step_tokens if tm is not None else 0,
            "kv_key_bits": (tm.kv.key_bits or 0) if tm is not None and tm.kv else 0,
            "kv_value_bits": (tm.kv.value_bits or 0) if tm is not None and tm.kv else 0,
            "kv_window": tm.kv.recent_tokens() if tm is not None and tm.kv else 0,
            "process_rss": memory.process_rss(),
            **(tm.vision.status() if tm is not None and tm.vision is not None else {}),
        }  # fmt: skip

    def metadata(self) -> dict:
        tm = self.model()
        tok = tm.tokenizer
        rendered = ""
        if getattr(tok, "has_chat_template", False):
            try:
                rendered = tok.apply_chat_template(
                    [{"role": "user", "content": "{{prompt}}"}],
                    add_generation_prompt=True,
                    tokenize=False,
                    enable_thinking=True,
                )
            except Exception:
                rendered = ""
        fmt = format_for(tok)  # the markers the reply parser uses (text/tool_formats.py)
        return {
            "supports_thinking": fmt.think is not None,
            "rendered_template": rendered,
            "think": fmt.think,
            "tool": (fmt.tool_starts[0], fmt.tool_end) if fmt.tool_starts else None,
            "tool_parser": fmt.name if fmt.tool_starts else "",
            # where a Go-templated prompt puts each image / video / audio (vision/prompt.py)
            "media_marker": vision_prompt.MARKER if tm.vision and tm.vision.accepts else "",
        }


# Status breakdown keys that are bytes in use (the others are budgets and counts).
USAGE_KEYS = ("weights", "kv_cache", "prompt_cache", "vision_cache", "mlx_cache", "other")


def usage_total(breakdown: dict) -> int:
    """Status `total`: the bytes in use of a `TextEngine.memory()` breakdown."""
    return sum(breakdown.get(k, 0) for k in USAGE_KEYS)


def _between_chunks(job: Job) -> None:
    """Between two prefill chunks of a media prompt: let the batch and other calls run, and stop
    if the request was cancelled meanwhile."""
    pause()
    if job.cancelled.is_set():
        raise Cancelled("request cancelled during prefill")


def _hit_cap(req: GenerationRequest, finish: Finish) -> bool:
    return req.max_tokens > 0 and finish.generated >= req.max_tokens
