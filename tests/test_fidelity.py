"""Teacher-forced agreement between the float32 SmolLM2 import and llama.cpp.

Two references are run over the same token ids:

* llama.cpp on an F32 GGUF holding exactly the bundled Q4_1 weights,
  dequantized here with numpy from the raw GGUF blocks (independently of
  mx.load), with an F32 KV cache. This isolates import errors (tensor
  mapping, Q/K permutation, rope, norms, tokenizer): expect ~100% top-1.
* llama.cpp on the bundled Q4_1 GGUF itself, default settings. llama.cpp
  quantizes activations (Q8) for its quantized dot products and keeps an F16
  KV cache, so near-tied top tokens swap; the same run on the F32 GGUF shows
  how much of the gap is llama.cpp's own.

Set MLXB_FIDELITY_OUT=path to get the figures as JSON; set
MLXB_REQUIRE_LLAMA_CPP=1 to fail instead of skipping without llama_cpp.
"""

import json
import os
import time

import mlx.core as mx
import numpy as np
import pytest

from converters.gguf_to_mlx import convert_gguf, read_gguf, write_gguf

TEXT = """The history of the lighthouse is closely tied to the history of navigation. Long before electric lamps, \
sailors relied on fires built on hilltops to warn them of rocky coasts and to guide them toward safe harbors. The \
most famous of the ancient lighthouses stood at Alexandria, in Egypt, where a tall tower of white stone carried a \
fire that could be seen from far out at sea. Travelers wrote that its light was visible for many miles, and the \
building became one of the wonders of the ancient world.

During the Middle Ages, fewer lighthouses were built, but the growth of trade in the sixteenth and seventeenth \
centuries brought a new demand for them. Merchants and governments paid for towers along busy shipping routes, and \
the keepers who lived in them tended oil lamps through long winter nights. The work was lonely and often dangerous. \
Storms could cut a keeper off from the mainland for weeks, and supplies of food and fuel had to be carefully rationed.

In the nineteenth century, engineers made great improvements. A French physicist designed a new kind of lens that \
gathered light from the lamp and focused it into a powerful beam. With this lens, a small flame could be seen more \
than twenty miles away. Later, electric lights and clockwork machines that turned the lens made each lighthouse \
easier to run and easier to recognize, because every station could flash its own pattern.

Today, most lighthouses are automatic, and satellite navigation tells ships exactly where they are. Yet many of the \
old towers still stand, cared for by local groups who open them to visitors. People climb the narrow stairs to look \
out over the water, and they imagine the keepers who once watched the sea through the night, keeping the light \
burning so that others could come home safely."""

MIN_AGREEMENT = 0.99
GGML_F32 = 0


@pytest.fixture(scope="module")
def llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        if os.environ.get("MLXB_REQUIRE_LLAMA_CPP") == "1":
            pytest.fail("llama_cpp is not importable but MLXB_REQUIRE_LLAMA_CPP=1")
        pytest.skip("llama_cpp (llama-cpp-python) is not installed")
    return llama_cpp


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("fidelity")


def _dequantize_block(kind: str, raw: np.ndarray, n: int) -> np.ndarray:
    """GGML Q4_1 / Q8_0 block layouts, decoded with numpy into float32."""
    if kind == "Q8_0":  # per 32: f16 d, int8 q[32]; x = d * q
        blocks = raw.reshape(-1, 34)
        d = blocks[:, :2].copy().view("<f2").astype(np.float32)
        q = blocks[:, 2:].view(np.int8).astype(np.float32)
        return (d * q).reshape(n)
    if kind == "Q4_1":  # per 32: f16 d, f16 m, u8 qs[16]; low nibbles are x[0:16], high x[16:32]
        blocks = raw.reshape(-1, 20)
        d = blocks[:, 0:2].copy().view("<f2").astype(np.float32)
        m = blocks[:, 2:4].copy().view("<f2").astype(np.float32)
        qs = blocks[:, 4:]
        q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float32)
        return (d * q + m).reshape(n)
    raise ValueError(kind)


