"""GGUF import of every GGML quantization type llama.cpp's quantizer writes.

A tiny random llama (hidden 256, FFN 512: llama.cpp's K and IQ types need rows of 256) is
built with transformers and converted to F16 by llama.cpp's converter; llama.cpp's quantizer
makes one GGUF per file type (through llama-cpp-python; the IQ1/IQ2/IQ3_XXS types, which it
refuses without an importance matrix, get a uniform one, as do Q1_0/Q2_0, which mlx_to_gguf
does not offer). Per file: the GGML types it really holds (the intended one must be there);
``convert_gguf``'s weights against gguf-py's dequantize of the same tensors (llama.cpp's
reference decoder; ggml's own ``to_float`` for Q1_0/Q2_0, which gguf-py 0.19 lacks): bit for
bit where the type maps exactly onto MLX quantization, within WEIGHT_TOLERANCE where it is
re-quantized; the bit widths in config.json; logits against llama.cpp on the same file; the
folder loads with ``mlx_lm.load``. ``dequantize=True`` must give gguf-py's floats exactly.
NVFP4, which this llama.cpp's quantizer cannot write, is checked on a file written here with
ggml's own NVFP4 quantizer. Figures: one JSON line per file (``pytest -s``).
"""

import ctypes
import json
import subprocess
import sys
from pathlib import Path

import llama_cpp
import mlx.core as mx
import numpy as np
import pytest
import torch
import transformers
from transformers import PreTrainedTokenizerFast

from converters import gguf_to_mlx as g2m
from converters.gguf_to_mlx import convert_gguf, read_gguf, write_gguf
from converters.mlx_to_gguf import QUANTIZER_TYPES, _quantize, mlx_to_gguf
from tests import tiny_model as tm
from tests.test_gguf_archs import EOS, PAD, PROMPT, SPECIAL, llama, relative_error
from tests.test_mlx_to_gguf import PRE, llama_greedy

# llama.cpp file type -> the GGML type it is for. What llama.cpp puts elsewhere is checked as
# well: Q6_K or Q5_K for the output layer; q2_k adds Q3_K; q3_k_m Q4_K and Q5_K; iq3_xxs IQ3_S
# and IQ2_S; iq1_s/iq1_m IQ2_XXS and Q2_K; tq*/q2_0 Q4_K (so iq2_xxs and iq2_m add nothing).
# Q4_0, Q8_0 and MXFP4 are covered by test_gguf_archs (q4_k_m files too), Q4_1 by
# test_converters (the bundled SmolLM2 GGUF).
FILE_TYPES = {
    "q5_0": "Q5_0",
    "q5_1": "Q5_1",
    "q2_k": "Q2_K",
    "q3_k_m": "Q3_K",
    "q5_k_m": "Q5_K",
    "iq4_nl": "IQ4_NL",
    "iq4_xs": "IQ4_XS",
    "iq3_s": "IQ3_S",
    "iq3_xxs": "IQ3_XXS",
    "iq2_xs": "IQ2_XS",
    "iq1_s": "IQ1_S",
    "iq1_m": "IQ1_M",
    "tq1_0": "TQ1_0",
    "tq2_0": "TQ2_0",
    "q1_0": "Q1_0",
    "q2_0": "Q2_0",
}
# Re-quantized types (K_QUANT_BITS): the most relative RMS error of a tensor's MLX weights
# against the file's. Measured here (these random Gaussian weights): 8 bits 0.40 %, 5 bits
# 2.97 %, 4 bits 5.1-5.7 %, 3 bits 9.2-12.5 %; IQ1_S, TQ1_0 and TQ2_0 (three levels per group)
# come back exactly at 2 bits, up to float rounding.
WEIGHT_TOLERANCE = {
    "Q6_K": 0.006,
    "IQ4_NL": 0.04,
    "IQ4_XS": 0.04,
    "Q3_K": 0.075,
    "IQ3_S": 0.075,
    "IQ3_XXS": 0.075,
    "Q2_K": 0.15,
    "IQ2_XXS": 0.16,
    "IQ2_XS": 0.16,
    "IQ2_S": 0.16,
    "IQ1_M": 0.13,
    "IQ1_S": 1e-6,
    "TQ1_0": 1e-6,
    "TQ2_0": 1e-6,
}
# Logits, max |difference| / max |logit| over the prompt. The float import (dequantize=True:
# the file's own weights) is 1.3-3.3 % off llama.cpp, which rounds the activations to 8 bits
# for its quantized dot products: FLOAT_TO_LLAMA. Files whose weights come back exactly (bar the
# Q6_K output layer's 8 bits) stay as close, 1.4-3.3 % (NVFP4 2.0 %): EXACT_TO_LLAMA, the
# default. Re-quantized weights move these tiny random models' logits by 11-48 % (the file's
# own quantization moved them 27-94 % from transformers'); measured per file type: q2_k 42.7 %,
# q3_k_m 22.2, iq4_nl 11.3, iq4_xs 10.6, iq3_s 19.3, iq3_xxs 20.4, iq2_xs 47.0, iq1_s 31.1,
# iq1_m 41.2.
LLAMA_TOLERANCE = {
    "q2_k": 0.55,
    "q3_k_m": 0.3,
    "iq4_nl": 0.15,
    "iq4_xs": 0.15,
    "iq3_s": 0.25,
    "iq3_xxs": 0.27,
    "iq2_xs": 0.6,
    "iq1_s": 0.4,
    "iq1_m": 0.55,
}
EXACT_TO_LLAMA = 0.05
FLOAT_TO_LLAMA = 0.05
# The re-quantization moves the logits (from the float import's) by at most this share of what
# the file's own quantization moved them (float import against transformers'): 0.33-0.62
# measured, as K_QUANT_BITS's rule (re-rounding error at most half the file's own) intends.
REQUANT_SHARE = 0.7

