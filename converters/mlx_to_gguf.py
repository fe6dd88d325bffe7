"""Export an MLX (or Hugging Face) model folder as a llama.cpp GGUF file.

Uses llama.cpp's own tools, nothing re-implemented: ``convert_hf_to_gguf.py`` (from the
llama-cpp-python source package, see ``converters.llama_cpp_tools``) writes f32/f16/bf16/q8_0
directly; every other type is written as f16 first and then quantized by llama.cpp's quantizer
(``llama_model_quantize`` from llama-cpp-python's C API). An MLX-quantized folder is first
dequantized with mlx-lm into a temporary float folder, because the converter only reads float
(or Hugging Face-quantized) checkpoints.

The output is atomic: a temporary file beside ``out_file`` is renamed over it at the end; on
any error (or Ctrl-C) nothing is left under the final name and temporary files are removed.

Usage: ``python -m converters.mlx_to_gguf MODEL_DIR OUT.gguf [--type q4_k_m]``
(also ``mlxbackend convert to-gguf MODEL_DIR OUT.gguf --type q4_k_m``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections import deque
from collections.abc import Callable
from pathlib import Path

from converters.llama_cpp_tools import (
    ToolsMissing,
    check_converter_deps,
    check_quantizer,
    ensure_llama_cpp_tools,
)
from mlxbackend import publish

ProgressFn = Callable[[str, float], None]

# Types convert_hf_to_gguf.py writes itself.
CONVERTER_TYPES = ("f32", "f16", "bf16", "q8_0")
# Types made by llama.cpp's quantizer from an f16 file -> LLAMA_FTYPE_MOSTLY_* suffix.
# Left out: iq1_s, iq1_m, iq2_xxs, iq2_xs, iq2_s, iq2_m, iq3_xxs, iq3_xs and q2_k_s, which
# llama.cpp 0.3.36 refuses without an importance matrix (calibration data).
QUANTIZER_TYPES = {
    "q4_0": "Q4_0",
    "q4_1": "Q4_1",
    "q5_0": "Q5_0",
    "q5_1": "Q5_1",
    "q2_k": "Q2_K",
    "q3_k_s": "Q3_K_S",
    "q3_k_m": "Q3_K_M",
    "q3_k_l": "Q3_K_L",
    "q4_k_s": "Q4_K_S",
    "q4_k_m": "Q4_K_M",
    "q5_k_s": "Q5_K_S",
    "q5_k_m": "Q5_K_M",
    "q6_k": "Q6_K",
    "iq3_s": "IQ3_S",
    "iq3_m": "IQ3_M",
    "iq4_nl": "IQ4_NL",
    "iq4_xs": "IQ4_XS",
    "tq1_0": "TQ1_0",
    "tq2_0": "TQ2_0",
    "mxfp4_moe": "MXFP4_MOE",
}
ALIASES = {"q3_k": "q3_k_m", "q4_k": "q4_k_m", "q5_k": "q5_k_m", "fp16": "f16", "fp32": "f32"}
SUPPORTED_TYPES = CONVERTER_TYPES + tuple(QUANTIZER_TYPES)

RUNNER = Path(__file__).with_name("_hf_to_gguf_runner.py")
# Weight files replaced by the dequantized copy; everything else (tokenizer, templates,
# generation config, …) is copied as it is.
_WEIGHT_FILES = re.compile(r".*\.safetensors$|.*\.safetensors\.index\.json$|^config\.json$")

_QUANTIZE_CODE = r"""
import ctypes, sys, llama_cpp
inp, out, ftype, nthread = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = getattr(llama_cpp, "LLAMA_FTYPE_MOSTLY_" + ftype)
params.nthread = nthread
sys.exit(1 if llama_cpp.llama_model_quantize(inp.encode(), out.encode(), ctypes.byref(params)) else 0)
"""


class GGUFConversionError(RuntimeError):
    """llama.cpp's converter or quantizer failed; the message quotes its own error."""


def normalize_qtype(qtype: str) -> str:
    """Lower-cased canonical type name; ValueError listing SUPPORTED_TYPES when unknown."""
    name = str(qtype).strip().lower().replace("-", "_")
    name = ALIASES.get(name, name)
    if name not in SUPPORTED_TYPES:
        raise ValueError(
            f"unsupported GGUF type {qtype!r}; supported: {', '.join(SUPPORTED_TYPES)}"
        )
    return name


def check_tools(qtype: str) -> None:
    """ToolsMissing (naming the install command) unless this install can write ``qtype``: the
    converter's Python modules (torch, transformers, …) and, for quantized types, llama.cpp's
    quantizer (llama-cpp-python). The serving install (`make run`) has neither."""
    check_converter_deps()
    if normalize_qtype(qtype) in QUANTIZER_TYPES:
        check_quantizer()


