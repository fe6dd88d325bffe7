"""Embedding and rerank requests on the shared MLX worker.

The model is an encoder loaded here (BERT family, `bert.py`) or, when none is, the decoder LLM
the host's text engine holds (`decoder.py`, read through the `decoder` function the host gives). Embedding requests that arrive while the worker is busy
wait in `pending` and the next flush runs them all as one padded batch, so concurrent callers
(LocalAI sends one RPC per input string) share forward passes."""

import asyncio
import threading
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from mlxbackend.errors import Aborted, Cancelled, InvalidInput, NotLoaded
from mlxbackend.text.chat import char_budget
from mlxbackend.text.memory import loaded_bytes
from mlxbackend.worker import Worker, pause

MAX_FLUSH = 256  # requests per flush; the rest wait for the next one


@dataclass
class EmbedSettings:
    """LoadModel options for embeddings and reranking (all optional)."""

    pooling: str = (
        ""  # last | mean | cls | max; "" = the model's own (encoder files) or last (decoder)
    )
    normalize: bool | None = None  # None = the model's own (encoder files) or True (decoder)
    max_tokens: int = 0  # truncate inputs to this many tokens; 0 = the model's limit
    rerank_instruction: str = ""  # the <Instruct> line of LLM reranking

    @classmethod
    def from_options(cls, options: dict) -> "EmbedSettings":
        pooling = str(options.get("pooling", "")).strip().lower()
        if pooling and pooling not in ("last", "mean", "cls", "max"):
            raise InvalidInput(f"option pooling:{pooling} is not one of last, mean, cls, max")
        normalize = options.get("normalize")
        if normalize is not None and not isinstance(normalize, bool):
            raise InvalidInput(f"option normalize:{normalize} must be true or false")
        max_tokens = options.get("embedding_max_tokens", 0)
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 0:
            raise InvalidInput(
                f"option embedding_max_tokens:{max_tokens} must be a non-negative integer"
            )
        return cls(pooling, normalize, max_tokens, str(options.get("rerank_instruction", "")))


@dataclass
class Ranked:
    index: int
    text: str
    score: float


@dataclass
class Reranking:
    results: list  # Ranked, best first, truncated to top_n
    tokens: int  # tokens the model processed


@dataclass
class Pending:
    text: str
    tokens: list
    future: Future = field(default_factory=Future)


class EmbedEngine:
    def __init__(self, worker: Worker, decoder=lambda: None):
        self.worker = worker
        self.decoder = decoder  # () -> the loaded TextModel or None: it serves decoder embeddings
        self.encoder = None  # bert.Encoder
        self.settings = EmbedSettings()
        self.pending: list = []
        self.lock = threading.Lock()
        self.flush_queued = False
        self.batch_sizes: deque = deque(maxlen=64)  # requests per flush, newest last

    # -- lifecycle (called by the host only) ----------------------------------------------------
    async def load_encoder(self, path, options: dict):
        from mlxbackend.embed.bert import load_encoder

        settings = EmbedSettings.from_options(options)
        enc = await self.worker.run(
            load_encoder,
            path,
            pooling=settings.pooling or None,
            normalize=settings.normalize,
            max_length=settings.max_tokens or None,
        )
        self.encoder, self.settings = enc, settings
        return enc

    def configure(self, options: dict):
        """Settings for a decoder LLM loaded by the text engine."""
        self.settings = EmbedSettings.from_options(options)

    async def free(self, reason: str = "the model was freed"):
        """Fail requests still waiting for a batch (ABORTED), then drop the encoder. A batch
        already on the worker finishes first (one forward pass)."""
        with self.lock:
            waiting, self.pending = self.pending, []
        for item in waiting:
            if item.future.set_running_or_notify_cancel():
                item.future.set_exception(Aborted(f"embedding aborted: {reason}"))
        if self.encoder is None:
            return

        def drop():
            import gc

            import mlx.core as mx

            self.worker.abort_owned(self.encoder, Aborted(f"reranking aborted: {reason}"))
            self.encoder = None
            gc.collect()
            mx.clear_cache()

        await self.worker.run(drop)

    def memory(self) -> dict:
        """Bytes held by the encoder's weights (a decoder's are in the text engine's figures)."""
        if self.encoder is None:
            return {}
        return {"weights": loaded_bytes(self.encoder.model)}

    def source(self):
        """("encoder", Encoder) or ("decoder", TextModel)."""
        if self.encoder is not None:
            return "encoder", self.encoder
        decoder = self.decoder()
        if decoder is not None:
            return "decoder", decoder
        raise NotLoaded(
            "no model loaded: call LoadModel with an embedding model (embeddings: true) first"
        )

    # -- embeddings --------------------------------------------------------------------------
    async def embed(self, text: str, tokens=()) -> tuple:
        """One pooled float32 vector for a text (or token ids), and its token count."""
        self.source()
        if not text and not tokens:
            raise InvalidInput(
                "Embedding needs text in PredictOptions.Embeddings (or Prompt), or EmbeddingTokens"
            )
        item = Pending(text, list(tokens))
        with self.lock:
            self.pending.append(item)
            queue = not self.flush_queued
            self.flush_queued = True
        if queue:
            self.worker.call(self._flush)
        return await asyncio.wrap_future(item.future)

    def _flush(self):
        """Worker: run every waiting request as one batch (up to MAX_FLUSH)."""
        with self.lock:
            items, self.pending = self.pending[:MAX_FLUSH], self.pending[MAX_FLUSH:]
            self.flush_queued = bool(self.pending)
        if self.pending:
            self.worker.call(self._flush)
        items = [i for i in items if i.future.set_running_or_notify_cancel()]
        if not items:
            return
        self.batch_sizes.append(len(items))
        try:
            vectors, counts = self._embed_now(items)
        except BaseException as exc:
            for item in items:
                item.future.set_exception(exc)
            return
        for item, vector, count in zip(items, vectors, counts, strict=True):
            item.future.set_result((vector, count))

    def _embed_now(self, items: list):
        kind, model = self.source()
        return embed_inputs(kind, model, self.settings, [i.tokens or i.text for i in items])

    # -- rerank ------------------------------------------------------------------------------
    async def rerank(self, query: str, documents: list, top_n: int = 0) -> Reranking:
        """Relevance of each document to the query, best first; top_n 0 = all."""
        self.source()
        if not query.strip():
            raise InvalidInput("Rerank needs a non-empty query")
        if not documents:
            raise InvalidInput("Rerank needs at least one document")
        if top_n < 0:
            raise InvalidInput(f"top_n must be ≥ 0 (0 = all documents), got {top_n}")
        kind, model = self.source()
        scores, tokens = await self.worker.run_cancellable(
            model, rerank_scores, kind, model, self.settings, query, list(documents)
        )
        order = sorted(range(len(documents)), key=lambda i: -float(scores[i]))
        keep = order[: top_n or len(order)]
        return Reranking([Ranked(i, documents[i], float(scores[i])) for i in keep], int(tokens))


