"""`mlxbackend` command line: serve, chat, convert, bench, finetune, export, quantize, transcribe,
vad, tts, music, …"""

import argparse
import asyncio
import logging
import os
import sys

from mlxbackend.audio.commands import add_parser as add_transcribe
from mlxbackend.bench import main as bench_main
from mlxbackend.client import DEFAULT_ADDR, auth_metadata, chat_request, connect
from mlxbackend.distributed.supervisor import add_parser as add_worker
from mlxbackend.distributed.supervisor import localai_argv
from mlxbackend.embed.commands import add_parser as add_embed
from mlxbackend.image.commands import add_parser as add_image
from mlxbackend.music.commands import add_parser as add_music
from mlxbackend.quantize.commands import add_parser as add_quantize
from mlxbackend.server import serve
from mlxbackend.train.commands import add_parsers
from mlxbackend.tts.commands import add_parser as add_tts


def cmd_serve(args):
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    asyncio.run(serve(args.addr, args.model, args.option))
    # Everything is stopped; skip interpreter teardown, where MLX's thread-local state and
    # C++ static destructors can race (seen once as SIGABRT on SIGINT).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


MEDIA_FLAGS = (  # PredictOptions field, argparse dest, flag
    ("Images", "image", "--image"),
    ("Videos", "video", "--video"),
    ("Audios", "audio", "--audio"),
)


def read_media(path: str, flag: str) -> str:
    """A media file as LocalAI sends it: base64 without a data: prefix."""
    import base64

    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise OSError(f"{flag} {path}: {exc.strerror or exc}") from None
    if not data:
        raise OSError(f"{flag} {path}: the file is empty")
    return base64.b64encode(data).decode()


def cmd_chat(args):
    """Stream one chat answer from a running server; reasoning is shown dimmed."""
    import grpc
    from rich.console import Console

    console = Console(highlight=False)
    try:
        media = {
            field: [read_media(path, flag) for path in getattr(args, dest)]
            for field, dest, flag in MEDIA_FLAGS
        }
    except OSError as exc:
        Console(stderr=True, highlight=False).print(str(exc), style="red", markup=False)
        sys.exit(1)
    stub = connect(args.addr)
    request = chat_request(
        " ".join(args.text), max_tokens=args.max_tokens, temperature=args.temperature, **media
    )
    if args.system:
        request.Messages.insert(
            0, request.Messages[0].__class__(role="system", content=args.system)
        )
    try:
        final = None
        for reply in stub.PredictStream(request, metadata=auth_metadata(), timeout=args.timeout):
            for delta in reply.chat_deltas:
                if delta.reasoning_content:
                    console.print(delta.reasoning_content, style="dim", end="")
                if delta.content:
                    console.print(delta.content, end="")
                for call in delta.tool_calls:
                    console.print(f"{call.name}{call.arguments}", style="cyan", end="")
            final = reply
        console.print()
        if final is not None and args.verbose:
            tps = (
                final.tokens / (final.timing_token_generation / 1000)
                if final.timing_token_generation
                else 0
            )
            console.print(
                f"[dim]{final.tokens} tokens, prompt {final.prompt_tokens} tokens, "
                f"TTFT {final.timing_prompt_processing:.0f} ms, {tps:.1f} tok/s[/dim]"
            )
    except grpc.RpcError as exc:
        console.print(f"[red]{exc.code().name}: {exc.details()}[/red]")
        sys.exit(1)


def cmd_convert(args):
    """Hand over to the converter's own command line (same options, rich progress)."""
    if args.source == "gguf":
        from converters.gguf_to_mlx import main as convert_main
    elif args.source == "to-gguf":
        from converters.mlx_to_gguf import main as convert_main
    elif args.source == "whisper":
        from converters.whisper_to_mlx import main as convert_main
    elif args.source == "encoder":
        from converters.encoder_to_mlx import main as convert_main
    else:
        from converters.hf_to_mlx import main as convert_main
    sys.exit(convert_main(args.rest))


def cmd_bench(args):
    bench_main(args)


