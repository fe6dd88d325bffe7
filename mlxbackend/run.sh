#!/usr/bin/env bash
# LocalAI's launch convention: run.sh --addr HOST:PORT  (or --addr=HOST:PORT).
# exec keeps Python LocalAI's direct child (signals, parent-death watch).
set -euo pipefail
DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PY=""
for venv in "$DIR/venv" "$DIR/../.venv" "$DIR/.venv"; do
  if [ -x "$venv/bin/python" ]; then PY="$venv/bin/python"; break; fi
done
PY="${PY:-python3}"
# Linux: MLX's bundled reference BLAS is ~15x slower than OpenBLAS on float32 matmul.
if [ "$(uname -s)" = "Linux" ] && [ -z "${MLXB_NO_OPENBLAS:-}" ]; then
  for lib in /usr/lib/"$(uname -m)"-linux-gnu/openblas-pthread/libopenblas.so.0; do
    if [ -e "$lib" ]; then export LD_PRELOAD="$lib${LD_PRELOAD:+:$LD_PRELOAD}"; fi
  done
fi
# glibc malloc (Linux): two arenas and a fixed mmap threshold, so freed request buffers go back to
# the OS instead of staying in per-thread arenas (soak at concurrency 8: 1.7 GB → 1.3 GB RSS,
# README "Reliability"). No effect on macOS; the caller's own settings win.
# With run.sh's thresholds the server may change them per model kind (mlxbackend/malloc.py).
if [ -z "${MALLOC_MMAP_THRESHOLD_:-}" ] && [ -z "${MALLOC_TRIM_THRESHOLD_:-}" ]; then
  export MLXB_MALLOC=run.sh
fi
export MALLOC_ARENA_MAX="${MALLOC_ARENA_MAX:-2}"
export MALLOC_MMAP_THRESHOLD_="${MALLOC_MMAP_THRESHOLD_:-131072}"
export MALLOC_TRIM_THRESHOLD_="${MALLOC_TRIM_THRESHOLD_:-131072}"
exec "$PY" -m mlxbackend serve "$@"