CONFIG = {  # K and IQ types need rows of 256 weights
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "initializer_range": 0.05,
    "tie_word_embeddings": False,
}

# llama.cpp's quantizer with a uniform importance matrix (every input channel weighted alike).
_QUANTIZE_CODE = r"""
import ctypes, json, sys, llama_cpp
inp, out, ftype, rows = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
lib = llama_cpp.llama_cpp
ones = {n: (ctypes.c_float * n)(*[1.0] * n) for n in set(rows.values())}
entries = [lib.llama_model_imatrix_data(name.encode(), ctypes.cast(ones[n], ctypes.POINTER(ctypes.c_float)), n) for name, n in rows.items()]
imatrix = (lib.llama_model_imatrix_data * (len(entries) + 1))(*entries)
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = getattr(llama_cpp, "LLAMA_FTYPE_MOSTLY_" + ftype)
params.nthread = 2
params.imatrix = ctypes.cast(imatrix, ctypes.POINTER(lib.llama_model_imatrix_data))
sys.exit(1 if llama_cpp.llama_model_quantize(inp.encode(), out.encode(), ctypes.byref(params)) else 0)
"""


def quantize(f16: Path, out: Path, ftype: str) -> None:
    """llama.cpp's quantizer: mlx_to_gguf's where it offers the type, else with an imatrix."""
    if ftype in QUANTIZER_TYPES:
        _quantize(f16, out, ftype, lambda *_: None, 2)
        return
    rows = {n: i["shape"][-1] for n, i in read_gguf(f16)[1].items() if len(i["shape"]) == 2}
    args = [str(f16), str(out), ftype.upper(), json.dumps(rows)]
    run = subprocess.run([sys.executable, "-c", _QUANTIZE_CODE, *args], capture_output=True)
    assert run.returncode == 0, run.stderr.decode()[-2000:]


