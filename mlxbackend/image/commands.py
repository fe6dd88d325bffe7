"""`mlxbackend image "prompt" -o out.png --model DIR`: generate one image locally with a
per-step progress bar (or through a running backend with --addr)."""

import sys

from mlxbackend.client import connect, failure_text, local_or_remote
from mlxbackend.image import diffusion_dir
from mlxbackend.image.generate import ImageRequest, generate, plan_request, write_png
from mlxbackend.image.pipeline import LoadSettings, load_pipeline
from mlxbackend.options import parse_options


def add_parser(sub):
    p = sub.add_parser(
        "image", help="generate an image with a DiffusionKit SD3/FLUX folder (local, or --addr)"
    )
    p.add_argument("prompt")
    p.add_argument("-o", "--output", required=True, help="PNG to write")
    p.add_argument(
        "--model", default="", help="DiffusionKit folder (SD3 / SD3.5 / FLUX); local mode"
    )
    p.add_argument(
        "--addr",
        default="",
        help="use a running backend at HOST:PORT instead (LoadModel already done)",
    )
    p.add_argument("--negative", default="", help="negative prompt (SD3 with guidance)")
    p.add_argument(
        "--width", type=int, default=0, help="pixels, a multiple of 16 (0 = the model's default)"
    )
    p.add_argument("--height", type=int, default=0)
    p.add_argument("--steps", type=int, default=0, help="denoising steps (0 = the model's default)")
    p.add_argument("--seed", type=int, default=0, help="≤ 0 = random")
    p.add_argument("--src", default="", help="source image for img2img")
    p.add_argument(
        "--strength", type=float, default=0.0, help="img2img strength in (0, 1] (default 0.75)"
    )
    p.add_argument(
        "--cfg", type=float, default=0.0, help="guidance scale (0 = the model's default)"
    )
    p.add_argument(
        "--option",
        action="append",
        default=[],
        help="LoadModel option key:value (low_memory, dtype, shift…)",
    )
    p.set_defaults(func=cmd_image)


def run_local(args, err):
    from pathlib import Path

    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    folder = diffusion_dir(str(Path(args.model).resolve()))
    if folder is None:
        err.print(
            f"[red]{args.model} is not a DiffusionKit folder (SD3 / FLUX checkpoint + text encoders)[/red]"
        )
        return None
    settings = LoadSettings.from_options(parse_options(args.option), cfg_scale=args.cfg)
    with err.status("loading model"):
        pipe = load_pipeline(folder, settings)
    extra = f"strength:{args.strength}" if args.strength else ""
    plan = plan_request(
        pipe,
        ImageRequest(
            prompt=args.prompt,
            negative_prompt=args.negative,
            width=args.width,
            height=args.height,
            steps=args.steps,
            seed=args.seed,
            src=args.src,
            enable_parameters=extra,
        ),
    )
    with Progress(
        TextColumn("denoising"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} steps"),
        TextColumn("{task.fields[per_step]}"),
        TimeElapsedColumn(),
        console=err,
        transient=True,
    ) as bar:
        task = bar.add_task("", total=None, per_step="")

        def on_step(done, total, seconds):
            bar.update(task, completed=done, total=total, per_step=f"{seconds:.2f} s/step")

        image = generate(pipe, plan, on_step, lambda: False)
    write_png(image, args.output)
    return f"{image.width}x{image.height}, seed {plan.seed}"


def run_remote(args):
    from mlxbackend.proto import backend_pb2 as pb

    extra = f"strength:{args.strength}" if args.strength else ""
    reply = connect(args.addr).GenerateImage(
        pb.GenerateImageRequest(
            positive_prompt=args.prompt,
            negative_prompt=args.negative,
            width=args.width,
            height=args.height,
            step=args.steps,
            seed=args.seed,
            src=args.src,
            dst=args.output,
            EnableParameters=extra,
        ),
        timeout=3600,
    )
    return reply.message


def cmd_image(args):
    import os

    from rich.console import Console

    err = Console(stderr=True, highlight=False)
    if not local_or_remote(args, err):
        return 2
    if args.addr:
        args.output = os.path.abspath(args.output)  # the backend writes it
    try:
        done = run_remote(args) if args.addr else run_local(args, err)
    except Exception as exc:  # a BackendError here, or a gRPC error from a running backend
        err.print(f"[red]{failure_text(exc)}[/red]")
        return 1
    if done is None:
        return 2
    err.print(f"wrote {args.output} ({done})")
    return 0


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(prog="mlxbackend")
    add_parser(parser.add_subparsers(dest="command", required=True))
    a = parser.parse_args()
    sys.exit(a.func(a))
