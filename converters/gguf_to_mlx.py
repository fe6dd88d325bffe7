"""Import a llama.cpp GGUF file into an MLX model folder loadable by ``mlx_lm.load``.

Q4_0, Q4_1 and Q8_0 tensors map natively onto MLX affine quantization (group
size 32, per-module bit widths); F32, F16 and BF16 tensors are kept as float
tensors; Q2_K, Q4_K and Q6_K are expanded to float16 by ``mx.load`` and stored
unquantized. ``dequantize=True`` turns everything into plain float tensors
(``dtype="float32"`` is the fast layout on Linux CPUs). All float tensors,
quantization scales included, are cast to ``dtype`` (see ``default_dtype``).
Architectures: llama (incl. SmolLM2), qwen2, qwen3. The tokenizer is rebuilt
from ``tokenizer.ggml.*`` (byte-level BPE only).

Usage: ``python -m converters.gguf_to_mlx IN.gguf OUT [--dtype float32] [--dequantize]``
"""

import argparse
import json
import mmap
import struct
import sys
from collections import Counter
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx
import numpy as np

from converters.progress import step_bar
from mlxbackend import publish

GGML_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0",
    9: "Q8_1", 10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K",
    15: "Q8_K", 16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S",
    20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS", 24: "I8", 25: "I16",
    26: "I32", 27: "I64", 28: "F64", 29: "IQ1_M", 30: "BF16", 34: "TQ1_0",
    35: "TQ2_0", 39: "MXFP4",
}  # fmt: skip

# What mx.load does with each type (measured with mlx 0.32.4). Other types
# either fail the whole file or, worse, are silently dropped (TQ1_0, MXFP4).
NATIVE_TYPES = {"Q4_0", "Q4_1", "Q8_0"}  # -> affine triplet, group size 32
EXPANDED_TYPES = {"Q2_K", "Q4_K", "Q6_K", "F16"}  # -> float16
SUPPORTED_TYPES = NATIVE_TYPES | EXPANDED_TYPES | {"F32", "BF16"}
GROUP_SIZE = 32
DTYPES = ("float16", "bfloat16", "float32")

# GGUF architecture -> mlx-lm model_type and whether llama.cpp permuted Q/K rows.
ARCHITECTURES = {
    "llama": {"model_type": "llama", "class": "LlamaForCausalLM", "permute_qk": True},
    "qwen2": {"model_type": "qwen2", "class": "Qwen2ForCausalLM", "permute_qk": False},
    "qwen3": {"model_type": "qwen3", "class": "Qwen3ForCausalLM", "permute_qk": False},
}

_TOP_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}

# tokenizer.ggml.pre -> (pre-tokenizer kind, ignore_merges, default add_bos,
# clean_up_tokenization_spaces), following llama.cpp's llama-vocab.cpp.
_PRE_TOKENIZERS = {
    **{name: ("digits+gpt2", False, False, False) for name in ("smollm", "starcoder", "refact", "codeshell", "exaone", "minerva-7b")},
    **{name: ("gpt2", False, False, True) for name in ("gpt-2", "phi-2", "mpt", "olmo", "jais")},
    **{name: ("llama3", True, True, True) for name in ("llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral")},
    **{name: ("qwen2", False, False, False) for name in ("qwen2", "deepseek-r1-qwen")},
}  # fmt: skip
_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
TOKEN_CONTROL, TOKEN_USER_DEFINED = 3, 4

ProgressFn = Callable[[int, int, str], None]


# ---------------------------------------------------------------------------
# GGUF header


_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}  # fmt: skip


def read_gguf(path) -> tuple[dict, dict]:
    """Read a GGUF header without loading tensor data.

    Returns ``(metadata, tensors)``: metadata as plain Python values and
    ``{name: {"shape", "type", "offset"}}`` with numpy-order shapes, GGML type
    names and absolute byte offsets. Raises ``ValueError`` for non-GGUF input.
    """
    path = Path(path)
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file (missing 'GGUF' magic)")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            try:
                return _parse_header(buf, path)
            except (struct.error, UnicodeDecodeError, IndexError) as e:
                raise ValueError(f"{path}: truncated or corrupt GGUF header ({e})") from e


