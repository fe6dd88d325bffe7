"""Transcription (mlx-whisper) through a real server: a tiny RANDOM whisper folder, tones written
in several containers (decoded by PyAV, no system ffmpeg), LocalAI's units and stream rules."""

import os
import subprocess
import sys
import threading
import wave

import grpc
import pytest

from mlxbackend.proto import backend_pb2 as pb
from tests.conftest import ROOT, Server
from tests.tiny_whisper import CODECS, build_tiny_whisper, write_encoded, write_wav

pytest.importorskip("mlx_whisper")
pytest.importorskip("av")

SHORT = 3.0
LONG = 65.0  # three 30-s windows


@pytest.fixture(scope="module")
def whisper_dir(tmp_path_factory):
    return build_tiny_whisper(tmp_path_factory.mktemp("whisper") / "whisper-tiny-random")


@pytest.fixture(scope="module")
def audio(tmp_path_factory):
    root = tmp_path_factory.mktemp("audio")
    files = {"wav": write_wav(root / "tone.wav", SHORT + 1, rate=44100, channels=2)}
    for suffix in CODECS:
        files[suffix] = write_encoded(root / f"tone.{suffix}", SHORT)
    files["long"] = write_wav(root / "long.wav", LONG, rate=16000, channels=1)
    files["text"] = root / "notes.txt"
    files["text"].write_text("this is not audio\n" * 50)
    files["empty"] = root / "empty.wav"
    files["empty"].write_bytes(b"")
    files["zero"] = root / "zero.wav"
    with wave.open(str(files["zero"]), "wb") as w:  # a valid header, no frames
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(b"")
    return files


@pytest.fixture(scope="module")
def whisper_server(whisper_dir):
    srv = Server()
    reply = srv.stub.LoadModel(
        pb.ModelOptions(Model=whisper_dir.name, ModelPath=str(whisper_dir.parent))
    )
    assert reply.success and "whisper" in reply.message, reply.message
    yield srv
    srv.stop()


def check_result(result: pb.TranscriptResult, length: float):
    assert abs(result.duration - length) < 0.1, (result.duration, length)
    assert result.language
    last_start = 0
    for i, seg in enumerate(result.segments):
        assert seg.id == i
        assert isinstance(seg.start, int) and isinstance(seg.end, int)
        assert 0 <= last_start <= seg.start <= seg.end <= round(length * 1e9) + 10**8, (
            seg.start,
            seg.end,
        )
        last_start = seg.start
        assert seg.text
    assert result.text == "".join(s.text for s in result.segments)


def test_status_ready(whisper_server):
    assert whisper_server.stub.Status(pb.HealthMessage()).state == pb.StatusResponse.READY


@pytest.mark.parametrize("kind", ["wav", *CODECS])
def test_containers(whisper_server, audio, kind):
    result = whisper_server.stub.AudioTranscription(
        pb.TranscriptRequest(dst=str(audio[kind])), timeout=120
    )
    check_result(result, SHORT + 1 if kind == "wav" else SHORT)


def test_stream_long_audio(whisper_server, audio):
    replies = list(
        whisper_server.stub.AudioTranscriptionStream(
            pb.TranscriptRequest(dst=str(audio["long"]), language="en", stream=True), timeout=300
        )
    )
    deltas = [r.delta for r in replies if r.delta]
    finals = [r for r in replies if r.HasField("final_result")]
    assert len(finals) == 1 and replies[-1].HasField("final_result")
    final = finals[0].final_result
    assert len(replies) > 1 and len(deltas) >= 1
    assert "".join(deltas) == final.text  # LocalAI's e2e invariant
    check_result(final, LONG)
    assert final.language == "en"
    # windows after the first: segments beyond 30 s were streamed too
    assert any(s.end > 30e9 for s in final.segments)


def test_segments_arrive_window_by_window(whisper_dir, audio):
    """In-process: segments are emitted while transcribe runs, interleaved with per-window
    progress, not collected at the end; a cancel between windows stops the run."""
    from mlxbackend.audio.decode import load_audio
    from mlxbackend.audio.whisper import Options, Progress, Segment, load_whisper, transcribe
    from mlxbackend.errors import Cancelled

    wm = load_whisper(whisper_dir)
    samples = load_audio(str(audio["long"]))
    events = []
    result = transcribe(wm, samples, Options(language="en"), events.append, lambda: False)
    progress = [i for i, e in enumerate(events) if isinstance(e, Progress)]
    segments = [i for i, e in enumerate(events) if isinstance(e, Segment)]
    assert len(progress) >= 3  # one per 30-s window
    assert segments and segments[0] < progress[0] < segments[-1]
    assert [e for e in events if isinstance(e, Segment)] == result.segments
    seen = []
    with pytest.raises(Cancelled):
        transcribe(wm, samples, Options(language="en"), seen.append, lambda: bool(seen))
    assert sum(isinstance(e, Progress) for e in seen) == 1


def test_unary_matches_segments_and_options(whisper_server, audio):
    stub = whisper_server.stub
    result = stub.AudioTranscription(
        pb.TranscriptRequest(
            dst=str(audio["wav"]),
            language="english",
            prompt="Hello there.",
            temperature=0.3,
            timestamp_granularities=["segment", "word"],
        ),
        timeout=120,
    )
    check_result(result, SHORT + 1)
    assert result.language == "en"
    translated = stub.AudioTranscription(
        pb.TranscriptRequest(dst=str(audio["flac"]), language="de", translate=True), timeout=120
    )
    check_result(translated, SHORT)
    assert translated.language == "de"


