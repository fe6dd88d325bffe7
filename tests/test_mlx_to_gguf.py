"""MLX/HF folder -> GGUF through llama.cpp's own converter and quantizer, checked in llama.cpp.

The tiny test model uses a custom-trained byte-level BPE vocabulary, which llama.cpp's converter
cannot identify by hash, so every conversion passes ``pre_tokenizer="gpt-2"`` (its
pre-tokenization is GPT-2's regex, and the tests check llama.cpp tokenizes prompts identically).
"""

import json
import os
import shutil
import subprocess
import sys

import llama_cpp
import pytest

from converters.llama_cpp_tools import (
    LLAMA_CPP_PYTHON_VERSION,
    MARKER,
    ToolsMissing,
    ensure_llama_cpp_tools,
)
from converters.mlx_to_gguf import (
    SUPPORTED_TYPES,
    GGUFConversionError,
    mlx_to_gguf,
    normalize_qtype,
)
from tests import tiny_model as tm
from tests.conftest import ROOT

PRE = "gpt-2"


@pytest.fixture(scope="module")
def mlx_trained(trained_dir):
    from mlx_lm.utils import load

    return load(str(trained_dir))


def llama(path) -> llama_cpp.Llama:
    return llama_cpp.Llama(model_path=str(path), verbose=False, n_ctx=1024, n_threads=2)


def llama_greedy(llm, prompt: str, max_tokens: int) -> tuple[list[int], list[int]]:
    """(prompt ids, greedy continuation ids incl. EOS) from llama.cpp."""
    ids = llm.tokenize(prompt.encode(), add_bos=False, special=True)
    out = []
    for token in llm.generate(ids, temp=0.0, top_k=1, reset=True):
        out.append(token)
        if len(out) >= max_tokens or token == llm.token_eos():
            break
    return ids, out


def leftovers(folder, keep=()):
    return sorted(p.name for p in folder.iterdir() if p.name not in keep)


def assert_matches_mlx(llm, model, tok, names=None):
    for name, (prompt, target) in tm.training_pairs(tok).items():
        if names and name not in names:
            continue
        n = len(tok.encode(target, add_special_tokens=False))
        ids, got = llama_greedy(llm, prompt, n)
        assert ids == tok.encode(prompt, add_special_tokens=False), f"{name}: tokenization differs"
        assert got == tm.greedy_ids(model, tok, prompt, n), f"{name}: {tok.decode(got)!r}"


def test_f32_export_matches_mlx_greedy(trained_dir, mlx_trained, tmp_path):
    stages = []
    out = mlx_to_gguf(
        trained_dir, tmp_path / "tiny-f32.gguf", "f32", pre_tokenizer=PRE,
        progress=lambda s, f: stages.append((s, f)),
    )  # fmt: skip
    assert out == tmp_path / "tiny-f32.gguf"
    assert out.read_bytes()[:4] == b"GGUF"
    assert leftovers(tmp_path) == ["tiny-f32.gguf"]
    assert {s for s, _ in stages} == {"converting"} and stages[-1] == ("converting", 1.0)
    assert [f for _, f in stages] == sorted(f for _, f in stages)
    llm = llama(out)
    assert llm.metadata["general.architecture"] == "llama"
    assert llm.metadata["tokenizer.ggml.pre"] == PRE
    model, tok = mlx_trained
    assert_matches_mlx(llm, model, tok)  # all four prompts, token for token
    _, got = llama_greedy(
        llm, tm.render_prompt(tok, tm.CHAT_CONVERSATION, enable_thinking=False), 20
    )
    assert llm.detokenize(got, special=True).decode() == tm.CHAT_REPLY_NO_THINKING


def test_q4_k_m_through_the_quantizer(trained_dir, mlx_trained, tmp_path):
    stages = []
    out = mlx_to_gguf(
        trained_dir, tmp_path / "tiny-q4_k_m.gguf", "Q4_K_M", pre_tokenizer=PRE, nthread=2,
        progress=lambda s, f: stages.append((s, f)),
    )  # fmt: skip
    assert leftovers(tmp_path) == ["tiny-q4_k_m.gguf"]
    assert [s for s, _ in stages if s != "converting"][0] == "quantizing"
    assert stages[-1] == ("quantizing", 1.0)
    assert any(s == "quantizing" and 0 < f < 1 for s, f in stages)  # per-tensor progress
    llm = llama(out)
    assert llm.metadata["general.file_type"] == str(llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M)
    # The tiny dims (96) are not multiples of 256: llama.cpp falls back per tensor (q5_0/q8_0…);
    # the over-fitted model still answers its fixed prompts exactly.
    model, tok = mlx_trained
    assert_matches_mlx(llm, model, tok, names={"chat", "chat_no_thinking"})


