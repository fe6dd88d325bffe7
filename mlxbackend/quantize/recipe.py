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
"""

import math

import mlx.core as mx
import mlx.nn as nn

SEARCH_STEPS = 20  # llama.cpp's nstep for Q4_K
SEARCH_RMIN, SEARCH_RDELTA = -1.0, 0.1  # its candidate range offsets
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


def search_affine(w: mx.array, bits: int, group_size: int) -> tuple[mx.array, mx.array]:
    """Per-group affine codes with searched scale and bias: (codes (rows, cols) as uint32,
    scales_and_biases (rows, groups, 2)), x ≈ scale * code + bias."""
    nmax = 2**bits - 1
    codes, params = [], []
    for r in range(0, w.shape[0], ROWS_PER_CHUNK):
        x = w[r : r + ROWS_PER_CHUNK].astype(mx.float32)
        x = x.reshape(x.shape[0], -1, group_size)
        lo = x.min(axis=-1, keepdims=True)
        span = mx.maximum(x.max(axis=-1, keepdims=True) - lo, 1e-12)
        weight = mx.sqrt((x * x).mean(axis=-1, keepdims=True)) + mx.abs(x)
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


def quantize_searched(w: mx.array, bits: int, group_size: int) -> tuple[mx.array, ...]:
    """(weight, scales, biases) in MLX's affine layout, with searched scales and biases."""
    if bits not in PACKABLE:
        return mx.quantize(w, group_size=group_size, bits=bits)
    codes, params = search_affine(w, bits, group_size)
    return pack(codes, bits), params[..., 0].astype(w.dtype), params[..., 1].astype(w.dtype)


def search_quantized_layers(module: nn.Module, originals: dict, prefix: str = "") -> int:
    """Replace the min/max groups of the quantized layers under `module` (named `prefix` in
    the model) by searched ones, from the float weights in `originals` (model path → array).
    Each weight is taken out of `originals` once searched, so its float copy is freed and a
    later call over the whole model skips it. Returns how many layers were redone."""
    from mlx.utils import tree_unflatten

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
        q, s, b = quantize_searched(w, layer.bits, layer.group_size)
        layer.update(tree_unflatten([("weight", q), ("scales", s), ("biases", b)]))
        mx.eval(layer.parameters())
        done += 1
    return done
