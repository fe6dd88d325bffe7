#!/usr/bin/env python
"""Seconds per denoising step: GenerateImage through a backend process vs DiffusionKit's own
`sample_euler` + `CFGDenoiser` on the same (tiny random, test-built) SD3 folder, alternating
rounds, medians. The ratio raw ÷ gRPC (s/step) is the serving efficiency (target ≥ 0.95).

  LD_PRELOAD=…/libopenblas.so.0 python scripts/bench_image.py --size 256 --steps 8 --rounds 3
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="", help="DiffusionKit folder (default: a tiny random SD3 built here)")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--cfg", type=float, default=5.0)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)

    import mlx.core as mx

    from mlxbackend.client import spawn_server, stop_server
    from mlxbackend.image.compat import import_diffusionkit
    from mlxbackend.image.generate import (
        ImageRequest,
        encode_text,
        initial_latent,
        plan_request,
        sampler_for,
        sigmas_for,
    )
    from mlxbackend.image.pipeline import LoadSettings, load_pipeline
    from mlxbackend.proto import backend_pb2 as pb

    tmp = tempfile.TemporaryDirectory()
    folder = Path(args.model) if args.model else None
    if folder is None:
        from tests.tiny_diffusion import build_tiny_sd3

        folder = build_tiny_sd3(Path(tmp.name) / "tiny-sd3")
    dk = import_diffusionkit()
    pipe = load_pipeline(folder, LoadSettings(cfg_scale=args.cfg))
    req = ImageRequest(prompt="a red cube on a table", width=args.size, height=args.size, steps=args.steps, seed=1)
    plan = plan_request(pipe, req)

    def raw_step_seconds() -> float:
        """DiffusionKit's own Euler loop (its per-step iter_time), conditioning computed beforehand."""
        cond, pooled = encode_text(pipe, plan)
        sampler = sampler_for(pipe, plan.shift)
        sigmas = sigmas_for(sampler, plan.steps, pipe.family == "flux")
        x = initial_latent(pipe, plan, sigmas[0], sampler)
        host = SimpleNamespace(mmdit=pipe.mmdit, activation_dtype=pipe.dtype, sampler=sampler,
                               load_mmdit=lambda only_modulation_dict=True: pipe.modulation)
        _, iter_time = dk.sample_euler(dk.CFGDenoiser(host), x, sigmas, extra_args={
            "conditioning": cond, "cfg_weight": plan.cfg, "pooled_conditioning": pooled})
        pipe.mmdit.clear_modulation_params_cache()
        pipe.mmdit.pop("to_offload", None)
        mx.eval(pipe.mmdit.parameters())
        return statistics.mean(iter_time)

    proc, stub = spawn_server()
    try:
        assert stub.LoadModel(pb.ModelOptions(Model=str(folder), CFGScale=args.cfg)).success
        dst = Path(tmp.name) / "out.png"

        def grpc_step_seconds() -> float:
            reply = stub.GenerateImage(pb.GenerateImageRequest(
                positive_prompt=req.prompt, width=args.size, height=args.size, step=args.steps, seed=1,
                dst=str(dst)), timeout=3600)
            return float(reply.message.rsplit(",", 1)[1].split()[0])  # "…, 0.12 s/step"

        raw_step_seconds(), grpc_step_seconds()  # warm-up
        raw, served = [], []
        for r in range(args.rounds):
            raw.append(raw_step_seconds())
            served.append(grpc_step_seconds())
            print(f"round {r + 1}: raw {raw[-1]:.3f} s/step, grpc {served[-1]:.3f} s/step", file=sys.stderr)
    finally:
        stop_server(proc)
    result = {
        "model": str(folder), "size": args.size, "steps": args.steps, "cfg": args.cfg, "rounds": args.rounds,
        "raw_s_per_step": round(statistics.median(raw), 4), "grpc_s_per_step": round(statistics.median(served), 4),
    }
    result["raw_over_grpc"] = round(result["raw_s_per_step"] / result["grpc_s_per_step"], 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