def _parse_header(buf, path):
    pos = 4

    def unpack(fmt):
        nonlocal pos
        values = struct.unpack_from("<" + fmt, buf, pos)
        pos += struct.calcsize("<" + fmt)
        return values[0] if len(values) == 1 else values

    def string():
        nonlocal pos
        n = unpack("Q")
        s = bytes(buf[pos : pos + n]).decode("utf-8")
        pos += n
        return s

    def value(vtype):
        nonlocal pos
        if vtype == 8:
            return string()
        if vtype in _SCALARS:
            return unpack(_SCALARS[vtype])
        if vtype == 9:
            itype, n = unpack("IQ")
            if itype in _SCALARS and itype != 7:
                dt = np.dtype("<" + _SCALARS[itype])
                arr = np.frombuffer(buf, dtype=dt, count=n, offset=pos)
                pos += n * dt.itemsize
                return arr.tolist()
            return [value(itype) for _ in range(n)]
        raise ValueError(f"{path}: unknown GGUF metadata value type {vtype}")

    version = unpack("I")
    if version not in (2, 3):
        raise ValueError(f"{path}: unsupported GGUF version {version} (need 2 or 3)")
    n_tensors, n_kv = unpack("QQ")
    metadata = {}
    for _ in range(n_kv):
        key = string()
        metadata[key] = value(unpack("I"))
    infos = {}
    for _ in range(n_tensors):
        name = string()
        dims = [unpack("Q") for _ in range(unpack("I"))]
        ggml_type, offset = unpack("IQ")
        infos[name] = {
            "shape": tuple(reversed(dims)),
            "type": GGML_TYPES.get(ggml_type, f"type {ggml_type}"),
            "offset": offset,
        }
    alignment = metadata.get("general.alignment", 32)
    data_start = pos + (-pos) % alignment
    for info in infos.values():
        info["offset"] += data_start
    return metadata, infos


def write_gguf(path, metadata: dict, tensors: dict) -> None:
    """Write a minimal GGUF v3 file (used by the tests to build reference files).

    ``metadata`` values: bool, int (uint32, or int64 when negative or large),
    float (float32), str, or lists of str/int (int32)/float (float32).
    ``tensors``: name -> float32/float16 numpy array, or ``(type_name, shape,
    raw_bytes)`` for data that is already encoded (e.g. BF16 or quantized).
    """
    type_ids = {v: k for k, v in GGML_TYPES.items()}

    def s(x):
        b = x.encode("utf-8")
        return struct.pack("<Q", len(b)) + b

    def val(v):
        if isinstance(v, list):
            if all(isinstance(x, str) for x in v):
                return struct.pack("<IIQ", 9, 8, len(v)) + b"".join(s(x) for x in v)
            ints = all(isinstance(x, int) and not isinstance(x, bool) for x in v)
            arr = np.asarray(v, "<i4" if ints else "<f4")
            return struct.pack("<IIQ", 9, 5 if ints else 6, len(v)) + arr.tobytes()
        if isinstance(v, bool):
            return struct.pack("<I?", 7, v)
        if isinstance(v, int):
            return struct.pack("<II", 4, v) if 0 <= v < 2**32 else struct.pack("<Iq", 11, v)
        if isinstance(v, float):
            return struct.pack("<If", 6, v)
        if isinstance(v, str):
            return struct.pack("<I", 8) + s(v)
        raise TypeError(f"unsupported GGUF metadata value {v!r}")

    head = [b"GGUF", struct.pack("<IQQ", 3, len(tensors), len(metadata))]
    head += [s(k) + val(v) for k, v in metadata.items()]
    blobs, offset = [], 0
    for name, t in tensors.items():
        if isinstance(t, np.ndarray):
            kind = {np.dtype("float32"): "F32", np.dtype("float16"): "F16"}[t.dtype]
            t = (kind, t.shape, np.ascontiguousarray(t).astype(t.dtype.newbyteorder("<")).tobytes())
        kind, shape, raw = t
        head.append(
            s(name)
            + struct.pack(
                f"<I{len(shape)}QIQ", len(shape), *reversed(shape), type_ids[kind], offset
            )
        )
        blobs.append(raw + b"\0" * ((-len(raw)) % 32))
        offset += len(blobs[-1])
    header = b"".join(head)
    with open(path, "wb") as f:
        f.write(header + b"\0" * ((-len(header)) % 32))
        for blob in blobs:
            f.write(blob)


