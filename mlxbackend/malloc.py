"""glibc malloc's mmap and trim thresholds, set per model kind at LoadModel (Linux; elsewhere a
no-op).

run.sh starts the server with fixed 128 KiB thresholds. Under sustained text load, freed request
buffers then go back to the OS and RSS stays flat (README "Reliability"). But the same settings make
every buffer over 128 KiB a fresh mmap. Speech and music generation are slowed by that: one request
at a time makes large, short-lived buffers. mlx-audio's Soprano on Soprano-80M's shapes, two
rounds of three runs: default malloc 13.8-15.7 s, run.sh's settings 13.8-18.3 s, run.sh's
settings with the large thresholds below set at run time 12.6-14.5 s. Through gRPC against the
default-malloc raw side: 0.89 of its speed before, 1.05 after (README, "Soprano").

So the host sets the thresholds with `mallopt` at each LoadModel: run.sh's for every kind but TTS
and music, and large ones for those two. It does this only when run.sh chose the thresholds
(MLXB_MALLOC=run.sh); a caller's own MALLOC_* settings are left alone. glibc has no call to
restore its dynamic thresholds, so the large values are its ceiling for them."""

import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
SMALL = 128 * 1024  # run.sh's MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_
LARGE_MMAP = 32 * 2**20  # glibc's ceiling for its dynamic mmap threshold on 64-bit
LARGE_TRIM = 2 * LARGE_MMAP  # glibc keeps trim at twice the dynamic mmap threshold
LARGE_KINDS = ("tts", "music")  # one request at a time, large short-lived buffers


def thresholds(kind: str) -> tuple[int, int]:
    """(mmap, trim) thresholds in bytes for a model kind."""
    if kind in LARGE_KINDS:
        return LARGE_MMAP, LARGE_TRIM
    return SMALL, SMALL


def apply(kind: str) -> int:
    """Set the thresholds for `kind` when run.sh chose them on glibc; the mmap threshold now
    in force, or 0 when this process's malloc is not ours to tune."""
    libc = _glibc()
    if libc is None or os.environ.get("MLXB_MALLOC") != "run.sh":
        return 0
    mmap, trim = thresholds(kind)
    libc.mallopt(M_MMAP_THRESHOLD, mmap)
    libc.mallopt(M_TRIM_THRESHOLD, trim)
    if mmap == SMALL:
        libc.malloc_trim(0)  # what the large thresholds kept goes back to the OS now
    return mmap


def _glibc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 — musl has no such symbol, and other mallopt codes
    except (OSError, AttributeError):
        return None
    return libc