def mlx_quantization(config: dict) -> dict | None:
    """The MLX quantization settings of a config.json, or None (HF quantization is not MLX's)."""
    for key in ("quantization", "quantization_config"):
        q = config.get(key)
        if isinstance(q, dict) and "group_size" in q and "bits" in q and "quant_method" not in q:
            return q
    return None


def dequantize_mlx_folder(src: Path, dst: Path) -> Path:
    """Write a float copy of an MLX-quantized folder (weights in the scales' dtype)."""
    from mlx_lm.utils import dequantize_model, load_model, save_model

    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    model, _ = load_model(src, lazy=True)
    dequantize_model(model)
    save_model(dst, model, donate_model=True)
    del model
    config = json.loads((src / "config.json").read_text())
    config.pop("quantization", None)
    config.pop("quantization_config", None)
    (dst / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    for f in src.iterdir():
        if f.is_file() and not _WEIGHT_FILES.match(f.name):
            shutil.copy2(f, dst / f.name)
    return dst


def _run_streaming(cmd, env, on_line) -> tuple[int, list[str]]:
    """Run ``cmd``, feeding each output line (split on \\r and \\n) to ``on_line``.

    Returns (exit code, last output lines). The child is killed if this is interrupted.
    """
    tail: deque[str] = deque(maxlen=300)
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
    )
    try:
        buf = b""
        while True:
            chunk = (
                proc.stdout.read1(65536)
                if hasattr(proc.stdout, "read1")
                else proc.stdout.read(4096)
            )
            if not chunk:
                break
            buf += chunk
            *lines, buf = re.split(rb"[\r\n]", buf)
            for raw in lines:
                line = raw.decode("utf-8", "replace")
                if line.strip():
                    tail.append(line)
                    on_line(line)
        if buf.strip():
            tail.append(buf.decode("utf-8", "replace"))
        return proc.wait(), list(tail)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()


def _converter_error(model_dir: Path, rc: int, lines: list[str]) -> GGUFConversionError:
    errors = [re.sub(r"^ERROR:[\w.-]+:", "", ln).strip() for ln in lines if ln.startswith("ERROR:")]
    exc = [ln.strip() for ln in lines if re.match(r"^\w*(Error|Exception|Interrupt)\b.*", ln)]
    reason = "; ".join(dict.fromkeys(errors + exc[-1:])) or "\n".join(lines[-15:])
    msg = f"llama.cpp's convert_hf_to_gguf.py could not convert {model_dir} (exit {rc}): {reason}"
    if "pre-tokenizer was not recognized" in reason:
        msg += (
            ". The tokenizer is BPE but llama.cpp does not know its pre-tokenizer; if it is a "
            "plain byte-level (GPT-2 style) tokenizer pass pre_tokenizer='gpt-2' "
            "(--pre-tokenizer gpt-2)"
        )
    return GGUFConversionError(msg)


def _convert(tools, src, out, outtype, report, pre_tokenizer) -> None:
    env = dict(os.environ)
    env.pop("MLXB_GGUF_PRE_TOKENIZER", None)
    if pre_tokenizer:
        env["MLXB_GGUF_PRE_TOKENIZER"] = pre_tokenizer
    env.setdefault("PYTHONUNBUFFERED", "1")
    cmd = [sys.executable, str(RUNNER), str(tools), str(src), "--outfile", str(out),
           "--outtype", outtype]  # fmt: skip
    pattern = re.compile(r"^Writing:\s*(\d+)%")

    def on_line(line):
        m = pattern.match(line)
        if m:
            report("converting", 0.1 + 0.9 * int(m.group(1)) / 100)

    rc, lines = _run_streaming(cmd, env, on_line)
    if rc != 0 or not Path(out).is_file():
        raise _converter_error(Path(src), rc, lines)


def _quantize(inp, out, qtype, report, nthread) -> None:
    ftype = QUANTIZER_TYPES[qtype]
    cmd = [sys.executable, "-c", _QUANTIZE_CODE, str(inp), str(out), ftype, str(nthread)]
    pattern = re.compile(r"^\[\s*(\d+)/\s*(\d+)\]")

    def on_line(line):
        m = pattern.match(line)
        if m:
            report("quantizing", int(m.group(1)) / max(1, int(m.group(2))))

    rc, lines = _run_streaming(cmd, dict(os.environ), on_line)
    if rc != 0 or not Path(out).is_file():
        bad = [ln.strip() for ln in lines if re.search(r"error|failed|requires", ln, re.I)]
        reason = "; ".join(dict.fromkeys(bad)) or "\n".join(lines[-15:])
        raise GGUFConversionError(
            f"llama.cpp's quantizer failed to make {qtype} (exit {rc}): {reason}"
        )