def write_f32_reference(src, dst):
    """Re-encode a Q4_1/Q8_0/F32 GGUF as an all-F32 GGUF with the same metadata."""
    metadata, tensors = read_gguf(src)
    metadata = dict(metadata, **{"general.file_type": 0})
    block = {"Q8_0": (32, 34), "Q4_1": (32, 20), "F32": (1, 4)}
    out = {}
    for name, info in tensors.items():
        n = int(np.prod(info["shape"]))
        per, size = block[info["type"]]
        raw = np.fromfile(src, dtype=np.uint8, count=n // per * size, offset=info["offset"])
        values = (
            raw.view("<f4") if info["type"] == "F32" else _dequantize_block(info["type"], raw, n)
        )
        out[name] = values.astype(np.float32).reshape(info["shape"])
    write_gguf(dst, metadata, out)
    return dst


def llama_logits(llama_cpp, path, ids=None, **kwargs):
    llm = llama_cpp.Llama(
        str(path),
        n_ctx=1024,
        n_batch=512,
        logits_all=True,
        n_threads=os.cpu_count(),
        verbose=False,
        **kwargs,
    )
    if ids is None:
        ids = llm.tokenize(TEXT.encode("utf-8"), add_bos=False, special=False)
    llm.reset()
    llm.eval(ids)
    logits = np.array(llm.scores[: len(ids)], dtype=np.float32)
    llm.close()
    return ids, logits


def compare(reference: np.ndarray, ours: np.ndarray) -> dict:
    """Top-1 agreement and mean |Δ logprob| of the reference's top token."""

    def log_softmax(x):
        x = x.astype(np.float64)
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    top = reference.argmax(-1)
    rows = np.arange(len(top))
    dlp = np.abs(log_softmax(reference)[rows, top] - log_softmax(ours)[rows, top])
    return {
        "tokens": int(len(top)),
        "top1_agreement": float((top == ours.argmax(-1)).mean()),
        "mean_abs_dlogprob_top": float(dlp.mean()),
        "max_abs_dlogit": float(np.abs(reference - ours).max()),
    }


@pytest.mark.slow
def test_top1_agreement_with_llama_cpp(llama_cpp, gguf, work, capsys):
    from mlx_lm import load

    t = time.perf_counter()
    folder = convert_gguf(gguf, work / "smollm2-f32", dtype="float32", dequantize=True)
    convert_s = time.perf_counter() - t
    f32_gguf = write_f32_reference(gguf, work / "smollm2-f32.gguf")

    ids, ref_q4 = llama_logits(llama_cpp, gguf)
    assert len(ids) >= 200
    _, ref_f32 = llama_logits(llama_cpp, f32_gguf, ids, type_k=GGML_F32, type_v=GGML_F32)

    model, tokenizer = load(str(folder))
    assert tokenizer.encode(TEXT, add_special_tokens=False) == ids
    ours = model(mx.array(ids)[None])[0].astype(mx.float32)
    ours = np.array(ours)

    results = {
        "gguf": gguf.name,
        "conversion_s": round(convert_s, 2),
        "vs_llama_cpp_f32_weights": compare(ref_f32, ours),
        "vs_llama_cpp_q4_1": compare(ref_q4, ours),
        "llama_cpp_q4_1_vs_llama_cpp_f32_weights": compare(ref_q4, ref_f32),
    }
    with capsys.disabled():
        print("\nfidelity:", json.dumps(results, indent=2))
    if path := os.environ.get("MLXB_FIDELITY_OUT"):
        with open(path, "w") as f:
            json.dump(results, f, indent=2)

    exact = results["vs_llama_cpp_f32_weights"]
    q4 = results["vs_llama_cpp_q4_1"]
    own = results["llama_cpp_q4_1_vs_llama_cpp_f32_weights"]
    # The import itself: same weights, unquantized activations on both sides.
    assert exact["top1_agreement"] >= MIN_AGREEMENT
    assert exact["mean_abs_dlogprob_top"] < 1e-3
    # Against llama.cpp's quantized kernels we can only be as close as llama.cpp
    # is to itself running the same weights unquantized.
    assert q4["top1_agreement"] >= own["top1_agreement"] - 0.01
    assert q4["top1_agreement"] >= 0.95
    assert q4["mean_abs_dlogprob_top"] < 0.1