# ---------------------------------------------------------------------------
# Atomic output


@contextmanager
def atomic_output_dir(out_dir, overwrite: bool = False):
    """Yield a staging folder beside ``out_dir`` and rename it into place on success
    (``mlxbackend.publish.atomic_folder``).

    A half-written folder never appears under the final name: on any error the
    temporary folder is removed. Raises ``FileExistsError`` if ``out_dir``
    exists and ``overwrite`` is false (also when it appears meanwhile).
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists (pass overwrite=True to replace it)")
    with publish.atomic_folder(out_dir) as tmp:  # fsync, rename into place; NoSpace on a full disk
        yield tmp
        if out_dir.exists() and not overwrite:
            raise FileExistsError(f"{out_dir} appeared while converting")


# ---------------------------------------------------------------------------
# Config


def _float32(x) -> float:
    """Shortest decimal that round-trips a float32 metadata value (1e-05, not 9.99e-06)."""
    return float(str(np.float32(x)))


def model_config(metadata: dict, tensors: dict) -> dict:
    """Build an mlx-lm ``config.json`` dict from GGUF metadata."""
    arch = metadata.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(
            f"unsupported GGUF architecture {arch!r} (supported: {', '.join(ARCHITECTURES)})"
        )
    spec = ARCHITECTURES[arch]

    def get(key, default=None):
        v = metadata.get(f"{arch}.{key}", default)
        if v is None:
            raise ValueError(f"GGUF metadata lacks {arch}.{key}")
        return v

    n_heads = get("attention.head_count")
    n_kv_heads = get("attention.head_count_kv", n_heads)
    ffn = get("feed_forward_length")
    if isinstance(n_heads, list) or isinstance(n_kv_heads, list) or isinstance(ffn, list):
        raise ValueError("per-layer head counts or feed-forward sizes are not supported")
    hidden = get("embedding_length")
    head_dim = metadata.get(f"{arch}.attention.key_length", hidden // n_heads)
    rope_dim = metadata.get(f"{arch}.rope.dimension_count", head_dim)
    if rope_dim != head_dim:
        raise ValueError(
            f"partial rotary embeddings (rope dim {rope_dim} != head dim {head_dim}) are not supported"
        )
    if "rope_freqs.weight" in tensors:
        raise ValueError(
            "rope frequency factors (rope_freqs.weight, llama3-style rope scaling) are not supported"
        )
    embed = tensors.get("token_embd.weight")
    if embed is None:
        raise ValueError("GGUF has no token_embd.weight tensor")

    config = {
        "model_type": spec["model_type"],
        "architectures": [spec["class"]],
        "hidden_size": hidden,
        "num_hidden_layers": get("block_count"),
        "intermediate_size": ffn,
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv_heads,
        "head_dim": head_dim,
        "max_position_embeddings": get("context_length", 4096),
        "rms_norm_eps": _float32(get("attention.layer_norm_rms_epsilon", 1e-5)),
        # Top level on purpose: mlx-lm's llama/qwen2 ignore rope_parameters.
        "rope_theta": _float32(get("rope.freq_base", 10000.0)),
        "vocab_size": embed["shape"][0],
        "tie_word_embeddings": "output.weight" not in tensors,
    }
    if arch == "llama":
        config["attention_bias"] = "blk.0.attn_q.bias" in tensors
        config["mlp_bias"] = "blk.0.ffn_up.bias" in tensors
    scaling = metadata.get(f"{arch}.rope.scaling.type", "none")
    if scaling == "linear":
        config["rope_scaling"] = {"type": "linear", "factor": _float32(get("rope.scaling.factor"))}
    elif scaling != "none":
        raise ValueError(f"unsupported rope scaling type {scaling!r}")
    for key in ("bos", "eos", "padding"):
        token_id = metadata.get(f"tokenizer.ggml.{key}_token_id")
        if token_id is not None:
            config["pad_token_id" if key == "padding" else f"{key}_token_id"] = token_id
    return config


# ---------------------------------------------------------------------------
# Tokenizer


def build_tokenizer(metadata: dict):
    """Rebuild a Hugging Face fast tokenizer from ``tokenizer.ggml.*``.

    Returns ``(tokenizer, tokenizer_config, generation_config)``. Only the
    byte-level BPE vocabulary (``tokenizer.ggml.model == "gpt2"``) is handled.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, processors
    from tokenizers import pre_tokenizers as pre

    kind = metadata.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(
            f"unsupported GGUF tokenizer model {kind!r}: only 'gpt2' (byte-level BPE) is handled"
        )
    pre_name = metadata.get("tokenizer.ggml.pre", "default")
    if pre_name not in _PRE_TOKENIZERS:
        raise ValueError(
            f"unsupported GGUF pre-tokenizer {pre_name!r} (supported: {', '.join(sorted(_PRE_TOKENIZERS))})"
        )
    pre_kind, ignore_merges, default_bos, clean_spaces = _PRE_TOKENIZERS[pre_name]

    tokens = metadata["tokenizer.ggml.tokens"]
    types = metadata.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    vocab = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    merges = [tuple(m.split(" ", 1)) for m in metadata.get("tokenizer.ggml.merges", [])]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=ignore_merges))

    if pre_kind == "digits+gpt2":
        tok.pre_tokenizer = pre.Sequence(
            [
                pre.Digits(individual_digits=True),
                pre.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    elif pre_kind == "gpt2":
        tok.pre_tokenizer = pre.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        regex = _LLAMA3_REGEX if pre_kind == "llama3" else _QWEN2_REGEX
        tok.pre_tokenizer = pre.Sequence(
            [
                pre.Split(Regex(regex), behavior="isolated", invert=False),
                pre.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    tok.decoder = decoders.ByteLevel()

    control = [t for t, ty in zip(tokens, types, strict=True) if ty == TOKEN_CONTROL]
    user = [t for t, ty in zip(tokens, types, strict=True) if ty == TOKEN_USER_DEFINED]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])
    for t in control + user:
        if tok.token_to_id(t) != vocab[t]:
            raise ValueError(f"special token {t!r} does not map back to id {vocab[t]}")

    def token(key):
        i = metadata.get(f"tokenizer.ggml.{key}_token_id")
        return (i, tokens[i]) if i is not None and 0 <= i < len(tokens) else (None, None)

    bos_id, bos = token("bos")
    eos_id, eos = token("eos")
    add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", default_bos)) and bos is not None
    add_eos = bool(metadata.get("tokenizer.ggml.add_eos_token", False)) and eos is not None
    if add_bos or add_eos:
        single = " ".join(
            ([f"{bos}:0"] if add_bos else []) + ["$A:0"] + ([f"{eos}:0"] if add_eos else [])
        )
        pair = single + " " + single.replace("$A:0", "$B:1").replace(":0", ":1")
        specials = ([(bos, bos_id)] if add_bos else []) + ([(eos, eos_id)] if add_eos else [])
        tok.post_processor = processors.TemplateProcessing(
            single=single, pair=pair, special_tokens=list(dict(specials).items())
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)

    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": clean_spaces,
        "model_max_length": metadata.get(
            f"{metadata.get('general.architecture')}.context_length", 4096
        ),
    }
    for key, name in (
        ("bos", "bos_token"),
        ("eos", "eos_token"),
        ("unknown", "unk_token"),
        ("padding", "pad_token"),
    ):
        if (t := token(key)[1]) is not None:
            config[name] = t
    templates = {
        k.split(".", 2)[2]: v
        for k, v in metadata.items()
        if k.startswith("tokenizer.chat_template.")
    }
    if "tokenizer.chat_template" in metadata:
        if templates:
            default = {"name": "default", "template": metadata["tokenizer.chat_template"]}
            config["chat_template"] = [default] + [
                {"name": k, "template": v} for k, v in templates.items()
            ]
        else:
            config["chat_template"] = metadata["tokenizer.chat_template"]

    eos_ids = [i for k in ("eos", "eot", "eom") if (i := token(k)[0]) is not None]
    eos_ids = list(dict.fromkeys(eos_ids))
    generation = {}
    if bos_id is not None:
        generation["bos_token_id"] = bos_id
    if eos_ids:
        generation["eos_token_id"] = eos_ids[0] if len(eos_ids) == 1 else eos_ids
    if (pad_id := token("padding")[0]) is not None:
        generation["pad_token_id"] = pad_id
    return tok, config, generation


# ---------------------------------------------------------------------------
# Weights


def _mlx_name(base: str) -> str | None:
    if base in _TOP_NAMES:
        return _TOP_NAMES[base]
    parts = base.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}"
    return None


