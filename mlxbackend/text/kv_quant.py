"""Quantized KV caches, for one sequence and inside mlx-lm's continuous batch.

mlx-lm has `QuantizedKVCache` for one sequence only (its `BatchGenerator` merges caches through a
`merge` that only the plain caches have) and with one bit width for keys and values. These two
classes store keys and values each either as float or as MLX's quantized triple (data, scales,
biases), in groups along the head dimension:

* `QuantKVCache`: one sequence (solo runs, the prefix cache, saved prompt caches);
* `BatchQuantKVCache`: mlx-lm's `BatchKVCache` (left padding, right-padded prefill rolled left,
  filter / extend / extract / merge) on those stores.

Rotation (default): each key and value vector is turned by a Hadamard transform before it is
quantized and turned back when read (`mx.hadamard_transform`, its own inverse). It spreads the few
outlier channels of keys over all of them, so a group's scale fits its values: on SmolLM2-135M,
teacher-forced over 2048 tokens, top-1 agreement with the float KV goes from 98.3 % to 99.2 % at 8
bits and from 76.7 % to 84.3 % at 4 bits. Rotated stores are read back as float keys and values,
dequantized per layer as they are read. With Options `kv_rotate:false` and one width for keys and
values, the cache has `bits` and `group_size` and returns the quantized triples instead: mlx-lm's
attention then runs `quantized_scaled_dot_product_attention`, reading only the quantized bytes
(mlx-lm's own QuantizedKVCache, less accurate, faster on long contexts where reading the KV
dominates).

Float window (Options `kv_window`, default 128; 0 turns it off): every position is stored
quantized, and the last `window` positions are kept in float besides. A forward pass reads its own
new keys and values and the `window` positions before them in float, the older ones dequantized.
Nearly all of the loss of a quantized KV is in the last few positions a token attends to: on
SmolLM2-135M teacher-forced one token at a time (as decoding reads the cache), 4-bit agreement with
the float KV goes from ~84 % to ~97 % with 128 float positions (README, "Quantized KV cache"), for
128 positions' float bytes per sequence (+0.016 of the float KV at 8k tokens). The window is not
saved with a cache (prompt_cache_dir, the SSD tier) nor kept through a trim: those positions are
then read dequantized. mlx-lm's quantized attention (below) reads the stores only: no window.

LocalAI's `cache_type_k` / `cache_type_v` are llama.cpp's names: q8_0 → 8 bits, q5_0 / q5_1 → 5,
q4_0 / q4_1 / iq4_nl → 4, in MLX groups of `kv_group_size` (default 64: llama.cpp's blocks are 32,
but MLX's scales and biases are in the KV's dtype, and on float32 KV groups of 32 would cost 25 %
more); f32 / f16 / bf16 (or empty) keep the model's own float KV."""

from contextlib import contextmanager
from dataclasses import dataclass

import mlx.core as mx
from mlx_lm.models import cache as mlx_cache
from mlx_lm.models.cache import _BaseCache, create_attention_mask, create_causal_mask, dynamic_roll

from mlxbackend.errors import InvalidInput
from mlxbackend.text.memory import attention_shape

FLOAT_TYPES = ("", "f32", "f16", "bf16", "fp16", "fp32", "float16", "float32", "bfloat16")
QUANT_TYPES = {
    "q8_0": 8,
    "q8": 8,
    "q6": 6,
    "q5_0": 5,
    "q5_1": 5,
    "q5": 5,
    "q4_0": 4,
    "q4_1": 4,
    "iq4_nl": 4,
    "q4": 4,
    "q3": 3,
    "q2": 2,
}
GROUP_SIZES = (32, 64, 128)
DEFAULT_WINDOW = 128  # Options kv_window


