"""Will a model fit? Weights (file sizes) + KV cache for ContextSize vs the memory available."""

import os
import sys
from pathlib import Path

from mlxbackend.errors import InvalidInput, OutOfMemory

HEADROOM = 0.9  # leave a little for activations, the tokenizer and the process itself


def available_bytes() -> int:
    """Memory this process can still use: MemAvailable on Linux; the GPU working set on a Mac."""
    if sys.platform == "darwin":
        import mlx.core as mx

        info = mx.device_info()
        if "max_recommended_working_set_size" in info:
            return int(info["max_recommended_working_set_size"]) - mx.get_active_memory()
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def attention_shape(config: dict) -> tuple:
    """(layers, KV heads, head dimension) of a model's config."""
    text = config.get("text_config", config)
    layers = text.get("num_hidden_layers") or text.get("n_layer") or 0
    heads = text.get("num_attention_heads") or 1
    kv_heads = text.get("num_key_value_heads") or heads
    head_dim = text.get("head_dim") or (text.get("hidden_size", 0) // heads)
    return layers, kv_heads, head_dim


def kv_bytes(config: dict, context: int, dtype_bytes: int, kv=None) -> int:
    """KV cache of one sequence filling `context` tokens; `kv` a quantized KV type
    (text/kv_quant.KvType), whose data, scales and biases are counted."""
    layers, kv_heads, head_dim = attention_shape(config)
    key, value = kv.bytes_per_element(dtype_bytes) if kv else (dtype_bytes, dtype_bytes)
    recent = min(context, kv.recent_tokens()) if kv else 0  # its float window, besides
    return int(layers * kv_heads * head_dim * (context * (key + value) + recent * 2 * dtype_bytes))


def dtype_bytes(config: dict) -> int:
    return 2 if str(config.get("torch_dtype", "")).endswith("16") else 4


def kv_budget(path: Path, config: dict, options: dict) -> int:
    """Bytes the KV caches of running requests may take: Options max_kv_bytes, else what is
    left of available memory (with headroom) once the weights are in."""
    if "max_kv_bytes" in options:
        return int(options["max_kv_bytes"])
    return max(int(HEADROOM * available_bytes()) - weights_bytes(path), 0)


def weights_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))


def loaded_bytes(model) -> int:
    """Bytes of a loaded model's parameters (as held in memory, after any load-time changes)."""
    from mlx.utils import tree_flatten

    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def largest_context(path: Path, config: dict, limit: int, kv_type=None) -> int:
    """ContextSize 0: the most tokens (up to `limit`, the model's own) whose KV fits in what is
    left of available memory (with headroom) after the weights, with this KV type."""
    window = kv_type.recent_tokens() if kv_type else 0  # a quantized KV's float window
    fixed = kv_bytes(config, window, dtype_bytes(config), kv_type)
    per_token = kv_bytes(config, window + 1, dtype_bytes(config), kv_type) - fixed or 1
    weights = weights_bytes(path)
    left = int(HEADROOM * available_bytes()) - weights
    fits = window + (left - fixed) // per_token if left >= fixed else left // per_token
    if fits < MIN_CONTEXT:
        raise OutOfMemory(
            f"model does not fit: after its weights ({weights / 2**30:.2f} GiB) "
            f"there is room for the KV of {fits} tokens, fewer than {MIN_CONTEXT}; use a smaller "
            "or quantized model, or a quantized KV cache (cache_type_k / cache_type_v)"
        )
    return int(min(limit, fits))


MIN_CONTEXT = 256


def check_fits(path: Path, config: dict, context: int, kv_type=None):
    """Raise OutOfMemory (RESOURCE_EXHAUSTED) when weights + KV for `context` cannot fit."""
    weights = weights_bytes(path)
    kv = kv_bytes(config, context, dtype_bytes(config), kv_type)
    free = available_bytes()
    if weights + kv > HEADROOM * free:
        raise OutOfMemory(
            f"model does not fit: weights {weights / 2**30:.2f} GiB + KV cache for ContextSize "
            f"{context} {kv / 2**30:.2f} GiB > {HEADROOM:.0%} of available memory "
            f"{free / 2**30:.2f} GiB; lower ContextSize or use a smaller/quantized model"
        )


# MLX keeps freed buffers for reuse (its buffer cache). Unbounded on Metal by default (up to the
# memory limit); Options `mlx_cache_bytes` bounds it for this process (0 = no buffer reuse).
DEFAULT_MLX_CACHE_BYTES = 64 << 20


def apply_cache_limit(options: dict) -> int:
    """Set MLX's buffer-cache limit from Options `mlx_cache_bytes`; returns the limit in force."""
    import mlx.core as mx

    global _cache_limit
    limit = int(options.get("mlx_cache_bytes", DEFAULT_MLX_CACHE_BYTES))
    if limit < 0:
        raise InvalidInput(f"Options mlx_cache_bytes must be >= 0, got {limit}")
    if limit != _cache_limit:
        mx.set_cache_limit(limit)
        _cache_limit = limit
    return limit


_cache_limit: int | None = None  # the limit apply_cache_limit set (MLX has no getter)


def mlx_cache_limit() -> int:
    """MLX's buffer-cache limit in force, bytes."""
    import mlx.core as mx

    if _cache_limit is None:
        previous = mx.set_cache_limit(DEFAULT_MLX_CACHE_BYTES)  # read MLX's default back
        mx.set_cache_limit(previous)
        return previous
    return _cache_limit


# Metal can wire (pin) a model's buffers so that macOS never pages them out between requests;
# mlx-lm's generate wires up to the GPU's recommended working set. Options `wired_limit_bytes`
# sets it (0 = nothing wired); without Metal (Linux, CPU) there is nothing to wire: 0, a no-op.
_wired_limit: int | None = None


def metal() -> bool:
    import mlx.core as mx

    return bool(mx.metal.is_available())


def recommended_working_set() -> int:
    """Metal's max_recommended_working_set_size, bytes (0 without Metal)."""
    import mlx.core as mx

    return int(mx.device_info().get("max_recommended_working_set_size", 0)) if metal() else 0


def apply_wired_limit(options: dict) -> int:
    """Set Metal's wired-memory limit from Options `wired_limit_bytes` (default: the recommended
    working set, as mlx-lm does); returns the limit in force (0 without Metal)."""
    import mlx.core as mx

    global _wired_limit
    most = recommended_working_set()
    limit = options.get("wired_limit_bytes", most)
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
        raise InvalidInput(f"Options wired_limit_bytes must be an integer >= 0, got {limit!r}")
    if metal() and limit > most:
        raise InvalidInput(
            f"Options wired_limit_bytes {limit} is above this Mac's recommended working set "
            f"{most} (Metal refuses more)"
        )
    limit = limit if metal() else 0
    if limit != _wired_limit:
        mx.set_wired_limit(limit)
        _wired_limit = limit
    return limit


def wired_limit() -> int:
    """The wired-memory limit in force, bytes (0 without Metal or before any model)."""
    return _wired_limit or 0


def process_rss() -> int:
    """Resident memory of this process in bytes, from /proc (0 where there is none)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