def _unpermute(x: mx.array, n_head: int) -> mx.array:
    """Undo llama.cpp's Q/K row permutation (rows only, so packed data, scales and biases alike)."""
    rows = x.shape[0]
    return x.reshape(n_head, rows // n_head // 2, 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


def _read_bf16(path: Path, info: dict) -> mx.array:
    """Read a BF16 tensor exactly (mx.load would round it to float16)."""
    count = int(np.prod(info["shape"]))
    raw = np.fromfile(path, dtype="<u2", count=count, offset=info["offset"])
    return mx.array(raw.reshape(info["shape"])).view(mx.bfloat16)


def default_dtype(tensors: dict) -> str:
    """Pick the float dtype when none is given.

    On the CPU device float32: there MLX's float16/bfloat16 kernels, quantized
    matmuls included, ran 8-35x slower than float32 (measured, mlx 0.32.4).
    On a GPU: float32 for all-F32 files, bfloat16 if any matrix is BF16,
    float16 otherwise (exact for GGUF's float16 quantization scales).
    """
    if mx.default_device().type == mx.DeviceType.cpu:
        return "float32"
    matrix_types = {i["type"] for i in tensors.values() if len(i["shape"]) >= 2}
    if matrix_types <= {"F32"}:
        return "float32"
    return "bfloat16" if "BF16" in matrix_types else "float16"


def convert_weights(
    path: Path,
    tensors: dict,
    config: dict,
    arch: str,
    dtype: str,
    dequantize: bool,
    progress: ProgressFn | None = None,
) -> tuple[dict, dict | None]:
    """Load GGUF tensors and return ``(mlx_weights, quantization_config_or_None)``."""
    bad = {n: i["type"] for n, i in tensors.items() if i["type"] not in SUPPORTED_TYPES}
    if bad:
        by_type = Counter(bad.values())
        example = next(iter(bad))
        raise ValueError(
            "unsupported GGUF tensor type(s) "
            + ", ".join(f"{t} ({n} tensors)" for t, n in by_type.items())
            + f", e.g. {example}; supported: {', '.join(sorted(SUPPORTED_TYPES))}"
        )
    unknown = [n for n in tensors if _mlx_name(n.rsplit(".", 1)[0]) is None]
    if unknown:
        raise ValueError(
            f"unsupported GGUF tensor name(s) for {config['model_type']}: {', '.join(unknown[:5])}"
        )

    dt = getattr(mx, dtype)
    permute = ARCHITECTURES[arch]["permute_qk"]
    raw = mx.load(str(path))
    out, bits = {}, {}
    for done, (name, info) in enumerate(tensors.items(), 1):
        base, leaf = name.rsplit(".", 1)
        target = _mlx_name(base)
        if info["type"] == "BF16":
            raw.pop(name)
            parts = {leaf: _read_bf16(path, info)}
        elif info["type"] in NATIVE_TYPES:
            parts = {
                leaf: raw.pop(name),
                "scales": raw.pop(f"{base}.scales"),
                "biases": raw.pop(f"{base}.biases"),
            }
        else:
            parts = {leaf: raw.pop(name)}

        if permute and target.endswith(("q_proj", "k_proj")):
            n = (
                config["num_attention_heads"]
                if target.endswith("q_proj")
                else config["num_key_value_heads"]
            )
            parts = {k: _unpermute(v, n) for k, v in parts.items()}

        if "scales" in parts:
            w, s, b = parts["weight"], parts["scales"], parts["biases"]
            n_bits = w.shape[-1] * 32 // (s.shape[-1] * GROUP_SIZE)
            if dequantize:
                f32 = mx.float32
                parts = {
                    "weight": mx.dequantize(
                        w, s.astype(f32), b.astype(f32), group_size=GROUP_SIZE, bits=n_bits
                    )
                }
            else:
                bits[target] = n_bits
        parts = {
            k: v.astype(dt) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in parts.items()
        }
        mx.eval(parts)
        out.update({f"{target}.{k}": v for k, v in parts.items()})
        if progress:
            progress(done, len(tensors), name)

    if config.get("tie_word_embeddings"):
        out.pop("lm_head.weight", None)
    if not bits:
        return out, None
    default_bits = Counter(bits.values()).most_common(1)[0][0]
    quant = {"group_size": GROUP_SIZE, "bits": default_bits, "mode": "affine"}
    for module, b in bits.items():
        if b != default_bits:
            quant[module] = {"group_size": GROUP_SIZE, "bits": b, "mode": "affine"}
    return out, quant


def save_weights(folder: Path, weights: dict) -> None:
    """Write weights as ``model.safetensors`` (or shards plus an index), mlx-lm style."""
    from mlx_lm.utils import make_shards

    shards = make_shards(weights)
    fmt = "model-{:05d}-of-{:05d}.safetensors" if len(shards) > 1 else "model.safetensors"
    index = {"metadata": {"total_size": sum(v.nbytes for v in weights.values())}, "weight_map": {}}
    for i, shard in enumerate(shards, 1):
        name = fmt.format(i, len(shards))
        mx.save_safetensors(str(folder / name), shard, metadata={"format": "mlx"})
        index["weight_map"].update({k: name for k in shard})
    index["weight_map"] = dict(sorted(index["weight_map"].items()))
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=4))


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------
# Entry points


