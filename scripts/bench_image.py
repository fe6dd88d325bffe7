#!/usr/bin/env python
"""Seconds per denoising step: GenerateImage through a backend process vs DiffusionKit's own
`sample_euler` + `CFGDenoiser` on the same SD3 folder, alternating rounds, medians. The ratio
raw ÷ gRPC (s/step) is the serving efficiency (target ≥ 0.95).

Without --model it builds a random SD3 folder in the test layout (tests/tiny_diffusion.py) with
an MMDiT of --depth joint blocks and --hidden width, so that a step costs what it does on a real
model of that shape (the weights' values do not change the cost). Both sides count the whole
denoising loop divided by the steps: DiffusionKit's sample_euler including its up-front adaLN
modulation pass and weight restore (its own iter_time leaves those out), the server's GenerateImage
reply the same span (text encoding and VAE decoding are outside both).

  LD_PRELOAD=…/libopenblas.so.0 python scripts/bench_image.py --depth 8 --hidden 512 --size 256
"""

import argparse
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


def main(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--model", default="", help="DiffusionKit folder (default: a tiny random SD3 built here)"
    )
    ap.add_argument(
        "--depth", type=int, default=8, help="joint blocks of the built MMDiT (SD3 medium: 24)"
    )
    ap.add_argument(
        "--hidden", type=int, default=512, help="width of the built MMDiT (SD3 medium: 1536)"
    )
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--cfg", type=float, default=5.0)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument(
        "--pause",
        type=float,
        default=2.0,
        help="seconds idle before each measurement, so the other process's BLAS threads have stopped spinning",
    )
    args = ap.parse_args(argv)

    import mlx.core as mx

    from mlxbackend.client import spawn_server, stop_server
    from mlxbackend.image.generate import ImageRequest, encode_text, plan_request
    from mlxbackend.image.pipeline import LoadSettings, load_pipeline
    from mlxbackend.proto import backend_pb2 as pb
    from tests.tiny_diffusion import build_tiny_sd3, diffusionkit_sample

    tmp = tempfile.TemporaryDirectory()
    folder = Path(args.model) if args.model else None
    if folder is None:
        mmdit = dict(
            depth_multimodal=args.depth,
            hidden_size_override=args.hidden,
            num_heads=args.hidden // 64,
            max_latent_resolution=max(16, args.size // 8),
        )
        folder = build_tiny_sd3(Path(tmp.name) / "bench-sd3", mmdit=mmdit)
    pipe = load_pipeline(folder, LoadSettings(cfg_scale=args.cfg))
    req = ImageRequest(
        prompt="a red cube on a table", width=args.size, height=args.size, steps=args.steps, seed=1
    )
    plan = plan_request(pipe, req)

    def raw_step_seconds() -> float:
        """DiffusionKit's own Euler loop, wall time per step, conditioning computed beforehand."""
        cond, pooled = encode_text(pipe, plan)
        cfg = plan.cfg if plan.guided and pipe.family != "flux" else 0.0  # as our sample() does
        _, seconds = diffusionkit_sample(pipe, plan, cond, pooled, cfg)
        mx.eval(pipe.mmdit.parameters())
        return seconds / plan.steps

    proc, stub = spawn_server()
    try:
        assert stub.LoadModel(pb.ModelOptions(Model=str(folder), CFGScale=args.cfg)).success
        dst = Path(tmp.name) / "out.png"

        def grpc_step_seconds() -> float:
            reply = stub.GenerateImage(
                pb.GenerateImageRequest(
                    positive_prompt=req.prompt,
                    width=args.size,
                    height=args.size,
                    step=args.steps,
                    seed=1,
                    dst=str(dst),
                ),
                timeout=3600,
            )
            return float(reply.message.rsplit(",", 1)[1].split()[0])  # "…, 0.12 s/step"

        raw_step_seconds(), grpc_step_seconds()  # warm-up
        raw, served = [], []
        for r in range(args.rounds):
            time.sleep(args.pause)
            raw.append(raw_step_seconds())
            time.sleep(args.pause)
            served.append(grpc_step_seconds())
            print(
                f"round {r + 1}: raw {raw[-1]:.3f} s/step, grpc {served[-1]:.3f} s/step",
                file=sys.stderr,
            )
    finally:
        stop_server(proc)
    result = {
        "model": args.model or f"random SD3, {args.depth} joint blocks × {args.hidden}",
        "size": args.size,
        "steps": args.steps,
        "cfg": args.cfg,
        "rounds": args.rounds,
        "raw_s_per_step": round(statistics.median(raw), 4),
        "grpc_s_per_step": round(statistics.median(served), 4),
    }
    result["raw_over_grpc"] = round(result["raw_s_per_step"] / result["grpc_s_per_step"], 3)
    result["median_round_ratio"] = round(
        statistics.median(r / g for r, g in zip(raw, served, strict=True)), 3
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