class _Traits(ctypes.Structure):  # ggml.h's struct ggml_type_traits
    _fields_ = [
        ("type_name", ctypes.c_char_p),
        ("blck_size", ctypes.c_int64),
        ("blck_size_interleave", ctypes.c_int64),
        ("type_size", ctypes.c_size_t),
        ("is_quantized", ctypes.c_bool),
        ("to_float", ctypes.c_void_p),
        ("from_float_ref", ctypes.c_void_p),
    ]


def ggml() -> ctypes.CDLL:
    """llama-cpp-python's ggml library: its own quantizer and decoders."""
    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    lib.ggml_get_type_traits.restype = ctypes.POINTER(_Traits)
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
    lib.ggml_quantize_chunk.argtypes += [ctypes.c_int64] * 3 + [ctypes.c_void_p]
    return lib


GGML_IDS = {name: i for i, name in g2m.GGML_TYPES.items()}


def ggml_dequantize(raw: np.ndarray, kind: str, count: int) -> np.ndarray:
    """ggml's own decoder (``to_float`` of its type traits), for the types gguf-py lacks."""
    to_float = ggml().ggml_get_type_traits(GGML_IDS[kind]).contents.to_float
    decode = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)(to_float)
    out, raw = np.zeros(count, np.float32), np.ascontiguousarray(raw)
    decode(raw.ctypes.data, out.ctypes.data, count)
    return out


def ggml_quantize(w: np.ndarray, kind: str) -> bytes:
    """A float32 matrix quantized by ggml's own quantizer (no importance matrix)."""
    w = np.ascontiguousarray(w, np.float32)
    size, nbytes = g2m.BLOCKS[kind]
    out = np.zeros(w.size // size * nbytes, np.uint8)
    done = ggml().ggml_quantize_chunk(
        GGML_IDS[kind], w.ctypes.data, out.ctypes.data, 0, w.shape[0], w.shape[1], None
    )
    assert done == out.size
    return out.tobytes()


def reference(path: Path, info: dict) -> np.ndarray:
    """A GGUF tensor as float32, decoded by gguf-py (by ggml itself for Q1_0/Q2_0)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    kind, shape = info["type"], info["shape"]
    count = int(np.prod(shape))
    if kind in ("F32", "F16"):
        w = np.fromfile(path, "<f4" if kind == "F32" else "<f2", count, offset=info["offset"])
        return w.astype(np.float32).reshape(shape)
    size, nbytes = g2m.BLOCKS[kind]
    raw = np.fromfile(path, np.uint8, count // size * nbytes, offset=info["offset"])
    if kind in ("Q1_0", "Q2_0"):
        return ggml_dequantize(raw, kind, count).reshape(shape)
    rows = raw.reshape(-1, shape[-1] // size * nbytes)
    return dequantize(rows, GGMLQuantizationType[kind]).reshape(shape)


def expected_weights(path: Path) -> dict[str, tuple[str, np.ndarray]]:
    """Per MLX module: (GGML type, the file's float32 weights as the MLX model holds them)."""
    out = {}
    for name, info in read_gguf(path)[1].items():
        base, leaf = name.rsplit(".", 1)
        if leaf != "weight" or len(info["shape"]) < 2:
            continue
        module = g2m._mlx_name(base, "llama")
        w = reference(path, info)
        if module.endswith(("q_proj", "k_proj")):  # llama.cpp's row permutation, undone
            heads = CONFIG["num_attention_heads" if "q_proj" in module else "num_key_value_heads"]
            w = np.array(g2m._unpermute(mx.array(w), heads))
        out[module] = (info["type"], w)
    return out


def mlx_weights(folder: Path) -> tuple[dict[str, np.ndarray], dict]:
    """(the folder's matrices per module, quantized ones decoded to float32; quantization)."""
    quant = json.loads((folder / "config.json").read_text()).get("quantization") or {}
    raw = mx.load(str(folder / "model.safetensors"))
    out = {}
    for name, w in raw.items():
        module, leaf = name.rsplit(".", 1)
        if leaf != "weight" or w.ndim < 2:
            continue
        if f"{module}.scales" in raw:
            spec = quant.get(module, quant)
            scales, biases = raw[f"{module}.scales"], raw.get(f"{module}.biases")
            if spec["mode"] == "affine":
                scales, biases = scales.astype(mx.float32), biases.astype(mx.float32)
            w = mx.dequantize(
                w, scales, biases, group_size=spec["group_size"], bits=spec["bits"],
                mode=spec["mode"], dtype=mx.float32,
            )  # fmt: skip
        out[module] = np.array(w.astype(mx.float32))
    return out, quant


def rms_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def mlx_logits(folder: Path, ids: list[int]):
    """(logits over the prompt, model, tokenizer) of an imported folder, via mlx_lm.load."""
    from mlx_lm import load

    model, tok = load(str(folder))
    return np.array(model(mx.array([ids]))[0].astype(mx.float32)), model, tok


def llama_logits(path: Path, ids: list[int]):
    llm = llama(path)
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)]), llm


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """(F16 GGUF, prompt ids, transformers' logits) of the tiny random llama."""
    work = tmp_path_factory.mktemp("quant-types")
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tm.byte_bpe(tm.CORPUS, 300, SPECIAL), eos_token=EOS, pad_token=PAD
    )
    hf_dir = work / "hf"
    hf_dir.mkdir()
    tok.save_pretrained(hf_dir)
    eos = tok.convert_tokens_to_ids(EOS)
    config = transformers.LlamaConfig(**CONFIG, vocab_size=len(tok), eos_token_id=eos)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(config).eval()
    hf.save_pretrained(hf_dir)
    ids = tok.encode(PROMPT, add_special_tokens=False)
    with torch.no_grad():
        logits = hf(torch.tensor([ids])).logits[0].numpy()
    return mlx_to_gguf(hf_dir, work / "f16.gguf", "f16", pre_tokenizer=PRE), ids, logits


