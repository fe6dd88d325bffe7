"""Text to speech with a language-model TTS family: a tiny random Soprano in the real folder layout
(tests/tiny_soprano.py), over gRPC, against mlx-audio's own `generate` on the same text and seed;
sentences streamed as they are made; requests side by side keep their own random draws; bad
inputs; the CLI."""

import json
import shutil
import threading
from pathlib import Path

import grpc
import numpy as np
import pytest

from mlxbackend.proto import backend_pb2 as pb
from tests.conftest import Server, run_cli
from tests.test_tts import load, read_wav, status

RATE = 32000
MAX_TOKENS = 24  # per sentence; the random model rarely samples its stop token
TEXT = "Hello there, how are you today? The quick brown fox jumps over the lazy dog.\nSix seven!"
OPTIONS = [f"max_tokens:{MAX_TOKENS}", "seed:7"]


@pytest.fixture(scope="session")
def soprano(tmp_path_factory) -> Path:
    from tests.tiny_soprano import build_tiny_soprano

    return build_tiny_soprano(tmp_path_factory.mktemp("tts") / "Soprano-tiny")


@pytest.fixture(scope="module")
def server(soprano):
    srv = Server()
    assert "Soprano" in load(srv, soprano, Options=OPTIONS)
    yield srv
    srv.stop()


def reference(folder: Path, text: str, seed=7, max_tokens=MAX_TOKENS, **kw) -> np.ndarray:
    """mlx-audio's own Soprano: its loader, then generate(text) after mx.random.seed(seed),
    PCM16 as mlx_audio.audio_io.write makes it."""
    import mlx.core as mx
    from mlx_audio.tts.utils import load_model

    model = load_model(folder, strict=True)
    mx.random.seed(seed)
    audio = [np.array(r.audio) for r in model.generate(text, max_tokens=max_tokens, **kw)]
    return (np.clip(np.concatenate(audio), -1.0, 1.0) * 32767).astype(np.int16)


def test_detection_and_decoder_sizes(soprano, tmp_path):
    """Found by model_type or architecture; the decoder is sized from config.json's fields, else
    from the weights (mlx-audio's loader guesses from the folder name: 'soprano-1.1' → 768)."""
    from mlxbackend.tts import tts_family, tts_source
    from mlxbackend.tts.engine import load_tts

    assert tts_source(str(soprano)) == soprano and tts_family(soprano) == "soprano"
    renamed = tmp_path / "soprano-1.1-mine"
    shutil.copytree(soprano, renamed)
    config = json.loads((renamed / "config.json").read_text())
    for key in ("decoder_dim", "decoder_intermediate_dim", "input_kernel", "model_type"):
        config.pop(key)
    (renamed / "config.json").write_text(json.dumps(config))
    assert tts_family(renamed) == "soprano"  # by its architectures
    tm = load_tts(renamed, {"max_tokens": 3})
    sizes = tm.model.config.decoder_config
    assert (sizes.decoder_dim, sizes.decoder_intermediate_dim, sizes.input_kernel) == (512, 1536, 3)
    assert tm.sample_rate == RATE and "Soprano" in tm.describe()


def test_speech_equals_mlx_audio_and_the_stream(server, soprano, tmp_path):
    """Unary TTS: a PCM16 mono 32 kHz WAV equal to mlx-audio's generate on the same text and seed
    (exactly: same weights, same ops and the same random draws, on MLX's CPU backend). TTSStream:
    {"sample_rate": 32000}, then one chunk per sentence, concatenated == the WAV."""
    dst = tmp_path / "speech.wav"
    reply = server.stub.TTS(pb.TTSRequest(text=TEXT, dst=str(dst)), timeout=300)
    assert reply.success and "3 segments" in reply.message, reply.message
    params, frames = read_wav(dst)
    assert params == (1, 2, RATE)
    ref = reference(soprano, TEXT)
    assert frames.shape == ref.shape and len(frames) == 3 * MAX_TOKENS * 2048
    np.testing.assert_array_equal(frames, ref)
    assert np.abs(frames).max() > 1000  # real signal, not rounding noise
    assert [p.name for p in tmp_path.iterdir()] == ["speech.wav"]

    replies = list(server.stub.TTSStream(pb.TTSRequest(text=TEXT, language="en"), timeout=300))
    assert json.loads(replies[0].message) == {"sample_rate": RATE} and not replies[0].audio
    chunks = [r.audio for r in replies[1:]]
    assert len(chunks) == 3 and all(chunks)
    np.testing.assert_array_equal(np.frombuffer(b"".join(chunks), dtype="<i2"), frames)
    assert server.healthy()


