"""GGUF and Hugging Face converters, and the bundled default model."""

import importlib.util
import json
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from converters import gguf_to_mlx
from converters.gguf_to_mlx import convert_gguf, read_gguf, write_gguf
from converters.hf_to_mlx import convert_hf
from mlxbackend import default_model

QUESTION = "What is the capital of France?"
TOKENIZER_SAMPLES = [
    "Hello world",
    " leading space and trailing space ",
    "multiple   spaces\tand\ttabs\n\n\nnewlines  ",
    "Numbers 1234567 and 3.14159, 2024-01-01",
    "Unicode: café naïve Ωμέγα 日本語 🤖🚀 Ünïcödé \u00a0nbsp\u200bzwsp ﬁ ① ²",
    "emoji 👨‍👩‍👧‍👦 family",
    "def f(x):\n    return x**2  # square\n\nprint(f'{f(3)}')\n",
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "a<file_sep>b<jupyter_code>c<|endoftext|>",
    "it's I'm we'll they'd YOU'RE",
    "   ",
    "",
]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("converters")


@pytest.fixture(scope="module")
def native_dir(work, gguf):
    t = time.perf_counter()
    out = convert_gguf(gguf, work / "native")
    print(f"\nnative-quantized conversion: {time.perf_counter() - t:.1f} s")
    return out


@pytest.fixture(scope="module")
def f32_dir(work, gguf):
    t = time.perf_counter()
    out = convert_gguf(gguf, work / "f32", dtype="float32", dequantize=True)
    print(f"\nfloat32 conversion: {time.perf_counter() - t:.1f} s")
    return out


def answer(folder: Path, max_tokens: int = 20) -> str:
    from mlx_lm import generate, load

    model, tokenizer = load(str(folder))
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": QUESTION}], add_generation_prompt=True
    )
    return generate(model, tokenizer, prompt, max_tokens=max_tokens)


