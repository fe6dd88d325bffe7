"""Training throughput: a LoRA job through the gRPC backend vs mlx-lm's `train()` called
directly, same model, data, LoRA config, batch size and optimizer, side by side in one run.

Tokens/s counts the trained (unmasked) tokens over the steady-state steps (the first steps,
which compile, are skipped on both sides).

    python scripts/bench_finetune.py [--model DIR] [--steps 30] [--rounds 2] [--json OUT]
"""

import argparse
import contextlib
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SKIP = 5  # compile / warm-up steps left out on both sides


def dataset(folder: Path, rows: int = 64) -> Path:
    """Chat rows of similar length, so batches pad alike whatever their order."""
    lines = []
    for i in range(rows):
        q = f"Question {i}: what is the colour of the house number {i * 7 % 97} on Orchard Street?"
        a = f"The house number {i * 7 % 97} on Orchard Street is painted a deep shade of green, like the others."
        lines.append(
            json.dumps(
                {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            )
        )
    (folder / "train.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "train.jsonl"


def direct(model_dir: Path, data: Path, args) -> float:
    """mlx-lm's own loop: tokens/s over steps SKIP+1..N (per-step reports)."""
    import mlx.core as mx
    import mlx.optimizers as optim
    from mlx_lm.tuner.callbacks import TrainingCallback
    from mlx_lm.tuner.datasets import CacheDataset, ChatDataset
    from mlx_lm.tuner.trainer import TrainingArgs, train
    from mlx_lm.tuner.utils import linear_to_lora_layers

    from mlxbackend.text.models import load_model_dir

    model, tokenizer, _ = load_model_dir(model_dir)
    model.freeze()
    linear_to_lora_layers(
        model, len(model.layers), {"rank": args.rank, "scale": 2.0, "dropout": 0.0}
    )
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    train_set = CacheDataset(ChatDataset(rows, tokenizer))
    reports = []

    class Collect(TrainingCallback):
        def on_train_loss_report(self, info):
            reports.append(info)

    mx.random.seed(0)
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
        train(
            model,
            optim.AdamW(learning_rate=1e-4, weight_decay=0.01),
            train_set,
            args=TrainingArgs(
                batch_size=args.batch_size,
                iters=args.steps,
                steps_per_report=1,
                steps_per_save=10**9,
                adapter_file=str(Path(tmp) / "a.safetensors"),
            ),
            training_callback=Collect(),
        )
    steady = reports[SKIP:]
    seconds = sum(1 / r["iterations_per_second"] for r in steady)
    tokens = sum(r["tokens_per_second"] / r["iterations_per_second"] for r in steady)
    return tokens / seconds


def through_grpc(stub, model_dir: Path, data: Path, out: Path, args) -> float:
    from mlxbackend.proto import backend_pb2 as pb

    job = stub.StartFineTune(
        pb.FineTuneRequest(
            model=str(model_dir),
            dataset_source=str(data),
            output_dir=str(out),
            adapter_rank=args.rank,
            adapter_alpha=2 * args.rank,
            learning_rate=1e-4,
            max_steps=args.steps,
            batch_size=args.batch_size,
            gradient_accumulation_steps=1,
            warmup_steps=0,
            weight_decay=0.01,
            seed=0,
        )
    )
    steps = {}
    for u in stub.FineTuneProgress(pb.FineTuneProgressRequest(job_id=job.job_id)):
        if u.status == "training" and "step_seconds" in u.extra_metrics:
            steps[u.current_step] = (
                u.extra_metrics["step_seconds"],
                u.extra_metrics["tokens_per_second"],
            )
        if u.status in ("completed", "failed", "stopped"):
            assert u.status == "completed", u.message
    steady = [steps[k] for k in sorted(steps)[SKIP:]]
    return sum(s * tps for s, tps in steady) / sum(s for s, _ in steady)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="", help="model folder (default: the bundled SmolLM2)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", default="")
    args = parser.parse_args()

    from mlxbackend.client import spawn_server, stop_server
    from mlxbackend.default_model import ensure_default_model

    model_dir = (
        Path(args.model)
        if args.model
        else ensure_default_model(Path(os.environ.get("MLXB_MODELS_DIR", "models")))
    )
    model_dir = model_dir.resolve()
    results = {"direct": [], "grpc": []}
    with tempfile.TemporaryDirectory() as tmp:
        data = dataset(Path(tmp))
        proc, stub = spawn_server()
        try:
            for r in range(args.rounds):
                results["direct"].append(direct(model_dir, data, args))
                results["grpc"].append(
                    through_grpc(stub, model_dir, data, Path(tmp) / f"job{r}", args)
                )
                print(
                    f"round {r + 1}: mlx-lm train() {results['direct'][-1]:.0f} tok/s, "
                    f"gRPC job {results['grpc'][-1]:.0f} tok/s",
                    flush=True,
                )
        finally:
            stop_server(proc)
    d, g = statistics.median(results["direct"]), statistics.median(results["grpc"])
    summary = {
        "model": str(model_dir),
        "steps": args.steps,
        "batch_size": args.batch_size,
        "rank": args.rank,
        "direct_tokens_per_second": d,
        "grpc_tokens_per_second": g,
        "ratio": g / d,
        "rounds": results,
        "when": time.strftime("%Y-%m-%d"),
    }
    print(f"training tokens/s: gRPC {g:.0f} / mlx-lm train() {d:.0f} = {g / d:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