@pytest.fixture(scope="module")
def imported(model):
    """(file type, dequantize) -> (GGUF from llama.cpp's quantizer, its MLX import), made once."""
    made = {}

    def get(ftype: str, dequantize: bool) -> tuple[Path, Path]:
        gguf = model[0].with_name(f"{ftype}.gguf")
        if not gguf.exists():
            quantize(model[0], gguf, ftype)
        if (ftype, dequantize) not in made:
            out = gguf.with_name(f"{ftype}-{'float' if dequantize else 'mlx'}")
            made[ftype, dequantize] = convert_gguf(gguf, out, "float32", dequantize)
        return gguf, made[ftype, dequantize]

    return get


@pytest.mark.parametrize("ftype", list(FILE_TYPES))
def test_quant_type_imports(ftype, model, imported):
    _, ids, hf_logits = model
    gguf, out = imported(ftype, False)
    want = expected_weights(gguf)
    types = sorted({kind for kind, _ in want.values()})
    assert FILE_TYPES[ftype] in types, types

    got, quant = mlx_weights(out)
    assert set(got) == set(want)
    errors = {}
    for module, (kind, w) in want.items():
        spec = quant.get(module, quant)
        if kind in g2m.K_QUANT_BITS:
            assert spec["bits"] == g2m.K_QUANT_BITS[kind], (module, kind, spec)
            errors[kind] = max(errors.get(kind, 0.0), rms_error(got[module], w))
            assert errors[kind] <= WEIGHT_TOLERANCE[kind], f"{module} ({kind}): {errors[kind]}"
        else:
            assert np.array_equal(got[module], w), f"{module} ({kind}) is not exact"
            mode = g2m.FP4_TYPES.get(kind, ("affine",))[0]
            assert (spec["bits"], spec["mode"]) == (g2m.AFFINE_BITS.get(kind, 4), mode)

    logits, mlx_model, tok = mlx_logits(out, ids)
    assert tok.encode(PROMPT, add_special_tokens=False) == ids
    float_logits = mlx_logits(imported(ftype, True)[1], ids)[0]
    want_logits, llm = llama_logits(gguf, ids)
    to_llama, float_to_llama = (relative_error(x, want_logits) for x in (logits, float_logits))
    requant, own = relative_error(logits, float_logits), relative_error(float_logits, hf_logits)
    assert float_to_llama < FLOAT_TO_LLAMA, f"float import {float_to_llama:.3f} off llama.cpp"
    assert to_llama < LLAMA_TOLERANCE.get(ftype, EXACT_TO_LLAMA), f"{to_llama:.3f} off llama.cpp"
    assert requant <= REQUANT_SHARE * own, f"re-quantization moved logits {requant / own:.0%}"
    _, llama_ids = llama_greedy(llm, PROMPT, 8)
    mlx_ids = tm.greedy_ids(mlx_model, tok, PROMPT, 8)
    report = {
        "types": types,
        "weight_rms_err": {k: round(v, 5) for k, v in errors.items()},
        "logits_vs_llama": round(to_llama, 4),
        "float_import_vs_llama": round(float_to_llama, 4),
        "requant_vs_float_import": round(requant, 4),
        "float_import_vs_hf": round(own, 4),
        "top1_agree_llama": float((logits.argmax(-1) == want_logits.argmax(-1)).mean()),
        "greedy_equal_llama": mlx_ids == llama_ids,
    }
    print(json.dumps({ftype: report}))