def mlx_to_gguf(
    model_dir,
    out_file,
    qtype: str = "f16",
    *,
    progress: ProgressFn | None = None,
    work_dir=None,
    pre_tokenizer: str | None = None,
    nthread: int = 0,
) -> Path:
    """Convert an MLX/HF model folder into the GGUF file ``out_file`` of type ``qtype``.

    ``progress(stage, fraction)``: stage "converting" (includes dequantizing an MLX-quantized
    folder) then, for types other than f32/f16/bf16/q8_0, "quantizing"; fraction 0..1.
    ``work_dir``: where the intermediate folders/files go (default: beside ``out_file``).
    ``pre_tokenizer``: llama.cpp pre-tokenizer name used only when the converter does not
    recognise a BPE tokenizer (e.g. "gpt-2" for a custom-trained byte-level BPE).
    ``nthread``: quantizer threads (0 = all cores). Returns the output path.
    """
    qtype = normalize_qtype(qtype)
    model_dir = Path(model_dir).expanduser()
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{model_dir} is not a model folder (no config.json)")
    config = json.loads(config_path.read_text())
    out_file = Path(out_file).expanduser().absolute()
    if out_file.is_dir():
        raise IsADirectoryError(f"{out_file} is a folder; give the .gguf file name")
    quantize = qtype in QUANTIZER_TYPES
    check_tools(qtype)  # before fetching the converter script: it is useless without them
    tools = ensure_llama_cpp_tools()

    def report(stage: str, fraction: float) -> None:
        if progress is not None:
            progress(stage, min(1.0, max(0.0, fraction)))

    out_file.parent.mkdir(parents=True, exist_ok=True)
    work_root = Path(work_dir).expanduser() if work_dir is not None else out_file.parent
    work_root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".mlxb-gguf-", dir=work_root))
    # Created by the converter/quantizer themselves, so it gets the usual permissions.
    tmp_out = out_file.parent / f".{out_file.name}.{uuid.uuid4().hex[:8]}.partial"
    try:
        report("converting", 0.0)
        src = model_dir
        if mlx_quantization(config) is not None:
            src = dequantize_mlx_folder(model_dir, work / "dequantized")
        report("converting", 0.1)
        converted = work / "model-f16.gguf" if quantize else tmp_out
        _convert(tools, src, converted, "f16" if quantize else qtype, report, pre_tokenizer)
        report("converting", 1.0)
        if quantize:
            if src != model_dir:
                shutil.rmtree(src, ignore_errors=True)  # free the disk before quantizing
            report("quantizing", 0.0)
            _quantize(converted, tmp_out, qtype, report, nthread)
            report("quantizing", 1.0)
        publish.place_file(tmp_out, out_file)  # fsync, then rename onto the final name
    finally:
        tmp_out.unlink(missing_ok=True)
        shutil.rmtree(work, ignore_errors=True)
    return out_file


def main(argv=None) -> int:
    """Command line: ``python -m converters.mlx_to_gguf MODEL_DIR OUT.gguf [--type TYPE]``."""
    parser = argparse.ArgumentParser(
        prog="mlxbackend convert to-gguf",
        description="Export an MLX or Hugging Face model folder as a llama.cpp GGUF file "
        "(llama.cpp's own converter and quantizer).",
    )
    parser.add_argument(
        "model_dir", help="MLX/HF model folder (config.json + safetensors + tokenizer)"
    )
    parser.add_argument("out", help="output .gguf file (replaced if it exists)")
    parser.add_argument(
        "--type", "-t", dest="qtype", default="f16", metavar="TYPE",
        help=f"GGUF type (default f16): {', '.join(SUPPORTED_TYPES)}",
    )  # fmt: skip
    parser.add_argument("--work-dir", help="folder for intermediate files (default: beside OUT)")
    parser.add_argument(
        "--pre-tokenizer", metavar="NAME",
        help="llama.cpp pre-tokenizer for a BPE tokenizer the converter does not recognise (e.g. gpt-2)",
    )  # fmt: skip
    parser.add_argument("--threads", type=int, default=0, help="quantizer threads (0 = all)")
    args = parser.parse_args(argv)
    try:
        normalize_qtype(args.qtype)
    except ValueError as e:
        parser.error(str(e))

    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

    columns = (
        TextColumn("{task.description:<12}"),
        BarColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
    )
    try:
        with Progress(*columns, transient=False) as bar:
            tasks: dict[str, int] = {}

            def report(stage, fraction):
                if stage not in tasks:
                    tasks[stage] = bar.add_task(stage, total=100)
                bar.update(tasks[stage], completed=round(fraction * 100))

            out = mlx_to_gguf(
                args.model_dir, args.out, args.qtype, progress=report, work_dir=args.work_dir,
                pre_tokenizer=args.pre_tokenizer, nthread=args.threads,
            )  # fmt: skip
    except (
        ValueError,
        FileNotFoundError,
        IsADirectoryError,
        ToolsMissing,
        GGUFConversionError,
    ) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; nothing written", file=sys.stderr)
        return 130
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
