"""Embeddings and reranking with a decoder LLM loaded by mlx-lm (Qwen3-Embedding /
Qwen3-Reranker style).

Sequences of one batch are left-padded and run through mlx-lm's `BatchKVCache`, whose mask
hides the padding and whose per-row offsets start every sequence's positions at 0, so a text
gets the same vector alone or in a batch. Models whose caches are not plain KV caches (hybrid
or sliding-window layers) run one sequence at a time."""

import mlx.core as mx
import numpy as np

from mlxbackend.errors import InvalidInput, Unsupported
from mlxbackend.text.chat import char_budget

RERANK_SYSTEM = (
    "Judge whether the Document meets the requirements based on the Query and the Instruct provided. "
    'Note that the answer can only be "yes" or "no".'
)
RERANK_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"
MAX_BATCH_TOKENS = 8192  # padded tokens per forward pass


def inner_model(model):
    """The transformer body that returns final-norm hidden states [B, L, D]."""
    body = getattr(model, "model", None)
    if body is None or not callable(body):
        raise Unsupported(
            f"{type(model).__module__} has no `.model` body: embeddings need a standard mlx-lm text model"
        )
    return body


def batch_caches(model, left_padding: list):
    """One BatchKVCache per layer, or None when the model needs other cache types."""
    from mlx_lm.models.cache import BatchKVCache, KVCache, make_prompt_cache

    caches = make_prompt_cache(model)
    if not all(type(c) is KVCache for c in caches):
        return None
    return [BatchKVCache(left_padding) for _ in caches]


def batches(token_lists: list, max_tokens: int = MAX_BATCH_TOKENS):
    """Index groups of similar length whose padded size stays under max_tokens."""
    order = sorted(range(len(token_lists)), key=lambda i: len(token_lists[i]))
    group, longest = [], 0
    for i in order:
        n = len(token_lists[i])
        if group and max(longest, n) * (len(group) + 1) > max_tokens:
            yield group
            group, longest = [], 0
        group.append(i)
        longest = max(longest, n)
    if group:
        yield group


def run_left_padded(model, token_lists: list, body: bool):
    """Forward token lists (left-padded, one batch); hidden states of the body (body=True) or
    logits, shape [B, L, ·], and the left padding of each row."""
    longest = max(len(t) for t in token_lists)
    padding = [longest - len(t) for t in token_lists]
    caches = batch_caches(model, padding) if len(token_lists) > 1 else None
    if len(token_lists) > 1 and caches is None:
        raise ValueError("batching needs plain KV caches")
    x = mx.array(
        [[0] * p + list(t) for p, t in zip(padding, token_lists, strict=True)], dtype=mx.int32
    )
    fn = inner_model(model) if body else model
    out = fn(x, cache=caches) if caches is not None else fn(x)
    return out, padding


def can_batch(model) -> bool:
    return batch_caches(model, [0]) is not None


def pool(hidden, padding: list, pooling: str):
    """Pool [B, L, D] hidden states of left-padded rows."""
    if pooling == "last":
        return hidden[:, -1, :]
    L = hidden.shape[1]
    valid = mx.arange(L)[None, :] >= mx.array(padding)[:, None]  # [B, L]
    if pooling == "mean":
        w = valid.astype(hidden.dtype)[..., None]
        return (hidden * w).sum(axis=1) / w.sum(axis=1)
    if pooling == "cls":  # the first real token
        return mx.take_along_axis(hidden, mx.array(padding)[:, None, None], axis=1)[:, 0, :]
    if pooling == "max":
        return mx.where(valid[..., None], hidden, -mx.inf).max(axis=1)
    raise InvalidInput(f"unknown pooling {pooling!r}; use last, mean, cls or max")