def convert_gguf(
    gguf_path,
    out_dir,
    dtype: str | None = None,
    dequantize: bool = False,
    *,
    overwrite: bool = False,
    progress: ProgressFn | None = None,
) -> Path:
    """Convert a GGUF file into an MLX model folder and return its path.

    ``dtype`` (float16, bfloat16, float32) is applied to every float tensor,
    quantization scales included; ``None`` picks one from the file
    (:func:`default_dtype`). ``dequantize=True`` writes plain float weights.
    The folder is built beside ``out_dir`` and renamed into place; an
    existing ``out_dir`` raises ``FileExistsError`` unless ``overwrite``.
    ``progress(done, total, tensor_name)`` is called after each tensor.
    """
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r} (choose from {', '.join(DTYPES)})")
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists (pass overwrite=True to replace it)")
    if not gguf_path.is_file():
        raise FileNotFoundError(f"no such GGUF file: {gguf_path}")

    metadata, tensors = read_gguf(gguf_path)
    config = model_config(metadata, tensors)
    tokenizer, tokenizer_config, generation_config = build_tokenizer(metadata)
    if len(metadata["tokenizer.ggml.tokens"]) > config["vocab_size"]:
        raise ValueError("tokenizer has more tokens than the embedding has rows")

    dtype = dtype or default_dtype(tensors)
    weights, quant = convert_weights(
        gguf_path, tensors, config, metadata["general.architecture"], dtype, dequantize, progress
    )
    config["torch_dtype"] = dtype
    if quant:
        config["quantization"] = quant
        config["quantization_config"] = quant
    if "eos_token_id" in generation_config:
        config["eos_token_id"] = generation_config["eos_token_id"]

    with atomic_output_dir(out_dir, overwrite) as tmp:
        save_weights(tmp, weights)
        _write_json(tmp / "config.json", dict(sorted(config.items())))
        tokenizer.save(str(tmp / "tokenizer.json"))
        _write_json(tmp / "tokenizer_config.json", tokenizer_config)
        _write_json(tmp / "generation_config.json", generation_config)
    return out_dir


def main(argv=None) -> int:
    """Command line: ``python -m converters.gguf_to_mlx IN.gguf OUT [options]``."""
    parser = argparse.ArgumentParser(
        prog="python -m converters.gguf_to_mlx",
        description="Import a llama.cpp GGUF file into an MLX model folder.",
    )
    parser.add_argument("gguf", help="input .gguf file")
    parser.add_argument("out", help="output folder (must not exist unless --overwrite)")
    parser.add_argument(
        "--dtype", choices=DTYPES, default=None, help="float dtype (default: from the file)"
    )
    parser.add_argument("--dequantize", action="store_true", help="write plain float weights")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an existing output folder"
    )
    args = parser.parse_args(argv)

    try:
        with step_bar("loading", 32) as report:
            out = convert_gguf(
                args.gguf, args.out, dtype=args.dtype, dequantize=args.dequantize,
                overwrite=args.overwrite, progress=report,
            )  # fmt: skip
            report(None, None, "done")
    except (ValueError, FileExistsError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