def cmd_vad(args):
    """Speech segments of an audio file with Silero VAD weights, in this process (no server)."""
    import json
    from pathlib import Path

    from rich.console import Console

    from mlxbackend.audio.decode import load_audio
    from mlxbackend.client import failure_text
    from mlxbackend.errors import BackendError, InvalidInput, NotFound
    from mlxbackend.options import parse_options
    from mlxbackend.vad import vad_source

    err = Console(stderr=True, highlight=False)
    model = Path(args.model).resolve()
    options = parse_options(args.option)
    try:
        if not model.exists():
            raise NotFound(f"model not found: {args.model}")
        named = model.is_file() and model.suffix in (".onnx", ".jit")
        if not named and vad_source(str(model)) is None:
            raise InvalidInput(
                f"{args.model} is not Silero VAD weights (the silero-vad package's "
                "silero_vad.onnx or silero_vad_16k.safetensors, a folder holding one, or an "
                "mlx-audio silero_vad folder)"
            )
        audio = load_audio(args.file)
        from mlxbackend.vad.silero import SETTINGS, load_vad, speech_segments

        for key in sorted(set(options) - set(SETTINGS)):
            err.print(f"ignoring option {key} (known: {', '.join(SETTINGS)})", style="yellow")
        vm = load_vad(model, options)
        segments = speech_segments(vm, audio)
    except BackendError as exc:
        err.print(failure_text(exc), style="red", markup=False)
        return 1
    if args.format == "json":
        print(json.dumps([{"start": start, "end": end} for start, end in segments]))
    else:
        for start, end in segments:
            print(f"{start:.3f} → {end:.3f}")
    speech = sum(end - start for start, end in segments)
    err.print(
        f"[dim]{len(segments)} segments, {speech:.1f} s of speech in {len(audio) / 16000:.1f} s[/dim]"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlxbackend", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "serve", help="run the gRPC backend (LocalAI launches this via run.sh --addr)"
    )
    p.add_argument("--addr", default="127.0.0.1:50051", help="HOST:PORT to bind (exactly)")
    p.add_argument(
        "--model", default="", help="preload a model folder at start; 'default' = bundled SmolLM2"
    )
    p.add_argument(
        "--option", action="append", default=[], help="LoadModel option key:value (repeatable)"
    )
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("chat", help="ask a running server one question and stream the answer")
    p.add_argument("text", nargs="+")
    p.add_argument("--addr", default=DEFAULT_ADDR)
    p.add_argument("--system", default="")
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--timeout", type=float, default=600)
    for _, dest, flag in MEDIA_FLAGS:
        p.add_argument(
            flag,
            dest=dest,
            action="append",
            default=[],
            metavar="FILE",
            help=f"attach this {dest} file to the question (repeatable; needs a vision-language "
            "model)",
        )
    p.add_argument("-v", "--verbose", action="store_true", help="print token counts and speed")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser(
        "convert",
        help="import a checkpoint into an MLX folder (gguf: llama.cpp file; hf: HF folder or id) "
        "or export one as GGUF (to-gguf)",
        description="mlxbackend convert gguf IN.gguf OUT [--dtype float32 --dequantize] | "
        "mlxbackend convert hf SRC OUT [-q --q-bits 4 …] | "
        "mlxbackend convert to-gguf MODEL_DIR OUT.gguf [--type q4_k_m] (export for llama.cpp); "
        "mlxbackend convert whisper SRC OUT [--dtype float16 -q] (HF/OpenAI/MLX whisper → MLX whisper); "
        "mlxbackend convert encoder SRC OUT [--dtype float16] (HF BERT-family encoder → MLX); "
        "add -h after the source for its options",
    )
    p.add_argument("source", choices=["gguf", "hf", "to-gguf", "whisper", "encoder"])
    p.add_argument("rest", nargs=argparse.REMAINDER, help="the converter's arguments")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("bench", help="raw mlx-lm vs the gRPC server, side by side")
    p.add_argument("--model", default="default", help="model folder ('default' = bundled SmolLM2)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--llamacpp", action="store_true", help="also time llama-cpp-python on the GGUF")
    p.add_argument(
        "--concurrency", default="1,2,4,8,16", help="aggregate decode at these stream counts"
    )
    p.set_defaults(func=cmd_bench)

    add_parsers(sub)  # finetune, export

    add_quantize(sub)

    add_transcribe(sub)

    p = sub.add_parser(
        "vad", help="speech segments of an audio file with Silero VAD weights (local, no server)"
    )
    p.add_argument("file", help="audio file (wav, mp3, m4a, ogg, flac, webm, mp4 …)")
    p.add_argument(
        "--model",
        required=True,
        help="silero_vad.onnx or silero_vad_16k.safetensors (the silero-vad package's), a folder "
        "holding one, or an mlx-audio silero_vad folder",
    )
    p.add_argument(
        "--option",
        action="append",
        default=[],
        help="LoadModel option key:value (threshold, min_speech_duration_ms, "
        "min_silence_duration_ms, speech_pad_ms)",
    )
    p.add_argument("--format", choices=["text", "json"], default="text")
    p.set_defaults(func=cmd_vad)

    add_tts(sub)
    add_music(sub)

    add_embed(sub)

    add_image(sub)

    add_worker(sub)
    return parser


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)

    argv = localai_argv(
        argv
    )  # LocalAI's mlx-distributed flags on run.sh (--worker, --rank 0 --hostfile)
    args = build_parser().parse_args(argv)
    code = args.func(args)
    if isinstance(code, int):
        sys.exit(code)


if __name__ == "__main__":
    main()