@dataclass(frozen=True)
class KvType:
    """Bits of the keys and of the values (None = the model's float dtype), and the group."""

    key_bits: int | None = None
    value_bits: int | None = None
    group_size: int = 64
    rotate: bool = True  # Hadamard-rotated stores (see above)
    window: int = DEFAULT_WINDOW  # the last stored positions also kept in float (see above)

    @property
    def quantized(self) -> bool:
        return bool(self.key_bits or self.value_bits)

    def label(self) -> str:
        def side(bits):
            return f"{bits}-bit" if bits else "float"

        if not self.quantized:
            return "float"
        turn = ", rotated" if self.rotate else ""
        recent = f", last {self.window} in float" if self.windowed else ""
        return (
            f"K {side(self.key_bits)}, V {side(self.value_bits)}, group {self.group_size}"
            f"{turn}{recent}"
        )

    @property
    def attends_quantized(self) -> bool:
        """mlx-lm's quantized attention reads the stores (one width, not rotated)."""
        return bool(self.key_bits) and self.key_bits == self.value_bits and not self.rotate

    @property
    def windowed(self) -> bool:
        return self.quantized and self.window > 0 and not self.attends_quantized

    def recent_tokens(self) -> int:
        """Positions one sequence also keeps in float between forward passes."""
        return self.window if self.windowed else 0

    def bytes_per_element(self, float_bytes: int) -> tuple:
        """Bytes one key element and one value element take, scales and biases included."""

        def one(bits):
            return bits / 8 + 2 * float_bytes / self.group_size if bits else float_bytes

        return one(self.key_bits), one(self.value_bits)


def _bits(name: str, value) -> int | None:
    text = str(value or "").strip().lower()
    if text in FLOAT_TYPES:
        return None
    if text in QUANT_TYPES:
        return QUANT_TYPES[text]
    known = ", ".join(["f16", "bf16", "f32", *QUANT_TYPES])
    raise InvalidInput(f"{name} {value!r} is not a KV cache type this backend knows: {known}")


def kv_type(cache_type_k: str, cache_type_v: str, options: dict) -> KvType:
    """The KV type a LoadModel asks for: ModelOptions CacheTypeKey / CacheTypeValue, overridden
    by Options cache_type_k / cache_type_v, or Options kv_bits (both sides, mlx-lm's name)."""
    key = options.get("cache_type_k", cache_type_k)
    value = options.get("cache_type_v", cache_type_v)
    key_bits, value_bits = _bits("cache_type_k", key), _bits("cache_type_v", value)
    if "kv_bits" in options:
        bits = options["kv_bits"]
        if isinstance(bits, bool) or bits not in (2, 3, 4, 5, 6, 8):
            raise InvalidInput(f"Options kv_bits must be one of 2, 3, 4, 5, 6, 8; got {bits!r}")
        key_bits = value_bits = bits
    group = options.get("kv_group_size", 64)
    if group not in GROUP_SIZES:
        raise InvalidInput(f"Options kv_group_size must be one of 32, 64, 128; got {group!r}")
    rotate = options.get("kv_rotate", True)
    if not isinstance(rotate, bool):
        raise InvalidInput(f"Options kv_rotate must be true or false; got {rotate!r}")
    window = options.get("kv_window", DEFAULT_WINDOW)
    if isinstance(window, bool) or not isinstance(window, int) or not 0 <= window <= 4096:
        raise InvalidInput(f"Options kv_window must be a whole number 0..4096; got {window!r}")
    return KvType(key_bits, value_bits, group, rotate, window)


def check_model(kv: KvType, model, config: dict) -> None:
    """The model must use plain KV caches, with a head dimension the group divides."""
    if not kv.quantized:
        return
    kinds = plain_layers(model)
    if kinds != {"KVCache"}:
        raise InvalidInput(
            f"a quantized KV cache ({kv.label()}) needs plain KV caches; this model uses "
            f"{', '.join(sorted(kinds))} (sliding-window or recurrent layers): leave "
            "cache_type_k / cache_type_v unset (f16) for it"
        )
    head_dim = attention_shape(config)[2]
    if kv.rotate:
        try:
            mx.eval(mx.hadamard_transform(mx.zeros((1, head_dim))))
        except ValueError:
            raise InvalidInput(
                f"the KV rotation needs a head dimension of 2^k, or 12, 20 or 28 × 2^k; this "
                f"model's is {head_dim}: set Options kv_rotate:false"
            ) from None
    if head_dim % kv.group_size:
        fits = [g for g in GROUP_SIZES if head_dim % g == 0]
        hint = f"set Options kv_group_size to {fits[-1]}" if fits else "leave the KV unquantized"
        raise InvalidInput(
            f"a quantized KV cache in groups of {kv.group_size} needs a head dimension it "
            f"divides; this model's is {head_dim}: {hint}"
        )


def plain_layers(model) -> set:
    """The cache classes the model's layers use by default ({"KVCache"} for plain attention)."""
    return {type(c).__name__ for c in mlx_cache.make_prompt_cache(model)}


