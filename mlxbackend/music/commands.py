"""`mlxbackend music "description" -o out.wav --model DIR`: a song from a MiniMax Music 3 folder,
locally (no server), with the same code the SoundGeneration RPC runs, and a progress bar."""

import sys

from mlxbackend.client import failure_text
from mlxbackend.errors import BackendError


def add_parser(sub):
    p = sub.add_parser(
        "music",
        help="generate music into a WAV file with a MiniMax Music 3 folder (local, no server)",
    )
    p.add_argument("description", help="the music: style, instruments, voice, mood ('-': stdin)")
    p.add_argument("-o", "--output", required=True, help="WAV file to write (PCM16 stereo)")
    p.add_argument(
        "--model",
        required=True,
        help="MiniMax Music 3 folder in mlx-audio's layout (config.json, *.safetensors, "
        "tokenizer/)",
    )
    p.add_argument(
        "--lyrics", default="", help="lyrics with [verse] / [chorus] tags (default: instrumental)"
    )
    p.add_argument("--lyrics-file", default="", help="read the lyrics from this file")
    p.add_argument("--duration", type=float, default=None, help="seconds (default 60, at most 360)")
    p.add_argument(
        "--option",
        action="append",
        default=[],
        help="LoadModel option key:value (steps, duration, seed)",
    )
    p.set_defaults(func=cmd_music)


def cmd_music(args):
    import time
    from pathlib import Path

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from mlxbackend.errors import NotFound
    from mlxbackend.music import SongRequest
    from mlxbackend.music.minimax import compose, load_music, plan_song
    from mlxbackend.options import parse_options
    from mlxbackend.tts.wav import check_dst, pcm16, write_wav

    err = Console(stderr=True, highlight=False)
    description = sys.stdin.read() if args.description == "-" else args.description
    model = Path(args.model).resolve()
    start = time.perf_counter()
    try:
        if not model.exists():
            raise NotFound(f"model not found: {args.model}")
        check_dst(args.output, "music")
        lyrics = Path(args.lyrics_file).read_text() if args.lyrics_file else args.lyrics
        with err.status("loading model"):
            mm = load_music(model, parse_options(args.option))
        req = SongRequest(text=description, lyrics=lyrics, duration=args.duration)
        song = plan_song(mm, req)
        bars = Progress(
            "{task.description}",
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=err,
        )
        tasks = {}

        def progress(phase: str, done: int, total: int):
            if phase not in tasks:
                label = "language model (frames)" if phase == "frames" else "flow + vocoder"
                tasks[phase] = bars.add_task(label, total=total)
            bars.update(tasks[phase], completed=done, total=total)

        with bars:
            samples = compose(mm, song, progress=progress)
        write_wav(args.output, [pcm16(samples)], mm.sample_rate)
    except (BackendError, OSError) as exc:
        text = failure_text(exc) if isinstance(exc, BackendError) else str(exc)
        err.print(text, style="red", markup=False)
        return 1
    err.print(
        f"[dim]wrote {args.output}: {len(samples) / mm.sample_rate:.2f} s at {mm.sample_rate} Hz "
        f"stereo, seed {song.seed}, {song.steps} flow steps in "
        f"{time.perf_counter() - start:.1f} s[/dim]"
    )
    return 0