def test_cli_q8_0(trained_dir, mlx_trained, tmp_path):
    out = tmp_path / "tiny-q8_0.gguf"
    cmd = [sys.executable, "-m", "mlxbackend", "convert", "to-gguf", str(trained_dir), str(out),
           "--type", "q8_0", "--pre-tokenizer", PRE]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stderr + res.stdout
    assert "wrote" in res.stdout and leftovers(tmp_path) == [out.name]
    llm = llama(out)
    assert llm.metadata["general.file_type"] == str(llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0)
    model, tok = mlx_trained
    assert_matches_mlx(llm, model, tok, names={"chat", "chat_no_thinking"})


def test_mlx_4bit_input_is_dequantized_first(trained_dir, tmp_path):
    from mlx_lm import convert
    from mlx_lm.utils import load

    q4 = tmp_path / "tiny-4bit"
    convert(str(trained_dir), str(q4), quantize=True, q_group_size=32, q_bits=4)
    assert json.loads((q4 / "config.json").read_text())["quantization"]["bits"] == 4
    out_dir = tmp_path / "out"
    out = mlx_to_gguf(q4, out_dir / "tiny-4bit-f16.gguf", "f16", pre_tokenizer=PRE)
    assert leftovers(out_dir) == [out.name]
    llm = llama(out)
    # f16 holds the 4-bit values closely: llama.cpp follows the quantized MLX model.
    model, tok = load(str(q4))
    assert_matches_mlx(llm, model, tok, names={"chat", "chat_no_thinking"})


def test_unknown_qtype(trained_dir, tmp_path):
    with pytest.raises(ValueError) as e:
        mlx_to_gguf(trained_dir, tmp_path / "x.gguf", "q4_k_x")
    assert "q4_k_m" in str(e.value) and "q8_0" in str(e.value)
    assert leftovers(tmp_path) == []
    assert normalize_qtype("Q4_K") == "q4_k_m" and "iq2_xxs" not in SUPPORTED_TYPES
    res = subprocess.run(
        [sys.executable, "-m", "converters.mlx_to_gguf", str(trained_dir), str(tmp_path / "x.gguf"),
         "--type", "nope"], capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert res.returncode == 2 and "supported:" in res.stderr


def test_unknown_architecture_leaves_nothing(tiny_dir, tmp_path):
    src = tmp_path / "xyz"
    shutil.copytree(tiny_dir, src)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "architectures": ["XyzForCausalLM"]}))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(GGUFConversionError, match="Model XyzForCausalLM is not supported"):
        mlx_to_gguf(src, out_dir / "xyz.gguf", "q4_0", pre_tokenizer=PRE)
    assert leftovers(out_dir) == []


def test_unrecognised_pre_tokenizer_is_explained(tiny_dir, tmp_path):
    with pytest.raises(GGUFConversionError, match="pre-tokenizer was not recognized.*gpt-2"):
        mlx_to_gguf(tiny_dir, tmp_path / "x.gguf", "f16")
    assert leftovers(tmp_path) == []


def test_interrupt_while_quantizing_leaves_nothing(tiny_dir, tmp_path):
    (tmp_path / "old.gguf").write_bytes(b"GGUF old")

    def progress(stage, fraction):
        if stage == "quantizing" and fraction > 0:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        mlx_to_gguf(tiny_dir, tmp_path / "old.gguf", "q4_0", pre_tokenizer=PRE, progress=progress)
    assert leftovers(tmp_path) == ["old.gguf"]
    assert (tmp_path / "old.gguf").read_bytes() == b"GGUF old"  # the old file is untouched


def test_tools_come_from_the_llama_cpp_python_sdist(tmp_path, monkeypatch):
    tools = ensure_llama_cpp_tools()
    assert (tools / "convert_hf_to_gguf.py").is_file() and (tools / "conversion").is_dir()
    assert (tools / "gguf-py" / "gguf" / "gguf_writer.py").is_file()
    assert LLAMA_CPP_PYTHON_VERSION in (tools / MARKER).read_text()
    assert llama_cpp.__version__ == LLAMA_CPP_PYTHON_VERSION  # quantizer = same llama.cpp
    with pytest.raises(ToolsMissing, match="make install"):
        ensure_llama_cpp_tools(dest=tmp_path / "none", download=False)
    monkeypatch.setenv("MLXB_LLAMA_CPP_TOOLS", os.fspath(tmp_path / "none"))
    with pytest.raises(ToolsMissing, match="make install"):
        ensure_llama_cpp_tools(download=False)