def make_cache(model, kv: KvType | None, max_kv_size: int = 0) -> list:
    """A fresh per-layer cache for one sequence: quantized, rotating (max_kv_size tokens, the
    first 4 kept, as mlx-lm's make_prompt_cache would make it for a model without its own
    make_cache — llama's has one, so mlx-lm ignores max_kv_size there), or the model's own."""
    if max_kv_size:
        return [mlx_cache.RotatingKVCache(max_size=max_kv_size, keep=4) for _ in model.layers]
    if kv is None or not kv.quantized:
        return mlx_cache.make_prompt_cache(model)
    return [QuantKVCache(kv) for _ in range(len(model.layers))]


# -- stores: a side is (float,) or (data, scales, biases) ------------------------------------
def _encode(x: mx.array, bits: int | None, group: int, rotate: bool) -> tuple:
    if not bits:
        return (x,)
    return tuple(
        mx.quantize(mx.hadamard_transform(x) if rotate else x, group_size=group, bits=bits)
    )


def _decode(side: tuple, bits: int | None, group: int, rotate: bool) -> mx.array:
    if not bits:
        return side[0]
    x = mx.dequantize(*side, group_size=group, bits=bits)
    return mx.hadamard_transform(x) if rotate else x


def _zeros_like(side: tuple, batch: int, length: int) -> tuple:
    return tuple(mx.zeros((batch, a.shape[1], length, a.shape[3]), a.dtype) for a in side)


def _grow(store: tuple | None, new: tuple, used: int, step: int) -> tuple:
    """store with room for `new` after its first `used` positions (mlx-lm's growth by steps)."""
    if store is not None and used + new[0].shape[2] <= store[0].shape[2]:
        return store
    room = (step + new[0].shape[2] - 1) // step * step
    fresh = _zeros_like(new, new[0].shape[0], room)
    if store is None:
        return fresh
    if used % step != 0:
        store = tuple(a[..., :used, :] for a in store)
    return tuple(mx.concatenate([a, b], axis=2) for a, b in zip(store, fresh, strict=True))


def _write(store: tuple, new: tuple, start: int, end: int) -> None:
    for a, b in zip(store, new, strict=True):
        a[..., start:end, :] = b


class _QuantStores:
    """What both caches share: the KV type, the stores' growth, the float window of the last
    positions, and how fetched keys and values look."""

    kv: KvType
    step = 256
    recent: tuple | None = None  # (keys, values) in float: the positions just before recent_end
    recent_end = 0

    def _append(self, keys, values, start: int) -> int:
        """Quantize keys and values and write them from position `start`; returns the end."""
        k, v = self._encode_kv(keys, values)
        end = start + keys.shape[2]
        self.keys = _grow(self.keys, k, start, self.step)
        self.values = _grow(self.values, v, start, self.step)
        _write(self.keys, k, start, end)
        _write(self.values, v, start, end)
        if self.kv.windowed:
            self._keep_recent(keys, values, start, end)
        return end

    def _keep_recent(self, keys, values, start: int, end: int) -> None:
        """The float window: what it held before `start` (at most `window` positions),
        then the new keys and values."""
        old = self.recent
        if old is not None:
            first = self.recent_end - old[0].shape[2]
            keep = max(first, start - self.kv.recent_tokens())
            if first <= start <= self.recent_end and keep < start:
                old = tuple(a[..., keep - first : start - first, :] for a in old)
            else:
                old = None  # trimmed past it, or a gap (stores set from elsewhere)
        new = (keys, values)
        if old is not None:
            new = tuple(mx.concatenate([a, b], axis=2) for a, b in zip(old, new, strict=True))
        self.recent, self.recent_end = new, end

    def _upto(self, n: int) -> tuple:
        """The stores' first n positions (keys, values)."""
        return tuple(a[..., :n, :] for a in self.keys), tuple(a[..., :n, :] for a in self.values)

    def _set_type(self, kv: KvType):
        self.kv = kv
        if kv.attends_quantized:
            self.bits, self.group_size = kv.key_bits, kv.group_size  # mlx-lm: quantized SDPA
        else:
            self.__dict__.pop("bits", None)
            self.__dict__.pop("group_size", None)

    def _fetch(self, n: int):
        """Keys and values of the first n positions, just written: quantized triples for mlx-lm's
        quantized attention; else float, from the float window as far back as it holds (this
        pass's positions and at most `window` before them) and dequantized before that."""
        keys, values = self._upto(n)
        if hasattr(self, "bits"):
            return keys, values
        fetched = self._span(n, n)
        if self.recent is not None:
            self.recent = tuple(a[..., -self.kv.window :, :] for a in self.recent)  # till next pass
        return fetched

    def _decoded(self, keys: tuple, values: tuple, a: int, b: int) -> tuple:
        """Float keys and values of stored positions a..b."""
        kv = self.kv
        return (
            _decode(tuple(x[..., a:b, :] for x in keys), kv.key_bits, kv.group_size, kv.rotate),
            _decode(tuple(x[..., a:b, :] for x in values), kv.value_bits, kv.group_size, kv.rotate),
        )

    def _encode_kv(self, keys, values) -> tuple:
        kv = self.kv
        return _encode(keys, kv.key_bits, kv.group_size, kv.rotate), _encode(
            values, kv.value_bits, kv.group_size, kv.rotate
        )

    def empty(self) -> bool:
        return self.keys is None

    def is_trimmable(self) -> bool:
        return True

    def _span(self, end: int, length: int) -> tuple:
        """Float keys and values of the `length` positions before `end` (all rows): from the
        float window where it holds them, else dequantized, and zeros before position 0 (a
        row's left padding after alignment)."""
        start = end - length
        held = end  # the float window holds [held, end)
        if self.recent is not None and end <= self.recent_end:
            first = self.recent_end - self.recent[0].shape[2]
            held = min(max(first, start), end)
        parts = []
        if start < 0:
            parts.append(None)
        if max(start, 0) < held:
            parts.append(self._decoded(self.keys, self.values, max(start, 0), held))
        if held < end:
            parts.append(tuple(a[..., held - first : end - first, :] for a in self.recent))
        if len(parts) == 1:
            return parts[0]
        like = next(p for p in parts if p is not None)
        if parts[0] is None:
            parts[0] = tuple(mx.zeros((*a.shape[:2], -start, a.shape[3]), a.dtype) for a in like)
        return tuple(mx.concatenate(side, axis=2) for side in zip(*parts, strict=True))

    @property
    def nbytes(self) -> int:
        if self.keys is None:
            return 0
        recent = self.recent or ()
        return sum(a.nbytes for a in (*self.keys, *self.values, *recent))


