#!/usr/bin/env python
"""Tokens/s of 1 rank vs 2 ranks (mx.distributed, ring backend over loopback), end to end through
the gRPC server LocalAI talks to, same prompts, medians over --repeats:

  * 1 rank:          the plain backend (run.sh) with the model loaded;
  * pipeline 2 ranks: the backend (rank 0) + `mlxbackend worker --rank 1`, Options hostfile:;
  * tensor 2 ranks:   the same with distributed_mode:tensor, where the model's heads divide 2.

prefill = prompt tokens / time to first token (Tokens=1); decode = (tokens - 1) / generation time
for --tokens greedy tokens (IgnoreEOS). Models: the trained tiny test model (2 layers, hidden 96:
shows the fixed per-step cost of the group) and SmolLM2-135M-Instruct (float32, 30 layers).
Both ranks share this machine's cores; --blas-threads N sets OPENBLAS_NUM_THREADS for every process.

  LD_PRELOAD=…/libopenblas.so.0 python scripts/bench_distributed.py --repeats 5 --json out.json
"""

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

LONG_TEXT = (
    "The history of computing is a story of machines that got smaller, faster and cheaper while the "
    "problems they solved grew larger. Early computers filled rooms and were programmed with cables; "
    "later machines used punched cards, then terminals, then personal computers on every desk. "
) * 6


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(stub, prompt: str, tokens: int, repeats: int, chat: bool) -> dict:
    from mlxbackend.proto import backend_pb2 as pb

    def request(text, n):
        if chat:
            return pb.PredictOptions(
                Messages=[pb.Message(role="user", content=text)],
                UseTokenizerTemplate=True,
                Tokens=n,
                IgnoreEOS=True,
            )
        return pb.PredictOptions(Prompt=text, Tokens=n, IgnoreEOS=True)

    stub.Predict(request("Hello", 8), timeout=300)  # warm-up
    prefill, decode, prompt_tokens = [], [], 0
    for _ in range(repeats):
        r = stub.Predict(request(prompt, 1), timeout=300)
        prompt_tokens = r.prompt_tokens
        prefill.append(r.prompt_tokens / (r.timing_prompt_processing / 1000))
        r = stub.Predict(
            request("Tell me a long story about a lighthouse keeper.", tokens), timeout=300
        )
        decode.append((r.tokens - 1) / (r.timing_token_generation / 1000))
    return {
        "prefill_tps": round(statistics.median(prefill), 1),
        "decode_tps": round(statistics.median(decode), 1),
        "prompt_tokens": prompt_tokens,
        "decode_tokens": tokens,
    }


def run_config(model: Path, ranks: int, mode: str, args, env: dict, folder: Path) -> dict:
    from mlxbackend.client import spawn_server, stop_server
    from mlxbackend.proto import backend_pb2 as pb

    options, worker = ["prompt_cache:false"], None  # time real prefills, not prefix-cache hits
    if ranks > 1:
        hostfile = folder / f"hosts-{mode}.json"
        hostfile.write_text(json.dumps([f"127.0.0.1:{free_port()}" for _ in range(ranks)]))
        options += [f"hostfile:{hostfile}", f"distributed_mode:{mode}"]
        worker = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mlxbackend",
                "worker",
                "--rank",
                "1",
                "--hostfile",
                str(hostfile),
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
    proc, stub = spawn_server(env=env)
    try:
        started = time.perf_counter()
        reply = stub.LoadModel(pb.ModelOptions(Model=str(model), Options=options), timeout=300)
        assert reply.success, reply.message
        load_s = time.perf_counter() - started
        result = measure(stub, LONG_TEXT, args.tokens, args.repeats, chat=True)
        memory = dict(stub.Status(pb.HealthMessage()).memory.breakdown)
        weights = {k: v for k, v in memory.items() if k.endswith("weights")}
        return {
            "ranks": ranks,
            "mode": mode if ranks > 1 else "single",
            "load_s": round(load_s, 1),
            **result,
            "weights_mib": {k: round(v / 2**20, 1) for k, v in weights.items()},
        }
    finally:
        stop_server(proc)
        if worker is not None:
            os.killpg(worker.pid, 9)
            worker.wait()


def main():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=64, help="decode tokens per request")
    ap.add_argument("--models", default="tiny,smollm2")
    ap.add_argument(
        "--blas-threads",
        type=int,
        default=0,
        help="OPENBLAS_NUM_THREADS for every process (0: unset)",
    )
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if args.blas_threads:
        env["OPENBLAS_NUM_THREADS"] = str(args.blas_threads)
    folder = Path(tempfile.mkdtemp(prefix="mlxb-bench-dist-"))
    models = {}
    if "tiny" in args.models:
        from tests.tiny_model import build_tiny_model

        models["tiny (2 layers, trained)"] = (
            build_tiny_model(folder / "tiny", trained=True),
            ["pipeline", "tensor"],
        )
    if "smollm2" in args.models:
        from mlxbackend.default_model import ensure_default_model

        models["SmolLM2-135M f32 (30 layers)"] = (
            ensure_default_model(
                Path(os.environ.get("MLXB_MODELS_DIR", ROOT / "models")).resolve()
            ),
            ["pipeline"],
        )
    results = []
    for name, (path, modes) in models.items():
        for ranks, mode in [(1, "single")] + [(2, m) for m in modes]:
            row = {"model": name, **run_config(path, ranks, mode, args, env, folder)}
            results.append(row)
            print(
                f"{name:30} {row['mode']:9} ranks {ranks}: prefill {row['prefill_tps']:8.1f} tok/s "
                f"({row['prompt_tokens']} tokens), decode {row['decode_tps']:7.1f} tok/s, load {row['load_s']} s, "
                f"weights MiB {row['weights_mib']}",
                flush=True,
            )
    out = {
        "machine": f"{os.cpu_count()} cores, loopback",
        "blas_threads": args.blas_threads or "default",
        "repeats": args.repeats,
        "results": results,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
