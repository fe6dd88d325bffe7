"""Options `cpu_softmax:numpy`: attention's softmax in NumPy while MLX runs on the CPU.

MLX's CPU backend evaluates `exp` one element at a time: about 14 ns per element on this x86
machine, against about 1 ns for NumPy's vectorised exp. On a few thousand tokens of context the
softmax of the attention scores is then about three quarters of a prefill's attention and half
of the whole prefill (README, "Agent sessions"). With the option, prefill chunks (more than one
query) of float32 models compute the scores and the weighted sum with MLX and the softmax in
NumPy, in place: SmolLM2's prefill of 4,270 tokens takes 0.55 of the time.

It acts only inside the prompt prefills of a model that enabled it (`scope`, around each chunk's
forward pass in text/generate.py: requests, warm prompts), where it swaps `mx.fast`'s function
(mlx-lm's models look it up at each call) and puts it back. Everything else keeps
`mx.fast.scaled_dot_product_attention`: decode steps, fine-tuning (NumPy would cut the gradient),
other dtypes, attention sinks, traced calls. Off by default: outputs then differ from mlx-lm's in
the last bits (logits by about 1e-4). A GPU (Metal, CUDA) never uses it."""

import weakref
from contextlib import contextmanager

import numpy as np

from mlxbackend.errors import InvalidInput

CHOICES = ("mlx", "numpy")
# models whose prefills use it, by id (an mlx.nn.Module is a dict: unhashable)
_ENABLED: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
_MLX_ATTENTION = []  # mx.fast.scaled_dot_product_attention, read before the first swap


def mlx_attention():
    """MLX's own mx.fast.scaled_dot_product_attention (mlx imported lazily: start-up time)."""
    if not _MLX_ATTENTION:
        import mlx.core as mx

        _MLX_ATTENTION.append(mx.fast.scaled_dot_product_attention)
    return _MLX_ATTENTION[0]


def enable(model, options: dict) -> bool:
    """Options `cpu_softmax` (mlx | numpy) for this model's prefills; True when it is on."""
    import mlx.core as mx

    choice = str(options.get("cpu_softmax", "mlx")).strip().lower()
    if choice not in CHOICES:
        raise InvalidInput(
            f"Options cpu_softmax must be one of {', '.join(CHOICES)}; got {choice!r}"
        )
    on = choice == "numpy" and mx.default_device() == mx.cpu
    if on:
        _ENABLED[id(model)] = model
    else:
        _ENABLED.pop(id(model), None)
    return on


def enabled(model) -> bool:
    """Whether `model`'s prefills use the NumPy softmax."""
    return _ENABLED.get(id(model)) is model


@contextmanager
def scope(model):
    """Within: attention with the NumPy softmax, if `model` enabled it (one forward pass; no
    pause inside, so no other task runs under it)."""
    if not enabled(model):
        yield
        return
    import mlx.core as mx

    mlx_attention()  # MLX's own, read before the first swap
    with swapped(mx.fast, "scaled_dot_product_attention", numpy_softmax_attention):
        yield


@contextmanager
def swapped(owner, name: str, value):
    """Within: `owner.name` is `value`; put back after. For attention swapped around forward
    passes on the worker (no pause inside, so no other task runs under it)."""
    original = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, original)


def numpy_softmax_attention(q, k, v, *, scale, mask=None, sinks=None, stream=None, **kw):
    """mx.fast.scaled_dot_product_attention with the softmax in NumPy, where it applies."""
    import mlx.core as mx

    if not _applies(q, k, v, mask, sinks, stream, kw):
        return mlx_attention()(q, k, v, scale=scale, mask=mask, sinks=sinks, stream=stream, **kw)
    batch, heads, length, dims = q.shape
    kv_heads, keys = k.shape[1], k.shape[2]
    repeats = heads // kv_heads
    # queries of one KV head side by side: one matmul per KV head (grouped-query attention)
    scores = (q * scale).reshape(batch, kv_heads, repeats * length, dims) @ k.swapaxes(-1, -2)
    try:
        mx.eval(scores)
    except ValueError:  # traced (mx.compile): arrays cannot be evaluated here
        return mlx_attention()(q, k, v, scale=scale, mask=mask, sinks=sinks, stream=stream, **kw)
    a = np.asarray(scores).reshape(batch, kv_heads, repeats, length, keys)
    if isinstance(mask, str):  # "causal", aligned to the last key as MLX's is
        offset = keys - length
        hidden = np.arange(offset, keys)[None] > np.arange(length)[:, None] + offset
        a[..., offset:][..., hidden] = -np.inf
    elif mask is not None:
        m = _by_kv_head(np.asarray(mask), kv_heads, repeats)
        if m.dtype == np.bool_:
            np.copyto(a, np.finfo(np.float32).min, where=~m)
        else:
            a += m
    a -= a.max(axis=-1, keepdims=True)
    np.exp(a, out=a)
    a /= a.sum(axis=-1, keepdims=True)
    weights = mx.array(a.reshape(batch, kv_heads, repeats * length, keys))
    return (weights @ v).reshape(batch, heads, length, v.shape[-1])


def _by_kv_head(m: np.ndarray, kv_heads: int, repeats: int) -> np.ndarray:
    """A mask that broadcasts to [B, H, L, S], made to broadcast to [B, kv, repeats, L, S]."""
    if m.ndim < 3:
        return m
    heads = (1, 1) if m.shape[-3] == 1 else (kv_heads, repeats)
    return m.reshape(m.shape[:-3] + heads + m.shape[-2:])


def _applies(q, k, v, mask, sinks, stream, kw) -> bool:
    import mlx.core as mx

    return (
        not kw
        and sinks is None
        and stream is None
        and mx.default_device() == mx.cpu
        and q.ndim == 4
        and k.shape[2] >= q.shape[2] > 1
        and q.dtype == k.dtype == v.dtype == mx.float32
        and q.shape[1] % k.shape[1] == 0
        and (
            mask is None
            or isinstance(mask, mx.array)
            or (isinstance(mask, str) and mask == "causal")
        )
    )