def test_side_by_side_requests_keep_their_draws(server, soprano, tmp_path):
    """A stream and a unary request run at once, interleaved token by token on the worker (the
    short one finishes first); each equals its own solo mlx-audio result, and Health answers."""
    long_text = " ".join(["The quick brown fox jumps over the lazy dog."] * 4)
    short = "Hello there, how are you today?"
    got, events = {}, []

    def stream():
        replies = server.stub.TTSStream(pb.TTSRequest(text=long_text), timeout=300)
        got["long"] = b"".join(r.audio for r in replies)
        events.append("long")

    thread = threading.Thread(target=stream)
    thread.start()
    dst = tmp_path / "short.wav"
    server.stub.TTS(pb.TTSRequest(text=short, dst=str(dst)), timeout=300)
    events.append("short")
    assert server.healthy()
    thread.join(300)
    assert events == ["short", "long"]
    np.testing.assert_array_equal(read_wav(dst)[1], reference(soprano, short))
    np.testing.assert_array_equal(
        np.frombuffer(got["long"], dtype="<i2"), reference(soprano, long_text)
    )


def test_free_aborts_a_stream_between_tokens(server, soprano):
    """Free while a sentence is being generated ends the stream with ABORTED; Health is OK."""
    text = " ".join(["The quick brown fox jumps over the lazy dog."] * 12)
    stream = server.stub.TTSStream(pb.TTSRequest(text=text), timeout=300)
    assert json.loads(next(stream).message) == {"sample_rate": RATE}
    assert next(stream).audio  # the first sentence; the second is under way
    server.stub.Free(pb.HealthMessage(), timeout=60)
    with pytest.raises(grpc.RpcError) as err:
        list(stream)
    assert err.value.code() == grpc.StatusCode.ABORTED and "Free" in err.value.details()
    assert server.healthy()
    load(server, soprano, Options=OPTIONS)


def test_bad_inputs(server, soprano, tmp_path):
    ok = str(tmp_path / "x.wav")
    cases = [
        (pb.TTSRequest(text="", dst=ok), "empty"),
        (pb.TTSRequest(text="... !", dst=ok), "nothing to speak"),
        (pb.TTSRequest(text="Hi.", dst=ok, voice="af_heart"), "one built-in voice"),
        (pb.TTSRequest(text="Hi.", dst=ok, language="fr"), "English only"),
        (pb.TTSRequest(text="Hi.", dst=str(tmp_path / "no" / "x.wav")), "does not exist"),
    ]
    for request, words in cases:
        got, details = status(lambda r=request: server.stub.TTS(r, timeout=60))
        assert got.name == "INVALID_ARGUMENT" and words in details, (request, got, details)
    for options, words in (
        (["speed:1.5"], "speed"),
        (["temperature:hot"], "temperature"),
        (["top_p:2"], "top_p"),
    ):
        got, details = status(
            lambda o=options: server.stub.LoadModel(
                pb.ModelOptions(Model=str(soprano), Options=o), timeout=60
            )
        )
        assert got.name == "INVALID_ARGUMENT" and f"option {words}" in details, details
    assert not Path(ok).exists()
    assert server.healthy()
    load(server, soprano, Options=OPTIONS)


def test_cli_speaks_the_same(soprano, tmp_path):
    """`mlxbackend tts … --model <Soprano folder> --stream` writes the same samples."""
    out = tmp_path / "cli.wav"
    options = [f"--option={o}" for o in OPTIONS]
    done = run_cli("tts", TEXT, "-o", str(out), "--model", str(soprano), *options, "--stream")
    assert done.returncode == 0, done.stderr
    assert "3 segments" in done.stderr
    params, frames = read_wav(out)
    assert params == (1, 2, RATE)
    np.testing.assert_array_equal(frames, reference(soprano, TEXT))