def embed_tokens(
    model, token_lists: list, pooling: str = "last", normalize: bool = True
) -> np.ndarray:
    """[N, D] float32 embeddings for N token lists (each non-empty)."""
    out = [None] * len(token_lists)
    groups = batches(token_lists) if can_batch(model) else ([i] for i in range(len(token_lists)))
    for group in groups:
        hidden, padding = run_left_padded(model, [token_lists[i] for i in group], body=True)
        vectors = pool(hidden.astype(mx.float32), padding, pooling)
        if normalize:
            vectors = vectors / mx.maximum(mx.linalg.norm(vectors, axis=-1, keepdims=True), 1e-12)
        vectors = np.array(vectors, dtype=np.float32)
        for row, i in enumerate(group):
            out[i] = vectors[row]
    return np.stack(out) if out else np.zeros((0, 0), np.float32)


def answer_ids(tokenizer) -> tuple:
    """Token ids of "yes" and "no" (the reranker's answer), as one token each."""
    ids = []
    for word in ("yes", "no"):
        tid = None
        convert = getattr(tokenizer, "convert_tokens_to_ids", None)
        if convert is not None:
            tid = convert(word)
            if tid == getattr(tokenizer, "unk_token_id", None):
                tid = None
        if tid is None:
            pieces = tokenizer.encode(word, add_special_tokens=False)
            if not pieces:
                raise Unsupported(f"the tokenizer cannot encode {word!r}: this model cannot rerank")
            tid = pieces[0]
        ids.append(int(tid))
    if ids[0] == ids[1]:
        raise Unsupported("'yes' and 'no' map to the same token: this model cannot rerank")
    return tuple(ids)


def rerank_prompt(
    tokenizer, query: str, document: str, instruction: str = RERANK_INSTRUCTION, max_tokens: int = 0
) -> list:
    """Qwen3-Reranker's prompt through the model's chat template (no thinking), as token ids.
    A prompt over max_tokens keeps the start of the document; the question and answer slot stay."""
    if max_tokens:
        budget = char_budget(tokenizer, max_tokens)
        if len(query) + len(instruction) > budget:
            raise InvalidInput(
                f"the rerank query ({len(query)} characters) exceeds the {max_tokens}-token limit"
            )
        document = document[:budget]
    tokens = _rerank_prompt(tokenizer, query, document, instruction)
    if max_tokens and len(tokens) > max_tokens:
        doc = tokenizer.encode(document, add_special_tokens=False)
        keep = len(doc)
        while len(tokens) > max_tokens:  # re-tokenizing a cut text may shift a token or two
            keep -= len(tokens) - max_tokens
            if keep < 1:
                raise InvalidInput(
                    f"the rerank query and instruction alone exceed {max_tokens} tokens"
                )
            tokens = _rerank_prompt(tokenizer, query, tokenizer.decode(doc[:keep]), instruction)
    return tokens


def _rerank_prompt(tokenizer, query: str, document: str, instruction: str) -> list:
    user = f"<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {document}"
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "system", "content": RERANK_SYSTEM}, {"role": "user", "content": user}]
        text = tokenizer.apply_chat_template(
            messages,
            add_generation_prompt=True,
            tokenize=False,
            enable_thinking=False,
        )
        if "<think>" in tokenizer.get_vocab() and "<think>" not in text[-40:]:
            text += "<think>\n\n</think>\n\n"  # Qwen3-Reranker's suffix when the template omits it
        return tokenizer.encode(text, add_special_tokens=False)
    return tokenizer.encode(f"{RERANK_SYSTEM}\n{user}\nAnswer (yes or no): ")


def rerank_tokens(model, tokenizer, prompts: list, between_batches=None) -> np.ndarray:
    """P(yes) over {yes, no} at the end of each prompt, float32 [N]; `between_batches()` is
    called before each forward pass."""
    yes, no = answer_ids(tokenizer)
    out = np.zeros(len(prompts), np.float32)
    groups = batches(prompts) if can_batch(model) else ([i] for i in range(len(prompts)))
    for group in groups:
        if between_batches is not None:
            between_batches()
        logits, _ = run_left_padded(model, [prompts[i] for i in group], body=False)
        last = logits[:, -1, :].astype(mx.float32)
        pair = mx.stack([last[:, no], last[:, yes]], axis=-1)
        p_yes = mx.softmax(pair, axis=-1)[:, 1]
        out[group] = np.array(p_yes, dtype=np.float32)
    return out
