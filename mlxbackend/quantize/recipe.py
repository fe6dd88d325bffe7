"""The default 4-bit MLX recipe (`mlx-q4`): llama.cpp's Q4_K_M choices in MLX's affine format.

- Bits per layer as llama.cpp's Q4_K_M (and mlx-lm's `mixed_4_6`): 6 bits for `v_proj` and
  `down_proj` in the first and last eighth of the layers and every third one between, 6 bits
  for the output layer — and, unlike mlx-lm's recipe, for tied input embeddings too, since
  they are the output layer of tied models (SmolLM2, Qwen small, Gemma); 4 bits elsewhere.
- Scales and biases searched per group as llama.cpp's `make_qkx2_quants` does for Q4_K: a few
  candidate ranges, a least-squares refit of scale and bias weighted by rms(x) + |x| (large
  weights matter more), the candidate with the least weighted error kept. MLX's own
  `mx.quantize` takes the group's min and max and moves the grid to put zero on it; no library
  exposes a searched affine quantizer for MLX, hence this one.
- With calibration text (extra_options `calibration_text`), the search is data-aware as
  llama.cpp's with an importance matrix (`llama-imatrix`, then `quantize_row_q4_K_impl`): the
  float model runs over the calibration blocks, every Linear's input is summed as x² per input
  channel (`collect_imatrix`: the blk.* matmuls, and the output layer as `--process-output`
  does), and that mean square `qw[j]` replaces rms(x) + |x| as the search's weights:
  `weight[j] = qw[j] * sqrt(sigma2 + x[j]²)` with sigma2 = 2 * mean(x²) over the row's 256-wide
  super-block (QK_K; the whole row when 256 does not divide it). The candidate ranges stay
  make_qkx2_quants' (llama.cpp's imatrix path calls make_qkx3_quants with 37 finer ones, -0.9 to
  +0.9 by 0.05: on SmolLM2's layers the same output error, 1.7x the time). Embeddings get no
  statistics (llama.cpp's imatrix sees only matmuls; a lookup has no input to weight), nor do
  tied embeddings used as the output layer (llama.cpp keeps them `token_embd`, never collected).
  Q4_K's 6-bit quantization of the per-group scales and mins has no MLX counterpart (MLX
  stores them as floats) and is left out.
"""

import math

import mlx.core as mx
import mlx.nn as nn

SEARCH_STEPS = 20  # llama.cpp's nstep for Q4_K
SEARCH_RMIN, SEARCH_RDELTA = -1.0, 0.1  # its candidate range offsets
SUPER_BLOCK = 256  # llama.cpp's QK_K: the span of sigma2 in the imatrix weights
PACKABLE = (2, 3, 4, 5, 6, 8)  # the affine widths MLX packs (as one bit stream per row)
ROWS_PER_CHUNK = 2048


def more_bits(index: int, n_layers: int) -> bool:
    """llama.cpp's use_more_bits: first and last eighth, and every third layer between."""
    return index < n_layers // 8 or index >= 7 * n_layers // 8 or (index - n_layers // 8) % 3 == 2


def k_m_predicate(model: nn.Module, group_size: int, low: int = 4, high: int = 6):
    """mlx-lm quant_predicate for the Q4_K_M-like layout (see the module docstring)."""
    n_layers = len(model.layers)

    def spec(bits: int) -> dict:
        return {"group_size": group_size, "bits": bits, "mode": "affine"}

    def predicate(path: str, module: nn.Module):
        if not hasattr(module, "to_quantized"):
            return False
        if "embed_tokens" in path or "lm_head" in path or "wte" in path:
            return spec(high)
        parts = path.split(".")
        index = next((int(p) for p in parts if p.isdigit()), 0)
        sensitive = any(k in path for k in ("v_proj", "down_proj", "v_a_proj", "v_b_proj"))
        return spec(high if sensitive and more_bits(index, n_layers) else low)

    return predicate