class QuantKVCache(_QuantStores, _BaseCache):
    """One sequence's quantized KV (mlx-lm's QuantizedKVCache, keys and values apart)."""

    def __init__(self, kv: KvType):
        self.keys = self.values = None
        self.offset = 0
        self._set_type(kv)

    def update_and_fetch(self, keys, values):
        self.offset = self._append(keys, values, self.offset)
        return self._fetch(self.offset)

    def size(self) -> int:
        return self.offset

    def trim(self, n: int) -> int:
        n = min(self.offset, n)
        self.offset -= n
        return n

    def make_mask(self, *args, **kwargs):
        return create_attention_mask(*args, offset=self.offset, **kwargs)

    @property
    def state(self):
        kv = self.kv
        kind = (kv.key_bits, kv.value_bits, kv.group_size, int(kv.rotate), kv.window)
        if self.keys is None:
            return [], [], 0, *kind
        keys, values = self._upto(self.offset)
        return list(keys), list(values), self.offset, *kind

    @state.setter
    def state(self, v):
        keys, values, self.offset, key_bits, value_bits, group, rotate, *window = v
        self.keys = tuple(keys) if len(keys) else None
        self.values = tuple(values) if len(values) else None
        self.recent = None  # not saved: the window's positions are read dequantized
        self._set_type(KvType(key_bits, value_bits, group, bool(rotate), *window[:1]))

    @classmethod
    def merge(cls, caches):
        return BatchQuantKVCache.merge(caches)