@pytest.mark.parametrize(
    "kind,field,code",
    [
        ("missing", {}, grpc.StatusCode.NOT_FOUND),
        ("text", {}, grpc.StatusCode.INVALID_ARGUMENT),
        ("empty", {}, grpc.StatusCode.INVALID_ARGUMENT),
        ("zero", {}, grpc.StatusCode.INVALID_ARGUMENT),
        ("wav", {"language": "xx-klingon"}, grpc.StatusCode.INVALID_ARGUMENT),
        ("wav", {"diarize": True}, grpc.StatusCode.FAILED_PRECONDITION),  # no diarizer loaded
        ("wav", {"timestamp_granularities": ["paragraph"]}, grpc.StatusCode.INVALID_ARGUMENT),
    ],
)
def test_bad_inputs(whisper_server, audio, tmp_path, kind, field, code):
    dst = str(tmp_path / "nope.mp3") if kind == "missing" else str(audio[kind])
    for rpc in (
        whisper_server.stub.AudioTranscription,
        whisper_server.stub.AudioTranscriptionStream,
    ):
        with pytest.raises(grpc.RpcError) as err:
            reply = rpc(pb.TranscriptRequest(dst=dst, **field), timeout=60)
            list(reply) if not isinstance(reply, pb.TranscriptResult) else None
        assert err.value.code() == code, err.value.details()
    assert whisper_server.healthy()


def test_concurrent_and_cancel(whisper_server, audio):
    stub = whisper_server.stub
    # a cancelled stream stops; requests queued behind it still complete
    call = stub.AudioTranscriptionStream(
        pb.TranscriptRequest(dst=str(audio["long"]), language="en"), timeout=300
    )
    results, errors = [], []

    def one(kind):
        try:
            results.append(
                stub.AudioTranscription(pb.TranscriptRequest(dst=str(audio[kind])), timeout=120)
            )
        except grpc.RpcError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(k,)) for k in ("mp3", "ogg")]
    for t in threads:
        t.start()
    next(iter(call))  # the first window's first segment arrived: cancel mid-transcription
    call.cancel()
    for t in threads:
        t.join(120)
    assert not errors and len(results) == 2
    for r in results:
        check_result(r, SHORT)
    assert whisper_server.healthy()


def test_not_loaded(server, audio):
    with pytest.raises(grpc.RpcError) as err:
        server.stub.AudioTranscription(pb.TranscriptRequest(dst=str(audio["wav"])), timeout=30)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert server.healthy()


def test_load_by_type_and_free(server, whisper_dir):
    reply = server.stub.LoadModel(pb.ModelOptions(Model=str(whisper_dir), Type="whisper"))
    assert reply.success and "whisper" in reply.message
    assert server.stub.Free(pb.HealthMessage()).success
    assert server.stub.Status(pb.HealthMessage()).state == pb.StatusResponse.UNINITIALIZED


def test_cli(whisper_dir, audio):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mlxbackend",
            "transcribe",
            str(audio["m4a"]),
            "--model",
            str(whisper_dir),
            "--language",
            "en",
            "--format",
            "json",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    import json

    out = json.loads(proc.stdout)
    assert out["language"] == "en" and abs(out["duration"] - SHORT) < 0.1
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "mlxbackend",
            "transcribe",
            str(audio["text"]),
            "--model",
            str(whisper_dir),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 1 and "InvalidInput" in bad.stderr


def test_diarization_beside_whisper(whisper_dir, audio, tmp_path):
    """Options diarization_model (relative to ModelPath): every segment gets the speaker that
    mlx-audio's own Sortformer run on the same audio puts there most (a tiny random one)."""
    import mlx.core as mx
    from mlx_audio.vad.utils import load

    from mlxbackend.audio.decode import load_audio
    from mlxbackend.audio.diarize import Turn, speaker_of
    from tests.tiny_sortformer import build_tiny_sortformer

    build_tiny_sortformer(whisper_dir.parent / "tiny-sortformer")
    srv = Server()
    try:
        reply = srv.stub.LoadModel(
            pb.ModelOptions(
                Model=whisper_dir.name, ModelPath=str(whisper_dir.parent),
                Options=["diarization_model:tiny-sortformer"],
            ),
            timeout=120,
        )  # fmt: skip
        assert reply.success and "diarization" in reply.message, reply.message
        request = pb.TranscriptRequest(dst=str(audio["long"]), language="en", diarize=True)
        result = srv.stub.AudioTranscription(request, timeout=300)
        streamed = list(srv.stub.AudioTranscriptionStream(request, timeout=300))[-1].final_result
    finally:
        srv.stop()
    out = load(whisper_dir.parent / "tiny-sortformer", strict=True).generate(
        mx.array(load_audio(str(audio["long"]))), sample_rate=16000
    )
    turns = [Turn(s.start, s.end, s.speaker) for s in out.segments]
    assert turns and result.segments
    want = [speaker_of(s.start / 1e9, s.end / 1e9, turns) for s in result.segments]
    assert [s.speaker for s in result.segments] == want
    assert any(want) and all(w == "" or w.startswith("SPEAKER_") for w in want)
    assert [s.speaker for s in streamed.segments] == want


def test_diarize_without_a_diarizer_names_the_option(whisper_server, audio):
    with pytest.raises(grpc.RpcError) as err:
        whisper_server.stub.AudioTranscription(
            pb.TranscriptRequest(dst=str(audio["wav"]), diarize=True), timeout=60
        )
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "diarization_model" in err.value.details()
