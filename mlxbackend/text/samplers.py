"""Samplers llama.cpp has and mlx-lm lacks: locally typical, tail-free, XTC with the request's
own key, Mirostat 1 and 2 — written after llama.cpp's `llama-sampling.cpp` (typical, XTC,
Mirostat) and its removed tail-free sampler, vectorised over a batch of rows.

Each filter takes log-probabilities (B, V) and returns them with dropped tokens at -inf, like
mlx-lm's `apply_top_p`; the Mirostat samplers also draw the token and carry their `mu`.
"""

import math

import mlx.core as mx

LN2 = math.log(2.0)
MIROSTAT_M = 100  # llama.cpp's m: tokens used to estimate the Zipf exponent (Mirostat 1)


def _masked_probs(logprobs: mx.array) -> tuple[mx.array, mx.array]:
    """Normalised (log-probs, probs) in float32; masked tokens have probability 0."""
    logprobs = logprobs.astype(mx.float32)
    logprobs = logprobs - mx.logsumexp(logprobs, axis=-1, keepdims=True)
    return logprobs, mx.exp(logprobs)


def _keep_sorted_prefix(logprobs: mx.array, order: mx.array, count: mx.array) -> mx.array:
    """Keep the first `count` tokens (B, 1) of `order` (B, V), drop the rest."""
    ranks = mx.arange(order.shape[-1])[None, :]
    keep_sorted = ranks < count
    keep = mx.put_along_axis(mx.zeros(order.shape, dtype=mx.bool_), order, keep_sorted, axis=-1)
    return mx.where(keep, logprobs, -mx.inf)


def apply_typical(logprobs: mx.array, typical_p: float) -> mx.array:
    """Locally typical sampling: keep the tokens whose surprise is closest to the entropy until
    their mass exceeds `typical_p` (at least one)."""
    logp, probs = _masked_probs(logprobs)
    entropy = -mx.sum(mx.where(probs > 0, probs * logp, 0.0), axis=-1, keepdims=True)
    shifted = mx.where(probs > 0, mx.abs(-logp - entropy), mx.inf)
    order = mx.argsort(shifted, axis=-1)
    cum = mx.cumsum(mx.take_along_axis(probs, order, axis=-1), axis=-1)
    count = mx.minimum((cum <= typical_p).sum(axis=-1, keepdims=True) + 1, order.shape[-1])
    return _keep_sorted_prefix(logprobs, order, count)


def apply_tail_free(logprobs: mx.array, z: float) -> mx.array:
    """Tail-free sampling: cut where the normalised |second derivative| of the sorted
    probabilities has accumulated `z` (at least one token kept)."""
    _, probs = _masked_probs(logprobs)
    order = mx.argsort(-probs, axis=-1)
    sorted_p = mx.take_along_axis(probs, order, axis=-1)
    if sorted_p.shape[-1] <= 2:
        return logprobs
    second = mx.abs(mx.diff(sorted_p, n=2, axis=-1))
    total = second.sum(axis=-1, keepdims=True)
    cum = mx.cumsum(second / mx.where(total > 0, total, 1.0), axis=-1)
    below = (cum <= z).sum(axis=-1, keepdims=True)
    count = mx.where(below == cum.shape[-1], order.shape[-1], mx.maximum(below, 1))
    return _keep_sorted_prefix(logprobs, order, count)


def apply_xtc(
    logprobs: mx.array, probability: float, threshold: float, special: mx.array, key: mx.array
) -> mx.array:
    """XTC ("exclude top choices"): with `probability`, drop every token above `threshold`
    except the least likely of them. mlx-lm's apply_xtc draws its coin from the global RNG;
    this one from the request's key, so a seed still reproduces the reply."""
    _, probs = _masked_probs(logprobs)
    smallest_above = mx.where(probs > threshold, probs, mx.inf).min(axis=-1, keepdims=True)
    drop = probs > smallest_above
    if special.size:
        drop = drop & ~mx.zeros(probs.shape[-1:], dtype=mx.bool_).at[special].add(True)
    coin = mx.random.uniform(shape=(probs.shape[0], 1), key=key)
    return mx.where((coin < probability) & drop, -mx.inf, logprobs)


def mirostat_keep(logprobs: mx.array, mu: mx.array, version: int) -> mx.array:
    """Mirostat's truncation for target surprise `mu` (B,): version 1 keeps the top k from the
    Zipf estimate of llama.cpp's mirostat sampler, version 2 the tokens whose surprise in bits
    is at most mu (the most likely always). Returns renormalised log-probs."""
    logp, probs = _masked_probs(logprobs)
    vocab = logp.shape[-1]
    if version == 1:
        sorted_p = -mx.sort(-probs, axis=-1)[..., :MIROSTAT_M]
        i = mx.arange(sorted_p.shape[-1] - 1, dtype=mx.float32)
        t = mx.log((i + 2) / (i + 1))
        valid = sorted_p[..., 1:] > 0
        b = mx.log(mx.where(valid, sorted_p[..., :-1] / mx.where(valid, sorted_p[..., 1:], 1), 1))
        s_hat = mx.sum(mx.where(valid, t * b, 0), axis=-1) / mx.maximum(
            mx.sum(mx.where(valid, t * t, 0), axis=-1), 1e-12
        )
        eps = s_hat - 1
        k = ((eps * mx.power(2.0, mu)) / (1 - mx.power(float(vocab), -eps))) ** (1 / s_hat)
        k = mx.clip(mx.nan_to_num(k, nan=1.0, posinf=vocab), 1, vocab).astype(mx.int32)
        kept = _keep_sorted_prefix(logp, mx.argsort(-probs, axis=-1), k[:, None])
    else:
        top = logp >= logp.max(axis=-1, keepdims=True)
        kept = mx.where((-logp / LN2 <= mu[:, None]) | top, logp, -mx.inf)
    return kept - mx.logsumexp(kept, axis=-1, keepdims=True)


def mirostat_step(
    logprobs: mx.array, mu: mx.array, version: int, tau: float, eta: float, key: mx.array
) -> tuple[mx.array, mx.array]:
    """One Mirostat draw: truncate by `mu`, sample, then move `mu` by `eta` times the observed
    surprise's error against `tau`. Returns (token, new mu)."""
    kept = mirostat_keep(logprobs, mu, version)
    token = mx.random.categorical(kept, key=key)
    observed = -mx.take_along_axis(kept, token[:, None], axis=-1)[:, 0] / LN2
    return token, mu - eta * (observed - tau)