def test_the_files_hold_every_quantized_type(imported):
    seen = {i["type"] for f in FILE_TYPES for i in read_gguf(imported(f, False)[0])[1].values()}
    others = {"Q4_0", "Q4_1", "Q8_0", "MXFP4", "NVFP4"}  # elsewhere (see FILE_TYPES), NVFP4 below
    missing = g2m.SUPPORTED_TYPES - g2m.FLOAT_TYPES - others - seen
    assert not missing, missing


@pytest.mark.parametrize("ftype", ["q3_k_m", "q5_0", "iq3_xxs", "iq1_m", "tq1_0", "q1_0", "q2_0"])
def test_dequantize_gives_the_files_floats(ftype, imported):
    """dequantize=True: plain float32 matrices, each equal to gguf-py's dequantize."""
    gguf, out = imported(ftype, True)
    assert "quantization" not in json.loads((out / "config.json").read_text())
    got, _ = mlx_weights(out)
    want = expected_weights(gguf)
    assert set(got) == set(want)
    for module, (kind, w) in want.items():
        assert np.array_equal(got[module], w), f"{module} ({kind})"


def test_nvfp4_repacks_losslessly(model, tmp_path):
    """NVFP4 matrices (ggml's quantizer; llama.cpp's model quantizer cannot write the type)
    become MLX nvfp4 quantization (groups of 16) decoding to gguf-py's weights exactly."""
    f16, ids, _ = model
    metadata, tensors = read_gguf(f16)
    metadata.pop("general.alignment", None)
    data = {}
    for name, info in tensors.items():
        w = reference(f16, info)
        data[name] = ("NVFP4", w.shape, ggml_quantize(w, "NVFP4")) if w.ndim == 2 else w
    gguf = tmp_path / "nvfp4.gguf"
    write_gguf(gguf, metadata, data)

    out = convert_gguf(gguf, tmp_path / "mlx", dtype="float32")
    got, quant = mlx_weights(out)
    assert quant["mode"] == "nvfp4" and quant["group_size"] == 16 and quant["bits"] == 4
    for module, (kind, w) in expected_weights(gguf).items():
        assert kind == "NVFP4" and np.array_equal(got[module], w), module
    flat = convert_gguf(gguf, tmp_path / "float", dtype="float32", dequantize=True)
    logits, float_logits = mlx_logits(out, ids)[0], mlx_logits(flat, ids)[0]
    assert relative_error(logits, float_logits) < 1e-4
    to_llama = relative_error(logits, llama_logits(gguf, ids)[0])
    print(json.dumps({"nvfp4": {"logits_vs_llama": round(to_llama, 4)}}))
    assert to_llama < EXACT_TO_LLAMA