def config_of(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


# ---------------------------------------------------------------------------
# GGUF import of the bundled SmolLM2


def test_native_quantized_import(native_dir):
    config = config_of(native_dir)
    assert config["rope_theta"] == 100000.0
    assert config["tie_word_embeddings"] is True
    quant = config["quantization"]
    assert (quant["group_size"], quant["bits"], quant["mode"]) == (32, 4, "affine")
    assert quant["model.embed_tokens"]["bits"] == 8  # Q8_0 embedding
    gen = json.loads((native_dir / "generation_config.json").read_text())
    assert gen["eos_token_id"] == 2
    assert not list(native_dir.parent.glob(".native.tmp-*"))
    assert "Paris" in answer(native_dir)


def test_float32_dequantized_import(f32_dir):
    from mlx_lm import load

    config = config_of(f32_dir)
    assert "quantization" not in config
    assert config["torch_dtype"] == "float32"
    model, _ = load(str(f32_dir))
    assert all(v.dtype == mx.float32 for _, v in tree_flatten(model.parameters()))
    assert not any(isinstance(m, nn.QuantizedLinear) for _, m in model.named_modules())
    text = answer(f32_dir)
    print(f"\nfloat32 answer: {text!r}")
    assert "Paris" in text


def _reference_tokenizer(gguf: Path):
    """Tokenize with llama.cpp if available, else transformers' GGUF loader."""
    if importlib.util.find_spec("llama_cpp") is not None:
        import llama_cpp

        llm = llama_cpp.Llama(str(gguf), vocab_only=True, verbose=False)
        return "llama.cpp", lambda s: llm.tokenize(s.encode("utf-8"), add_bos=False, special=True)
    if importlib.util.find_spec("gguf") is not None:
        from transformers import AutoTokenizer

        ref = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        return "transformers-gguf", lambda s: ref.encode(s, add_special_tokens=False)
    pytest.skip("neither llama_cpp nor gguf is installed: no reference tokenizer")


def test_tokenizer_matches_gguf(f32_dir, gguf):
    from transformers import AutoTokenizer

    name, reference = _reference_tokenizer(gguf)
    ours = AutoTokenizer.from_pretrained(str(f32_dir))
    for text in TOKENIZER_SAMPLES:
        ids = ours.encode(text, add_special_tokens=False)
        assert ids == reference(text), f"{name} tokenizes {text!r} differently"
        assert ours.decode(ids) == text
    assert ours.encode("<|im_end|>", add_special_tokens=False) == [2]
    assert ours.eos_token == "<|im_end|>"
    assert ours.chat_template


def test_refuses_existing_out_dir(tmp_path, gguf):
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        convert_gguf(gguf, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_non_gguf_file_is_value_error(tmp_path):
    text = tmp_path / "model.gguf"
    text.write_text("this is not a gguf file")
    with pytest.raises(ValueError, match="not a GGUF"):
        convert_gguf(text, tmp_path / "out")
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(b"GGUF\x03\x00\x00\x00\x05")
    with pytest.raises(ValueError, match="GGUF"):
        convert_gguf(truncated, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------
# Synthetic GGUFs: other tensor types, qwen2, error messages


def _tiny_gguf(path, gguf, arch="llama", extra_types=None, tokenizer_model="gpt2"):
    """A random 2-layer model with SmolLM2's tokenizer; returns expected MLX weights."""
    meta, _ = read_gguf(gguf)
    hidden, heads, kv_heads, ffn, vocab = 64, 4, 2, 128, len(meta["tokenizer.ggml.tokens"])
    head_dim = hidden // heads
    metadata = {k: v for k, v in meta.items() if k.startswith("tokenizer.")}
    metadata["tokenizer.ggml.model"] = tokenizer_model
    metadata.update(
        {
            "general.architecture": arch,
            f"{arch}.block_count": 2,
            f"{arch}.embedding_length": hidden,
            f"{arch}.feed_forward_length": ffn,
            f"{arch}.attention.head_count": heads,
            f"{arch}.attention.head_count_kv": kv_heads,
            f"{arch}.rope.dimension_count": head_dim,
            f"{arch}.context_length": 512,
            f"{arch}.attention.layer_norm_rms_epsilon": 1e-6,
            f"{arch}.rope.freq_base": 50000.0,
        }
    )
    rng = np.random.default_rng(0)

    def rand(*shape):
        return (rng.standard_normal(shape) * 0.05).astype(np.float32)

    def permute(w, n):  # llama.cpp's convert_hf_to_gguf permutation
        return w.reshape(n, 2, w.shape[0] // n // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    expected = {
        "model.embed_tokens.weight": rand(vocab, hidden),
        "model.norm.weight": 1 + rand(hidden),
    }
    tensors = {
        "token_embd.weight": expected["model.embed_tokens.weight"],
        "output_norm.weight": expected["model.norm.weight"],
    }
    for i in range(2):
        p = f"model.layers.{i}"
        layer = {
            "attn_norm.weight": (f"{p}.input_layernorm.weight", 1 + rand(hidden)),
            "ffn_norm.weight": (f"{p}.post_attention_layernorm.weight", 1 + rand(hidden)),
            "attn_q.weight": (f"{p}.self_attn.q_proj.weight", rand(hidden, hidden)),
            "attn_k.weight": (f"{p}.self_attn.k_proj.weight", rand(kv_heads * head_dim, hidden)),
            "attn_v.weight": (f"{p}.self_attn.v_proj.weight", rand(kv_heads * head_dim, hidden)),
            "attn_output.weight": (f"{p}.self_attn.o_proj.weight", rand(hidden, hidden)),
            "ffn_gate.weight": (f"{p}.mlp.gate_proj.weight", rand(ffn, hidden)),
            "ffn_up.weight": (f"{p}.mlp.up_proj.weight", rand(ffn, hidden)),
            "ffn_down.weight": (f"{p}.mlp.down_proj.weight", rand(hidden, ffn)),
        }
        if arch == "qwen2":
            for proj, rows in (
                ("q", hidden),
                ("k", kv_heads * head_dim),
                ("v", kv_heads * head_dim),
            ):
                layer[f"attn_{proj}.bias"] = (f"{p}.self_attn.{proj}_proj.bias", rand(rows))
        if arch == "qwen3":
            for proj in ("q", "k"):
                layer[f"attn_{proj}_norm.weight"] = (
                    f"{p}.self_attn.{proj}_norm.weight",
                    1 + rand(head_dim),
                )
        for gname, (mname, w) in layer.items():
            expected[mname] = w
            if arch == "llama" and gname.startswith(("attn_q.", "attn_k.")):
                w = permute(w, heads if gname.startswith("attn_q") else kv_heads)
            tensors[f"blk.{i}.{gname}"] = w
    # Exercise the F16 and BF16 paths: the expected values are the rounded ones.
    half = expected["model.layers.0.mlp.up_proj.weight"].astype(np.float16)
    tensors["blk.0.ffn_up.weight"] = half
    expected["model.layers.0.mlp.up_proj.weight"] = half.astype(np.float32)
    bf = expected["model.layers.1.mlp.up_proj.weight"].view(np.uint32) & 0xFFFF0000
    tensors["blk.1.ffn_up.weight"] = ("BF16", bf.shape, (bf >> 16).astype("<u2").tobytes())
    expected["model.layers.1.mlp.up_proj.weight"] = bf.view(np.float32)
    for name, kind in (extra_types or {}).items():
        shape = tensors[name].shape
        block_bytes = {"Q5_0": 22, "IQ4_NL": 18, "Q8_1": 36}[kind]
        tensors[name] = (kind, shape, bytes(shape[0] * shape[1] // 32 * block_bytes))
    write_gguf(path, metadata, tensors)
    return expected


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_synthetic_import_exact(tmp_path, gguf, arch):
    from mlx_lm import load

    expected = _tiny_gguf(tmp_path / "tiny.gguf", gguf, arch=arch)
    out = convert_gguf(tmp_path / "tiny.gguf", tmp_path / "tiny")
    model, _, config = load(str(out), return_config=True)
    assert config["model_type"] == arch and config["rope_theta"] == 50000.0
    assert config["rms_norm_eps"] == 1e-6
    params = dict(tree_flatten(model.parameters()))
    assert set(params) == set(expected)
    for name, want in expected.items():
        assert np.array_equal(np.array(params[name]), want), name
    logits = model(mx.array([[1, 2, 3, 4]]))
    assert logits.shape == (1, 4, len(expected["model.embed_tokens.weight"]))


def test_unsupported_inputs_are_value_errors(tmp_path, gguf):
    # Q8_1 is llama.cpp's activation type, never stored in model files
    _tiny_gguf(tmp_path / "q8_1.gguf", gguf, extra_types={"blk.0.ffn_down.weight": "Q8_1"})
    with pytest.raises(ValueError, match=r"unsupported GGUF tensor type\(s\) Q8_1 \(1 tensors\)"):
        convert_gguf(tmp_path / "q8_1.gguf", tmp_path / "out")
    _tiny_gguf(tmp_path / "mamba.gguf", gguf, arch="mamba")
    with pytest.raises(ValueError, match=r"'mamba'.*supported: llama, qwen2, qwen3, gemma"):
        convert_gguf(tmp_path / "mamba.gguf", tmp_path / "out")
    _tiny_gguf(tmp_path / "wpm.gguf", gguf, tokenizer_model="bert")
    with pytest.raises(ValueError, match="'bert'"):
        convert_gguf(tmp_path / "wpm.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.tmp-*"))


def test_cli_writes_float32_folder(tmp_path, gguf, capsys):
    _tiny_gguf(tmp_path / "tiny.gguf", gguf)
    rc = gguf_to_mlx.main(
        [str(tmp_path / "tiny.gguf"), str(tmp_path / "cli"), "--dtype", "float32", "--dequantize"]
    )
    assert rc == 0 and (tmp_path / "cli" / "model.safetensors").is_file()
    assert gguf_to_mlx.main([str(tmp_path / "tiny.gguf"), str(tmp_path / "cli")]) == 2
    assert "already exists" in capsys.readouterr().err


# ---------------------------------------------------------------------------
# Hugging Face / MLX folder conversion


def test_hf_quantize_float32_to_4bit(f32_dir, work):
    from mlx_lm import load

    t = time.perf_counter()
    out = convert_hf(f32_dir, work / "q4", quantize=True, q_bits=4)
    print(f"\nhf_to_mlx 4-bit quantization: {time.perf_counter() - t:.1f} s")
    config = config_of(out)
    assert config["quantization"]["bits"] == 4 and config["quantization"]["group_size"] == 64
    assert config["rope_theta"] == 100000.0
    model, _ = load(str(out))
    assert any(isinstance(m, nn.QuantizedLinear) for _, m in model.named_modules())
    text = answer(out, max_tokens=12)
    print(f"4-bit answer: {text!r}")
    assert text.strip()


def test_hf_rope_theta_fix(tmp_path, f32_dir):
    from converters.hf_to_mlx import fix_rope_config

    folder = tmp_path / "cfg"
    folder.mkdir()
    config = config_of(f32_dir)
    theta = config.pop("rope_theta")
    config["rope_parameters"] = {"rope_theta": theta, "rope_type": "default"}
    (folder / "config.json").write_text(json.dumps(config))
    assert fix_rope_config(folder)
    fixed = config_of(folder)
    assert fixed["rope_theta"] == theta and "rope_scaling" not in fixed


def test_hf_unknown_hub_id_offline(tmp_path):
    with pytest.raises(FileNotFoundError, match="cache"):
        convert_hf("no-such-org/no-such-model-mlxb", tmp_path / "out", offline=True)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------
# Default model


def test_ensure_default_model_idempotent(tmp_path, gguf):
    t = time.perf_counter()
    folder = default_model.ensure_default_model(tmp_path)
    first = time.perf_counter() - t
    assert folder == tmp_path / default_model.DEFAULT_MODEL_NAME
    assert default_model.is_model_folder(folder)
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    t = time.perf_counter()
    assert default_model.ensure_default_model(tmp_path) == folder
    second = time.perf_counter() - t
    print(f"\nensure_default_model: first {first:.1f} s, second {second * 1000:.1f} ms")
    assert second < 0.5
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [default_model.DEFAULT_MODEL_NAME]


def test_ensure_default_model_atomic(tmp_path, gguf, monkeypatch):
    def fail(folder, weights):
        (folder / "model.safetensors").write_bytes(b"partial")
        raise RuntimeError("simulated crash while saving")

    monkeypatch.setattr(gguf_to_mlx, "save_weights", fail)
    with pytest.raises(RuntimeError, match="simulated"):
        default_model.ensure_default_model(tmp_path, dtype="native")
    assert not (tmp_path / default_model.DEFAULT_MODEL_NAME).exists()
    assert list(tmp_path.iterdir()) == []


def test_bundled_gguf_lookup(gguf):
    assert default_model.bundled_gguf() == gguf
    assert gguf.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and gguf.stat().st_size > 50_000_000