class BatchQuantKVCache(_QuantStores, _BaseCache):
    """mlx-lm's BatchKVCache (left-padded rows, one shared write index) on quantized stores."""

    def __init__(self, left_padding: list, kv: KvType):
        self.keys = self.values = None
        self.left_padding = mx.array(left_padding)
        self.offset = mx.array([-p for p in left_padding])
        self._idx = 0
        self._right_padding = None
        self._set_type(kv)

    def update_and_fetch(self, keys, values):
        self._idx = self._append(keys, values, self._idx)
        self.offset = self.offset + keys.shape[2]
        return self._fetch(self._idx)

    def prepare(self, *, left_padding=None, lengths=None, right_padding=None):
        if left_padding is not None:
            if self.keys is not None:
                raise ValueError("Left padding can only be added to an empty cache")
            left_padding = mx.array(left_padding)
            self.left_padding += left_padding
            self.offset = self.offset - left_padding
        if right_padding is not None and max(right_padding) > 0:
            self._right_padding = mx.array(right_padding)

    def finalize(self):
        """Roll right-padded prefill rows so their padding is on the left (as BatchKVCache)."""
        if self._right_padding is None:
            return
        padding = self._right_padding[:, None]
        self.keys = tuple(dynamic_roll(a, padding, axis=2) for a in self.keys)
        self.values = tuple(dynamic_roll(a, padding, axis=2) for a in self.values)
        self.offset = self.offset - self._right_padding
        self.left_padding += self._right_padding
        self._right_padding = None
        self.recent = None  # its rows moved by different amounts: dequantized from here on

    def size(self) -> int:
        return self._idx

    def trim(self, n: int) -> int:
        n = min(self._idx, n)
        self._idx -= n
        self.offset = self.offset - n
        return n

    def make_mask(self, N: int, return_array: bool = False, **kwargs):
        return create_causal_mask(N, offset=self._idx, left_padding=self.left_padding, **kwargs)

    def filter(self, batch_indices):
        """Keep these rows; drop the padding columns every kept row has."""
        if self.keys is not None:
            self.keys = tuple(a[batch_indices] for a in self.keys)
            self.values = tuple(a[batch_indices] for a in self.values)
        self.offset = self.offset[batch_indices]
        self.left_padding = self.left_padding[batch_indices]
        shift = min(self.left_padding.tolist())
        if shift > 0:
            if self.keys is not None:
                self.keys = tuple(a[..., shift:, :] for a in self.keys)
                self.values = tuple(a[..., shift:, :] for a in self.values)
            self._idx -= shift
            self.left_padding -= shift
        if self.recent is not None:
            self.recent = tuple(a[batch_indices] for a in self.recent)
            self.recent_end -= max(shift, 0)
            first = self.recent_end - self.recent[0].shape[2]
            if first < 0:
                self.recent = tuple(a[..., -first:, :] for a in self.recent)

    def extend(self, other: "BatchQuantKVCache"):
        """Append other's rows, right-aligned on the longer write index."""
        if self.keys is None and other.keys is None:
            self.left_padding = mx.concatenate([self.left_padding, other.left_padding])
            self.offset = mx.concatenate([self.offset, other.offset])
            return
        ref = self if self.keys is not None else other
        idx = max(self._idx, other._idx)
        size = max(c.keys[0].shape[2] for c in (self, other) if c.keys is not None)

        def aligned(c):
            rows = c.offset.shape[0]
            keys = c.keys if c.keys is not None else _zeros_like(ref.keys, rows, 0)
            values = c.values if c.values is not None else _zeros_like(ref.values, rows, 0)
            left = idx - c._idx
            right = size - keys[0].shape[2] - left

            def pad(a):
                if right < 0:
                    a = a[..., :right, :]
                if left or right > 0:
                    a = mx.pad(a, [(0, 0), (0, 0), (left, max(right, 0)), (0, 0)])
                return a

            return tuple(map(pad, keys)), tuple(map(pad, values)), c.left_padding + left

        (k1, v1, p1), (k2, v2, p2) = aligned(self), aligned(other)
        if self.kv.windowed:  # each side's last positions, right-aligned as the stores
            self.recent = _stacked(
                [(c, c._idx, c.offset.shape[0]) for c in (self, other)],
                min(self.kv.recent_tokens(), idx),
            )
            self.recent_end = idx
        self.keys = tuple(mx.concatenate(pair) for pair in zip(k1, k2, strict=True))
        self.values = tuple(mx.concatenate(pair) for pair in zip(v1, v2, strict=True))
        self.offset = mx.concatenate([self.offset, other.offset])
        self.left_padding = mx.concatenate([p1, p2])
        self._idx = idx

    def extract(self, idx: int) -> QuantKVCache:
        cache = QuantKVCache(self.kv)
        padding = self.left_padding.tolist()[idx]
        end = self._idx
        cache.keys = tuple(mx.contiguous(a[idx : idx + 1, :, padding:end]) for a in self.keys)
        cache.values = tuple(mx.contiguous(a[idx : idx + 1, :, padding:end]) for a in self.values)
        cache.offset = end - padding
        if self.kv.windowed:
            span = min(self.kv.recent_tokens(), cache.offset)
            cache.recent = tuple(mx.contiguous(a[idx : idx + 1]) for a in self._span(end, span))
            cache.recent_end = cache.offset
        return cache

    @classmethod
    def merge(cls, caches: list) -> "BatchQuantKVCache":
        """One batch cache from single-sequence QuantKVCaches (left-padded to the longest)."""
        kv = caches[0].kv
        if any(getattr(c, "kv", None) != kv for c in caches):
            raise ValueError("cannot batch caches of different KV types")
        lengths = [c.size() for c in caches]
        longest = max(lengths)
        padding = [longest - n for n in lengths]
        batch = cls(padding, kv)
        if longest == 0:
            return batch
        full = next(c for c in caches if c.keys is not None)
        keys = _zeros_like(full.keys, len(caches), longest)
        values = _zeros_like(full.values, len(caches), longest)
        for i, (p, c) in enumerate(zip(padding, caches, strict=True)):
            if c.keys is None:
                continue
            for store, side in ((keys, c.keys), (values, c.values)):
                for a, b in zip(store, side, strict=True):
                    a[i : i + 1, :, p : p + c.offset] = b[..., : c.offset, :]
        batch.keys, batch.values = keys, values
        batch.offset = batch.offset + longest
        batch._idx = longest
        if kv.windowed:
            span = min(kv.recent_tokens(), longest)
            batch.recent = _stacked([(c, c.offset, 1) for c in caches], span)
            batch.recent_end = longest
        return batch

    @property
    def state(self):
        return self.keys, self.values, self.offset, self.left_padding, self._idx


