#!/usr/bin/env python
"""A vision-language model end to end, the way LocalAI drives it.

Starts a backend process as LocalAI does (`run.sh --addr` on a free port, via
`mlxbackend.client.spawn_server`), loads a VLM with LoadModel, then over gRPC:

  1. asks a question about an image (PredictOptions.Images, base64 as LocalAI sends it);
  2. asks a second turn of the same conversation (LocalAI sends the history and the image again;
     the first user message carries the model's media marker, `<__media__>`, where the image was);
  3. starts a new conversation about the same image;
  4. with --video, asks about a video (PredictOptions.Videos);

printing each answer as it streams, and after each request the Status counters
media_prompts_encoded / media_prompts_from_cache and GetMetrics prompt_tokens_processed (the prompt
tokens actually prefilled: a turn that reuses the cached image prefix prefills only the new
tokens). Then it stops the server.

  python scripts/vlm_demo.py                                   # mlx-community/SmolVLM-256M-Instruct-bf16
  python scripts/vlm_demo.py --model mlx-community/Qwen2.5-VL-3B-Instruct-4bit --image photo.jpg
  python scripts/vlm_demo.py --model ./models/my-vlm --video clip.mp4

--model is a Hugging Face id (from the local HF cache, else downloaded by LoadModel unless
HF_HUB_OFFLINE=1) or a local folder. Without --image a white picture with a red square is used.
Exit status: 0 when every request answered, 1 otherwise (the gRPC status and message printed).
"""

import argparse
import base64
import io
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_MODEL = "mlx-community/SmolVLM-256M-Instruct-bf16"
MARKER = "<__media__>"


def red_square_png(size: int = 256) -> bytes:
    """A white picture with a red square in the middle, as PNG bytes."""
    from PIL import Image

    image = Image.new("RGB", (size, size), "white")
    image.paste((220, 0, 0), (size // 4, size // 4, 3 * size // 4, 3 * size // 4))
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def counters(stub) -> dict:
    from mlxbackend.proto import backend_pb2 as pb

    breakdown = dict(stub.Status(pb.HealthMessage(), timeout=30).memory.breakdown)
    return {k: breakdown.get(k, 0) for k in ("media_prompts_encoded", "media_prompts_from_cache")}


def ask(stub, title: str, messages: list, args, images=(), videos=()) -> str:
    """Stream one answer; print it, its timings, the counters and GetMetrics."""
    from mlxbackend.client import auth_metadata
    from mlxbackend.proto import backend_pb2 as pb

    print(f"\n== {title}")
    for role, content in messages:
        print(f"   {role}: {content}")
    request = pb.PredictOptions(
        Messages=[pb.Message(role=r, content=c) for r, c in messages],
        UseTokenizerTemplate=True,
        Images=[b64(i) for i in images],
        Videos=[b64(v) for v in videos],
        Tokens=args.max_tokens,
        Temperature=args.temperature,
        TopP=0.95,
    )
    print("   assistant: ", end="", flush=True)
    start = time.perf_counter()
    text, final = [], None
    for reply in stub.PredictStream(request, metadata=auth_metadata(), timeout=args.timeout):
        for delta in reply.chat_deltas:
            if delta.content:
                text.append(delta.content)
                print(delta.content, end="", flush=True)
        final = reply
    wall = time.perf_counter() - start
    print()
    metrics = stub.GetMetrics(pb.MetricsRequest(), timeout=30)
    if final is not None:
        print(
            f"   [{final.prompt_tokens} prompt tokens, {final.tokens} generated, "
            f"TTFT {final.timing_prompt_processing:.0f} ms, {wall:.2f} s in all]"
        )
    c = counters(stub)
    print(
        f"   Status: media_prompts_encoded={c['media_prompts_encoded']} "
        f"media_prompts_from_cache={c['media_prompts_from_cache']}; "
        f"GetMetrics: prompt_tokens_processed={metrics.prompt_tokens_processed}"
    )
    return "".join(text).strip()


def load_request(model: str, args):
    from mlxbackend.proto import backend_pb2 as pb

    path = Path(model).expanduser()
    looks_local = path.exists() or model.startswith((".", "/", "~")) or model.count("/") != 1
    options = [f"max_pixels:{args.max_pixels}"] if args.max_pixels else []
    if looks_local:  # a folder: absolute path (LoadModel says NOT_FOUND if it is not there)
        return pb.ModelOptions(Model=str(path.resolve()), ContextSize=args.context, Options=options)
    return pb.ModelOptions(Model=model, ContextSize=args.context, Options=options)


def run(args, stub) -> None:
    from mlxbackend.proto import backend_pb2 as pb

    image = Path(args.image).read_bytes() if args.image else red_square_png()
    video = Path(args.video).read_bytes() if args.video else None
    print(f"LoadModel {args.model} …", flush=True)
    start = time.perf_counter()
    loaded = stub.LoadModel(load_request(args.model, args), timeout=args.load_timeout)
    print(f"{loaded.message} ({time.perf_counter() - start:.1f} s)")
    meta = stub.ModelMetadata(pb.ModelOptions(), timeout=30)
    print(f"media_marker: {meta.media_marker!r}")
    print(f"image: {args.image or 'generated: a red square on white, 256x256'}")

    first = ask(stub, "1. a question about the image", [("user", args.question)], args, [image])
    ask(
        stub,
        "2. second turn, same conversation (image prefix should come from the cache)",
        [("user", MARKER + args.question), ("assistant", first), ("user", args.follow_up)],
        args,
        [image],
    )
    ask(stub, "3. new conversation, same image", [("user", args.other_question)], args, [image])
    if video is not None:
        ask(
            stub,
            f"4. a question about {args.video}",
            [("user", args.video_question)],
            args,
            (),
            [video],
        )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help="HF id or local folder of a VLM")
    parser.add_argument("--image", default="", help="image file (default: a generated red square)")
    parser.add_argument("--video", default="", help="also ask about this video file")
    parser.add_argument("--question", default="What do you see in this image? Name the colors.")
    parser.add_argument("--follow-up", default="Where in the image is it?")
    parser.add_argument("--other-question", default="Describe this image in one sentence.")
    parser.add_argument("--video-question", default="What happens in this video?")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--context", type=int, default=4096, help="LoadModel ContextSize")
    parser.add_argument("--max-pixels", type=int, default=0, help="Options max_pixels (0 = off)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per request")
    parser.add_argument("--load-timeout", type=float, default=1800, help="LoadModel (downloads)")
    args = parser.parse_args(argv)
    for flag, value in (("--image", args.image), ("--video", args.video)):
        if value and not Path(value).is_file():
            print(f"{flag} {value}: no such file", file=sys.stderr)
            return 2

    import grpc

    from mlxbackend.client import spawn_server, stop_server

    with tempfile.NamedTemporaryFile("w+", prefix="vlm-demo-", suffix=".log", delete=False) as log:
        print(f"starting the backend (log: {log.name}) …", flush=True)
        proc, stub = spawn_server(timeout=120, log=log)
        try:
            run(args, stub)
            code = 0
        except grpc.RpcError as exc:
            print(f"\n{exc.code().name}: {exc.details()}", file=sys.stderr)
            code = 1
        finally:
            stop_server(proc)
    if code == 0:
        Path(log.name).unlink(missing_ok=True)  # kept for reading when something failed
    return code


if __name__ == "__main__":
    sys.exit(main())