def limit_of(settings: EmbedSettings, context: int) -> int:
    """Most tokens one input may have (the option, else the context size); 0 = no limit."""
    limits = [x for x in (settings.max_tokens, context) if x > 0]
    return min(limits) if limits else 0


def embed_inputs(kind: str, model, settings: EmbedSettings, inputs: list) -> tuple:
    """MLX thread: float32 vectors [N, D] and token counts for texts or token-id lists.
    Inputs over the limit keep their first tokens (as sentence-transformers does)."""
    if kind == "encoder":
        from mlxbackend.embed import bert

        return bert.embed(model, inputs)
    from mlxbackend.embed import decoder

    limit = limit_of(settings, model.context_size)
    token_lists = []
    for x in inputs:
        if (
            isinstance(x, str) and limit
        ):  # only the first `limit` tokens are kept: do not tokenize 45 MB
            x = x[: char_budget(model.tokenizer, limit)]
        tokens = [int(t) for t in x] if not isinstance(x, str) else model.tokenizer.encode(x)
        if not tokens:
            raise InvalidInput("the text encodes to no tokens")
        vocab = model.config.get("vocab_size") or 0
        if vocab and not 0 <= min(tokens) <= max(tokens) < vocab:
            raise InvalidInput(f"token ids must lie in [0, {vocab})")
        token_lists.append(tokens[:limit] if limit else tokens)
    pooling, normalize = settings.pooling or "last", settings.normalize is not False
    return decoder.embed_tokens(model.model, token_lists, pooling, normalize), [
        len(t) for t in token_lists
    ]


def rerank_scores(
    kind: str, model, settings: EmbedSettings, query: str, documents: list, is_cancelled=None
) -> tuple:
    """MLX thread: relevance scores float32 [N] and the tokens processed. A cross-encoder scores
    (query, document) pairs; an encoder without a classifier head ranks by cosine similarity;
    a decoder LLM answers yes/no (Qwen3-Reranker style). Before each forward pass the worker
    task pauses, and stops once `is_cancelled()` is True."""

    def between_batches():
        if is_cancelled is not None and is_cancelled():
            raise Cancelled("reranking cancelled")
        pause()  # one forward pass is one step of the worker task

    if kind == "encoder":
        from mlxbackend.embed import bert

        if model.num_labels:
            scores, counts = bert.score_pairs(model, query, documents, between_batches)
            return scores, sum(counts)
        vectors, counts = bert.embed(model, [query, *documents], between_batches)
        return cosine(vectors[0], vectors[1:]), sum(counts)
    from mlxbackend.embed import decoder

    tok = model.tokenizer
    instruction = settings.rerank_instruction or decoder.RERANK_INSTRUCTION
    limit = limit_of(settings, model.context_size)
    prompts = [decoder.rerank_prompt(tok, query, d, instruction, limit) for d in documents]
    scores = decoder.rerank_tokens(model.model, tok, prompts, between_batches)
    return scores, sum(len(p) for p in prompts)


def cosine(query: np.ndarray, rows: np.ndarray) -> np.ndarray:
    q = query / max(float(np.linalg.norm(query)), 1e-12)
    r = rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)
    return (r @ q).astype(np.float32)
