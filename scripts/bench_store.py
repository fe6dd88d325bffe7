#!/usr/bin/env python
"""Vector store speed, side by side in one run:

* build:   one `VectorStore.set` of --n random float32 keys of --dim (values: 16-byte ids);
* find:    `find(top_k)` latency over --queries random queries after 3 warm-up queries
           (median and p90), against a numpy reference on the same data: the unit-normalised
           key matrix @ unit query + argpartition + sort of the k selected (median);
* persist: one full `save()` of the store and one `VectorStore.open` of the file.

LD_PRELOAD=…/libopenblas.so.0 python scripts/bench_store.py [--n 100000] [--dim 384] [--json]
"""

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WARMUP = 3


def timed(fn):
    """(result, seconds)."""
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def numpy_find(unit_keys: np.ndarray, query: np.ndarray, top_k: int) -> np.ndarray:
    """Rows of the top_k most cosine-similar keys, most similar first."""
    sims = unit_keys @ (query / np.linalg.norm(query))
    top = np.argpartition(-sims, top_k - 1)[:top_k]
    return top[np.argsort(-sims[top])]


def percentile_ms(seconds: list[float], q: float) -> float:
    return float(np.percentile(seconds, q)) * 1e3


def main(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--n", type=int, default=100_000, help="stored keys")
    ap.add_argument("--dim", type=int, default=384, help="key dimensions")
    ap.add_argument("--queries", type=int, default=50, help="timed find calls")
    ap.add_argument("--top-k", type=int, default=10)
    ap.add_argument("--json", action="store_true", help="print the results as one JSON line")
    args = ap.parse_args(argv)

    from rich.console import Console
    from rich.table import Table

    from mlxbackend.store import VectorStore

    console = Console(stderr=True)
    rng = np.random.default_rng(0)
    keys = rng.standard_normal((args.n, args.dim), dtype=np.float32)
    values = [i.to_bytes(16, "little") for i in range(args.n)]
    queries = rng.standard_normal((WARMUP + args.queries, args.dim), dtype=np.float32)

    store = VectorStore.open(None)
    with console.status(f"building a store of {args.n} x {args.dim} keys"):
        _, build_s = timed(lambda: store.set(keys, values))

    find_s, rows_found = [], []
    for i, query in enumerate(queries):
        (_, found, _), seconds = timed(lambda q=query: store.find(q, args.top_k))
        if i >= WARMUP:
            find_s.append(seconds)
            rows_found.append([int.from_bytes(v, "little") for v in found])

    import mlx.core as mx

    matvec_s = []
    for i, query in enumerate(queries):
        q = mx.array(query)
        _, seconds = timed(lambda q=q: mx.eval(store.unit_keys @ q))
        if i >= WARMUP:
            matvec_s.append(seconds)

    unit_keys = keys / np.linalg.norm(keys, axis=1, keepdims=True)
    numpy_s, agree = [], 0
    for i, query in enumerate(queries):
        rows, seconds = timed(lambda q=query: numpy_find(unit_keys, q, args.top_k))
        if i >= WARMUP:
            numpy_s.append(seconds)
            agree += set(rows.tolist()) == set(rows_found[i - WARMUP])  # near-ties may swap order

    with tempfile.TemporaryDirectory() as folder:
        store.path = Path(folder) / "store.safetensors"
        with console.status("saving and reopening"):
            _, save_s = timed(store.save)
            reopened, open_s = timed(lambda: VectorStore.open(store.path))
        file_mb = store.path.stat().st_size / 1e6
    assert len(reopened) == args.n

    result = {
        "n": args.n,
        "dim": args.dim,
        "queries": args.queries,
        "top_k": args.top_k,
        "build_s": round(build_s, 3),
        "find_median_ms": round(percentile_ms(find_s, 50), 3),
        "find_p90_ms": round(percentile_ms(find_s, 90), 3),
        "mlx_matvec_median_ms": round(percentile_ms(matvec_s, 50), 3),
        "numpy_median_ms": round(percentile_ms(numpy_s, 50), 3),
        "find_over_numpy": round(statistics.median(find_s) / statistics.median(numpy_s), 2),
        "same_results_as_numpy": f"{agree}/{args.queries}",
        "save_s": round(save_s, 3),
        "open_s": round(open_s, 3),
        "file_mb": round(file_mb, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }
    table = Table(title=f"vector store: {args.n} x {args.dim} float32 keys, top_k {args.top_k}")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row("build (one set)", f"{build_s:.2f} s")
    table.add_row("find median", f"{result['find_median_ms']:.2f} ms")
    table.add_row("find p90", f"{result['find_p90_ms']:.2f} ms")
    table.add_row("  of which the MLX matvec", f"{result['mlx_matvec_median_ms']:.2f} ms")
    table.add_row("numpy reference median", f"{result['numpy_median_ms']:.2f} ms")
    table.add_row("find / numpy", f"{result['find_over_numpy']:.2f}x")
    table.add_row("same top-k as numpy", result["same_results_as_numpy"])
    table.add_row("save", f"{save_s:.2f} s ({file_mb:.0f} MB)")
    table.add_row("reopen", f"{open_s:.2f} s")
    table.add_row("peak RSS (whole run)", f"{result['peak_rss_mb']} MB")
    console.print(table)
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