def _stacked(sides: list, span: int) -> tuple:
    """The float windows of (cache, end, rows) sides, `span` positions before each end, one
    above the other (zeros for a side with no stores: all its positions are padding)."""
    got = [c._span(end, span) if c.keys is not None else None for c, end, _ in sides]
    like = next(x for x in got if x is not None)
    rows = [
        x if x is not None else tuple(mx.zeros((n, *a.shape[1:]), a.dtype) for a in like)
        for x, (_, _, n) in zip(got, sides, strict=True)
    ]
    return tuple(mx.concatenate(side) for side in zip(*rows, strict=True))


# load_prompt_cache finds cache classes by name in mlx-lm's cache module (prompt_cache_dir)
mlx_cache.QuantKVCache = QuantKVCache


# -- a batch's attention, row by row ------------------------------------------------------------
@contextmanager
def rows_apart():
    """Within (one batch step on the worker): attention for one-token queries of several rows is
    computed row by row over each row's own keys, its left padding cut off, exactly as the row's
    run alone computes it. Over padded keys OpenBLAS rounds a row's attention ~1e-7 differently
    (from ~500 keys on), and a quantized KV turns that into whole quantization steps of stored
    keys and values, so a batched reply drifts from its solo run. Costs one attention call per
    row and layer. Covers MLX's attention (rotated stores: float keys and values) and mlx-lm's
    quantized attention (`kv_rotate:false`: the quantized triples)."""
    from mlx_lm.models import base

    from mlxbackend.text import cpu_softmax

    fast, quantized = cpu_softmax.mlx_attention(), base.quantized_scaled_dot_product_attention
    with (
        cpu_softmax.swapped(mx.fast, "scaled_dot_product_attention", _by_rows(fast)),
        cpu_softmax.swapped(base, "quantized_scaled_dot_product_attention", _by_rows(quantized)),
    ):
        yield


def _by_rows(attention):
    """`attention`, called once per row for a batch of one-token queries under a boolean mask."""
    seen: dict = {}  # id(mask) -> (mask, each row's left padding): one sync per forward pass

    def rows(q, k, v, *, mask=None, **kw):
        if q.shape[0] == 1 or q.shape[2] != 1 or not isinstance(mask, mx.array):
            return attention(q, k, v, mask=mask, **kw)
        if id(mask) not in seen:
            valid = mask.reshape(mask.shape[0], -1).sum(axis=-1)
            seen.clear()
            seen[id(mask)] = (mask, (mask.shape[-1] - valid).tolist())
        pads = seen[id(mask)][1]
        out = [
            attention(
                q[b : b + 1],
                _row(k, b, p),
                _row(v, b, p),
                mask=mask[b : b + 1, ..., p:],
                **kw,
            )
            for b, p in enumerate(pads)
        ]
        return mx.concatenate(out, axis=0)

    return rows


def _row(x, b: int, p: int):
    """Row b of keys or values (an array or a quantized triple) from position p on."""
    if isinstance(x, (tuple, list)):
        return type(x)(a[b : b + 1, :, p:] for a in x)
    return x[b : b + 1, :, p:]