def plain_weights(x: mx.array) -> mx.array:
    """quantize_row_q4_K_ref's weights of the groups x (rows, groups, group): rms + |x|."""
    return mx.sqrt((x * x).mean(axis=-1, keepdims=True)) + mx.abs(x)


def imatrix_weights(x: mx.array, importance: mx.array) -> mx.array:
    """quantize_row_q4_K_impl's weights of the groups x (rows, groups, group) given the
    per-input-channel mean squared activations `importance` (cols,): qw * sqrt(sigma2 + x²),
    sigma2 = 2 * mean(x²) over each 256-wide super-block of the row (or the whole row)."""
    rows, groups, group_size = x.shape
    cols = groups * group_size
    block = SUPER_BLOCK if cols % SUPER_BLOCK == 0 and SUPER_BLOCK % group_size == 0 else cols
    x2 = x * x
    sigma2 = 2 * x2.reshape(rows, cols // block, block).mean(axis=-1, keepdims=True)
    sigma2 = mx.repeat(sigma2, block // group_size, axis=1)
    return importance.astype(mx.float32).reshape(1, groups, group_size) * mx.sqrt(sigma2 + x2)


def search_affine(
    w: mx.array, bits: int, group_size: int, importance: mx.array | None = None
) -> tuple[mx.array, mx.array]:
    """Per-group affine codes with searched scale and bias: (codes (rows, cols) as uint32,
    scales_and_biases (rows, groups, 2)), x ≈ scale * code + bias. `importance` (the input
    channels' mean squared activations): llama.cpp's imatrix weights instead of rms + |x|."""
    nmax = 2**bits - 1
    codes, params = [], []
    for r in range(0, w.shape[0], ROWS_PER_CHUNK):
        x = w[r : r + ROWS_PER_CHUNK].astype(mx.float32)
        x = x.reshape(x.shape[0], -1, group_size)
        lo = x.min(axis=-1, keepdims=True)
        span = mx.maximum(x.max(axis=-1, keepdims=True) - lo, 1e-12)
        weight = plain_weights(x) if importance is None else imatrix_weights(x, importance)
        n = weight.sum(axis=-1, keepdims=True)
        best = None
        for step in range(-1, SEARCH_STEPS + 1):
            iscale = (nmax if step < 0 else SEARCH_RMIN + SEARCH_RDELTA * step + nmax) / span
            q = mx.clip(mx.round(iscale * (x - lo)), 0, nmax)
            sq, sqq = (weight * q).sum(-1, keepdims=True), (weight * q * q).sum(-1, keepdims=True)
            sx, sxq = (weight * x).sum(-1, keepdims=True), (weight * x * q).sum(-1, keepdims=True)
            det = n * sqq - sq * sq
            ok = det > 0
            safe = mx.where(ok, det, 1)
            scale = mx.where(ok, (n * sxq - sx * sq) / safe, span / nmax)
            bias = mx.where(ok, (sqq * sx - sq * sxq) / safe, lo)
            q = mx.clip(mx.round((x - bias) / mx.where(scale == 0, 1, scale)), 0, nmax)
            err = (weight * (scale * q + bias - x) ** 2).sum(-1, keepdims=True)
            if best is None:
                best = [err, q, scale, bias]
            else:
                better = err < best[0]
                best = [
                    mx.where(better, new, old)
                    for new, old in zip((err, q, scale, bias), best, strict=True)
                ]
            mx.eval(best)
        codes.append(best[1].reshape(x.shape[0], -1).astype(mx.uint32))
        params.append(mx.concatenate([best[2], best[3]], axis=-1))
    return mx.concatenate(codes), mx.concatenate(params)


def pack(codes: mx.array, bits: int) -> mx.array:
    """Codes (rows, cols) → MLX's packed affine weights (rows, cols * bits / 32): one
    little-endian bit stream per row, each code's low bit first (any width 2..8)."""
    import numpy as np

    rows = codes.shape[0]
    per = math.lcm(bits, 32) // bits  # codes per run of whole words
    n_words = per * bits // 32
    c = np.asarray(codes, dtype=np.uint64).reshape(rows, -1, per)
    words = np.zeros((*c.shape[:2], n_words), dtype=np.uint64)
    for k in range(n_words):
        for j in range(per):
            start = bits * j - 32 * k
            if -bits < start < 32:
                part = (
                    c[..., j] << np.uint64(start) if start >= 0 else c[..., j] >> np.uint64(-start)
                )
                words[..., k] |= part & np.uint64(0xFFFFFFFF)
    return mx.array(words.reshape(rows, -1).astype(np.uint32))


def quantize_searched(
    w: mx.array, bits: int, group_size: int, importance: mx.array | None = None
) -> tuple[mx.array, ...]:
    """(weight, scales, biases) in MLX's affine layout, with searched scales and biases
    (weighted by `importance`, the input channels' mean squared activations, when given)."""
    if bits not in PACKABLE:
        return mx.quantize(w, group_size=group_size, bits=bits)
    codes, params = search_affine(w, bits, group_size, importance)
    return pack(codes, bits), params[..., 0].astype(w.dtype), params[..., 1].astype(w.dtype)


def search_quantized_layers(
    module: nn.Module, originals: dict, prefix: str = "", importance: dict | None = None
) -> int:
    """Replace the min/max groups of the quantized layers under `module` (named `prefix` in
    the model) by searched ones, from the float weights in `originals` (model path → array),
    weighted by `importance` (layer path → its inputs' mean squares) where it has the layer.
    Each weight is taken out of `originals` once searched, so its float copy is freed and a
    later call over the whole model skips it. Returns how many layers were redone."""
    from mlx.utils import tree_unflatten

    importance = {} if importance is None else importance
    done = 0
    for name, layer in module.named_modules():
        if not isinstance(layer, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            continue
        if getattr(layer, "mode", "affine") != "affine" or layer.bits not in PACKABLE:
            continue
        path = f"{prefix}.{name}".strip(".") if name else prefix
        w = originals.pop(f"{path}.weight", None)
        if w is None:
            continue
        q, s, b = quantize_searched(w, layer.bits, layer.group_size, importance.pop(path, None))
        layer.update(tree_unflatten([("weight", q), ("scales", s), ("biases", b)]))
        mx.eval(layer.parameters())
        done += 1
    return done


# -- activation statistics (llama.cpp's imatrix) ---------------------------------------------


class ActivationStats(nn.Module):
    """Stands in for a Linear while calibration text runs through the float model: sums its
    inputs' squares per input channel (llama.cpp's collect_imatrix)."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module
        self.sum_x2 = mx.zeros((module.weight.shape[-1],), dtype=mx.float32)
        self.tokens = 0

    def __call__(self, x: mx.array, *args, **kwargs) -> mx.array:
        xf = x.reshape(-1, x.shape[-1]).astype(mx.float32)
        self.sum_x2 = self.sum_x2 + (xf * xf).sum(axis=0)
        self.tokens += xf.shape[0]
        return self.module(x, *args, **kwargs)


def attach_stats(model: nn.Module) -> list:
    """Wrap every Linear of the (float) model in ActivationStats: [(path, stats), …]."""
    from mlx.utils import tree_flatten, tree_unflatten

    leaves = tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module)
    wrapped = [(path, ActivationStats(m)) for path, m in leaves if isinstance(m, nn.Linear)]
    model.update_modules(tree_unflatten(wrapped))
    return wrapped


def collect_stats(model: nn.Module, wrapped: list, tokens: mx.array) -> None:
    """Run the model over a batch of token blocks [B, L], adding to the statistics."""
    model(tokens)
    mx.eval([stats.sum_x2 for _, stats in wrapped])


def detach_stats(model: nn.Module, wrapped: list) -> dict:
    """Put the Linears back; returns layer path → mean squared input per channel (the layers
    the text reached)."""
    from mlx.utils import tree_unflatten

    model.update_modules(tree_unflatten([(path, stats.module) for path, stats in wrapped]))
    return {path: stats.sum_x2 / stats.tokens for path, stats in wrapped if stats.tokens}
