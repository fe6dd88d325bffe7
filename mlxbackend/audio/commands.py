"""`mlxbackend transcribe FILE --model DIR`: transcribe locally (no server), with progress."""

import sys

from mlxbackend.audio.decode import load_audio
from mlxbackend.audio.whisper import (
    Options,
    Segment,
    is_whisper_dir,
    language_code,
    load_whisper,
    transcribe,
)
from mlxbackend.audio.whisper import Progress as Step
from mlxbackend.client import failure_text
from mlxbackend.errors import BackendError


def add_parser(sub):
    p = sub.add_parser(
        "transcribe", help="transcribe an audio file with an MLX whisper folder (local, no server)"
    )
    p.add_argument("file", help="audio file (wav, mp3, m4a, ogg, flac, webm, mp4 …)")
    p.add_argument(
        "--model", required=True, help="MLX whisper folder (config.json + weights.safetensors/npz)"
    )
    p.add_argument("--language", default="", help="ISO code or name; empty = detect")
    p.add_argument("--translate", action="store_true", help="translate to English")
    p.add_argument("--prompt", default="", help="initial prompt (vocabulary, style)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--words", action="store_true", help="word-level timing (refines segment times)")
    p.add_argument("--format", choices=["text", "segments", "json"], default="segments")
    p.set_defaults(func=cmd_transcribe)


def _stamp(seconds: float) -> str:
    m, s = divmod(seconds, 60)
    return f"{int(m):02d}:{s:06.3f}"


def cmd_transcribe(args):
    import json
    from dataclasses import asdict
    from pathlib import Path

    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    out, err = Console(highlight=False), Console(stderr=True, highlight=False)
    try:
        if not is_whisper_dir(args.model):
            err.print(f"[red]{args.model} is not an MLX whisper folder[/red]")
            return 2
        opts = Options(
            language=language_code(args.language),
            translate=args.translate,
            prompt=args.prompt,
            temperature=args.temperature,
            words=args.words,
        )
        audio = load_audio(args.file)
        with err.status("loading model"):
            wm = load_whisper(Path(args.model))
        with Progress(
            TextColumn("transcribing"),
            BarColumn(),
            TextColumn("{task.completed:.0f}/{task.total:.0f} s"),
            TimeElapsedColumn(),
            console=err,
            transient=True,
        ) as bar:
            task = bar.add_task("", total=len(audio) / 16000)

            def emit(event):
                if isinstance(event, Step):
                    bar.update(task, completed=event.done)
                elif isinstance(event, Segment) and args.format == "segments":
                    bar.console.print(
                        f"[dim][{_stamp(event.start)} → {_stamp(event.end)}][/dim]{event.text}"
                    )

            result = transcribe(wm, audio, opts, emit, lambda: False)
    except BackendError as exc:
        err.print(f"[red]{failure_text(exc)}[/red]")
        return 1
    if args.format == "json":
        print(json.dumps(asdict(result), ensure_ascii=False))
    elif args.format == "text":
        out.print(result.text.strip())
    err.print(
        f"[dim]language {result.language}, {result.duration:.1f} s, {len(result.segments)} segments[/dim]"
    )
    return 0


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(prog="mlxbackend")
    add_parser(parser.add_subparsers(dest="command", required=True))
    parsed = parser.parse_args()
    sys.exit(parsed.func(parsed))
