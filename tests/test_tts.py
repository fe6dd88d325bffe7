"""Text to speech over gRPC (TTS, TTSStream) with a tiny random Kokoro in mlx-audio's real folder
layout (tests/tiny_kokoro.py), against mlx-audio's own Kokoro call on the same phonemes, voice
pack, speed and seed; LocalAI's streaming contract; atomic dst; bad inputs; the CLI; and the
offline espeak-ng G2P against misaki's own (where misaki and phonemizer are installed).

One synthesis of the tiny model takes about 3 s per short segment on 2 CPU cores: the tests use
two-word texts and few calls."""

import json
import wave
from pathlib import Path
from types import SimpleNamespace

import grpc
import numpy as np
import pytest

from mlxbackend.proto import backend_pb2 as pb
from tests.conftest import Server, run_cli

TEXT = "Hi.\nBye!"  # two segments (one per line), as mlx-audio's Kokoro splits them
PHONEMES = ["hˈI.", "bˈI!"]  # misaki's espeak mapping (EspeakFallback, en-us) of each line
RATE = 24000


@pytest.fixture(scope="session")
def kokoro(tmp_path_factory) -> Path:
    from tests.tiny_kokoro import build_tiny_kokoro

    return build_tiny_kokoro(tmp_path_factory.mktemp("tts") / "Kokoro-tiny")


@pytest.fixture(scope="module")
def server(kokoro):
    srv = Server()
    load(srv, kokoro)
    yield srv
    srv.stop()


def load(srv, folder: Path, **fields) -> str:
    reply = srv.stub.LoadModel(pb.ModelOptions(Model=str(folder), **fields), timeout=120)
    assert reply.success, reply.message
    return reply.message


def read_wav(path) -> tuple:
    with wave.open(str(path), "rb") as w:
        params = (w.getnchannels(), w.getsampwidth(), w.getframerate())
        return params, np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")


def reference(folder: Path, phonemes: list, voice: Path, speed=1.0, seed=0) -> np.ndarray:
    """mlx-audio's own Kokoro: its loader, and the call its pipeline makes for each segment
    (KokoroPipeline.infer: model(ps, pack[len(ps) - 1], speed)), after mx.random.seed(seed);
    PCM16 as mlx_audio.audio_io.write makes it."""
    import mlx.core as mx
    from mlx_audio.tts.models.kokoro.pipeline import KokoroPipeline
    from mlx_audio.tts.utils import load_model

    model = load_model(folder, strict=True)
    pack = mx.load(str(voice))["voice"]
    out = []
    for ps in phonemes:
        mx.random.seed(seed)
        audio = np.array(KokoroPipeline.infer(model, ps, pack, speed).audio[0])
        out.append((np.clip(audio, -1.0, 1.0) * 32767).astype(np.int16))
    return np.concatenate(out)


def status(call) -> tuple:
    with pytest.raises(grpc.RpcError) as err:
        result = call()
        if not isinstance(result, pb.Result):
            list(result)  # a stream
    return err.value.code(), err.value.details()


def test_detection_of_folders(kokoro, tmp_path):
    from mlxbackend.tts import tts_family, tts_source

    assert tts_source(str(kokoro)) == kokoro
    assert tts_family(kokoro) == "kokoro"
    legacy = tmp_path / "hexgrad"  # hexgrad's config.json has no model_type
    legacy.mkdir()
    config = json.loads((kokoro / "config.json").read_text())
    del config["model_type"]
    (legacy / "config.json").write_text(json.dumps(config))
    assert tts_source(str(legacy)) == legacy
    llm = tmp_path / "llm"
    llm.mkdir()
    (llm / "config.json").write_text(json.dumps({"model_type": "qwen3"}))
    assert tts_source(str(llm)) is None
    assert tts_source(str(llm), model_type="tts") == llm  # Type tts: loading says what is wrong
    assert tts_source("", str(kokoro / "kokoro-v1_0.safetensors")) == kokoro  # ModelFile
    other = tmp_path / "qwen3-tts"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "qwen3_tts"}))
    assert tts_source(str(other)) == other
    from mlxbackend.errors import InvalidInput, Unsupported
    from mlxbackend.tts.engine import load_tts

    with pytest.raises(Unsupported, match="qwen3_tts"):
        load_tts(other, {})
    with pytest.raises(InvalidInput, match="no mlx-audio TTS family"):
        load_tts(llm, {})


def test_speech_equals_mlx_audio_and_the_stream(server, kokoro, tmp_path):
    """Unary TTS: a PCM16 mono 24 kHz WAV whose samples equal mlx-audio's own Kokoro call on the
    same phonemes, voice pack, speed and seed (exactly: same weights, same ops, both on MLX's CPU
    backend). TTSStream: {"sample_rate": 24000} first, then one PCM16 chunk per segment whose
    concatenation is the WAV's frames."""
    dst = tmp_path / "speech.wav"
    reply = server.stub.TTS(pb.TTSRequest(text=TEXT, dst=str(dst), language="en"), timeout=300)
    assert reply.success and str(dst) in reply.message, reply.message
    assert "2 segments" in reply.message and "af_tiny" in reply.message
    params, frames = read_wav(dst)
    assert params == (1, 2, RATE)
    ref = reference(kokoro, PHONEMES, kokoro / "voices" / "af_tiny.safetensors")
    assert frames.shape == ref.shape and len(frames) > RATE // 10
    np.testing.assert_array_equal(frames, ref)
    assert np.abs(frames).max() > 0
    assert [p.name for p in tmp_path.iterdir()] == ["speech.wav"]  # no temp file left

    replies = list(server.stub.TTSStream(pb.TTSRequest(text=TEXT, language="en"), timeout=300))
    assert json.loads(replies[0].message) == {"sample_rate": RATE} and not replies[0].audio
    chunks = [r.audio for r in replies[1:]]
    assert len(chunks) == 2 and all(chunks) and not any(r.message for r in replies[1:])
    assert b"RIFF" not in chunks[0][:4]  # raw PCM: LocalAI writes the header itself
    np.testing.assert_array_equal(np.frombuffer(b"".join(chunks), dtype="<i2"), frames)
    assert server.healthy()


def test_bad_inputs(server, kokoro, tmp_path):
    """Each is refused before any synthesis, with a status naming the problem; Health stays OK."""
    ok = str(tmp_path / "x.wav")
    cases = [
        (pb.TTSRequest(text="", dst=ok), "INVALID_ARGUMENT", "empty"),
        (pb.TTSRequest(text="  \n ", dst=ok), "INVALID_ARGUMENT", "empty"),
        (pb.TTSRequest(text="Hi.", dst=""), "INVALID_ARGUMENT", "dst"),
        (
            pb.TTSRequest(text="Hi.", dst=str(tmp_path / "no" / "x.wav")),
            "INVALID_ARGUMENT",
            "does not exist",
        ),
        (pb.TTSRequest(text="Hi.", dst=str(tmp_path)), "INVALID_ARGUMENT", "folder"),
        (pb.TTSRequest(text="Hi.", dst=ok, voice="af_heart"), "INVALID_ARGUMENT", "af_tiny"),
        (
            pb.TTSRequest(text="Hi.", dst=ok, voice=str(tmp_path / "v.safetensors")),
            "INVALID_ARGUMENT",
            "not found",
        ),
        (pb.TTSRequest(text="Hi.", dst=ok, language="xx"), "INVALID_ARGUMENT", "language"),
        (pb.TTSRequest(text="Hi.", dst=ok, language="ja"), "FAILED_PRECONDITION", "misaki[ja]"),
    ]
    for request, code, words in cases:
        got, details = status(lambda r=request: server.stub.TTS(r, timeout=60))
        assert got.name == code and words in details, (request, got, details)
        assert server.healthy()
    # the stream refuses before its first message
    got, details = status(lambda: server.stub.TTSStream(pb.TTSRequest(text=""), timeout=60))
    assert got.name == "INVALID_ARGUMENT" and "empty" in details
    got, details = status(
        lambda: server.stub.TTSStream(pb.TTSRequest(text="Hi.", voice="nope"), timeout=60)
    )
    assert got.name == "INVALID_ARGUMENT" and "af_tiny" in details
    assert not Path(ok).exists()
    assert server.healthy()


def test_failed_synthesis_leaves_dst_as_it_was(server, tmp_path):
    """A voice whose pack is NaN makes Kokoro produce NaN: INTERNAL, and dst keeps its previous
    content with no temp file beside it (the WAV is published atomically, only when complete)."""
    import mlx.core as mx

    voice = tmp_path / "voices" / "nan.safetensors"
    voice.parent.mkdir()
    mx.save_safetensors(str(voice), {"voice": mx.full((510, 1, 256), float("nan"))})
    out = tmp_path / "out"
    out.mkdir()
    dst = out / "speech.wav"
    dst.write_bytes(b"previous")
    got, details = status(
        lambda: server.stub.TTS(
            pb.TTSRequest(text="Hi.", dst=str(dst), voice=str(voice)), timeout=120
        )
    )
    assert got.name == "INTERNAL" and "finite" in details, details
    assert dst.read_bytes() == b"previous"
    assert [p.name for p in out.iterdir()] == ["speech.wav"]
    assert server.healthy()


def test_other_model_loaded(server, kokoro, tiny_dir, tmp_path):
    """TTS while the slot holds a text LLM: FAILED_PRECONDITION naming it."""
    load(server, tiny_dir)
    try:
        for call in (
            lambda: server.stub.TTS(
                pb.TTSRequest(text="Hi.", dst=str(tmp_path / "x.wav")), timeout=60
            ),
            lambda: server.stub.TTSStream(pb.TTSRequest(text="Hi."), timeout=60),
        ):
            got, details = status(call)
            assert got.name == "FAILED_PRECONDITION" and tiny_dir.name in details, details
            assert "Kokoro" in details
        assert server.healthy()
    finally:
        assert "Kokoro" in load(server, kokoro)


def test_free_aborts_a_stream(server, kokoro):
    """Free while a stream is between segments ends it with ABORTED; the model is gone."""
    stream = server.stub.TTSStream(pb.TTSRequest(text=TEXT), timeout=300)
    assert json.loads(next(stream).message) == {"sample_rate": RATE}
    assert next(stream).audio
    server.stub.Free(pb.HealthMessage(), timeout=60)
    with pytest.raises(grpc.RpcError) as err:
        list(stream)
    assert err.value.code() == grpc.StatusCode.ABORTED and "Free" in err.value.details()
    assert server.healthy()
    got, _ = status(lambda: server.stub.TTSStream(pb.TTSRequest(text="Hi."), timeout=60))
    assert got.name == "FAILED_PRECONDITION"
    load(server, kokoro)


def test_cli_streams_the_same_speech(kokoro, tmp_path):
    """`mlxbackend tts … --stream` (local, no server) writes the same samples as mlx-audio."""
    out = tmp_path / "cli.wav"
    done = run_cli(
        "tts", TEXT, "-o", str(out), "--model", str(kokoro), "--voice", "af_tiny", "--stream"
    )
    assert done.returncode == 0, done.stderr
    assert "2 segments" in done.stderr
    params, frames = read_wav(out)
    assert params == (1, 2, RATE)
    ref = reference(kokoro, PHONEMES, kokoro / "voices" / "af_tiny.safetensors")
    np.testing.assert_array_equal(frames, ref)

    bad = run_cli("tts", "Hi.", "-o", str(out), "--model", str(kokoro), "--voice", "nope")
    assert bad.returncode == 1 and "unknown voice 'nope'" in bad.stderr, bad.stderr


# -- G2P (no synthesis) ---------------------------------------------------------------------------
SENTENCES = {
    "en-us": [
        "Hello, world! This is (a) test of Kokoro at 3 pm.",
        "“Quoted,” she said; then—silence…",
        "Mr. Smith's well-known co-op costs $5.50?",
        "...",
    ],
    "es": ["¡Hola, mundo! ¿Qué tal?", "Buenos días (señor)."],
    "fr-fr": ["Bonjour le monde. C'est «très» bien!", "Il a dit: « oui »."],
    "it": ["Ciao, mondo!"],
    "pt-br": ["Olá, mundo! Tudo bem?"],
    "hi": ["नमस्ते दुनिया।"],
}


def test_espeak_g2p_equals_misaki():
    """Our ctypes espeak-ng path gives exactly misaki's phonemes (misaki.espeak over phonemizer,
    on the same espeakng-loader library): EspeakG2P for each language, EspeakFallback's English
    mapping for en-us and en-gb."""
    pytest.importorskip("phonemizer")
    misaki = pytest.importorskip("misaki.espeak")
    from mlxbackend.tts import espeak

    for language, sentences in SENTENCES.items():
        ref = misaki.EspeakG2P(language=language)
        for s in sentences:
            assert espeak.g2p(s, language) == ref(s)[0], (language, s)
    for british in (False, True):
        fallback = misaki.EspeakFallback(british=british)
        for s in [
            "The quick brown fox jumps over the lazy dog.",
            "“Quoted,” she said; then—silence…",
            "Hi.",
            "Bye!",
        ]:
            assert espeak.g2p_english(s, british) == fallback(SimpleNamespace(text=s))[0], s
    assert [espeak.g2p_english(line) for line in TEXT.split("\n")] == PHONEMES


def test_languages_and_segments(kokoro):
    from mlxbackend.errors import InvalidInput
    from mlxbackend.tts import kokoro as k

    assert [
        k.language_code(x)
        for x in ("en", "EN-us", "en_GB", "es-MX", "fr", "pt_BR", "a", "zh-CN", "Italian")
    ] == list("aabefpazi")
    with pytest.raises(InvalidInput):
        k.language_code("klingon")
    tm = SimpleNamespace(settings=k.Settings(g2p="espeak"), path=kokoro)
    assert k.request_language(tm, "", "ef_dora") == "e"
    assert k.request_language(tm, "", "af_tiny") == "a"
    assert k.request_language(tm, "", "/x/my_voice.safetensors") == "a"
    assert k.request_language(tm, "fr", "af_tiny") == "f"
    # segments never pass the phoneme limit: cut at sentences, clauses, then words
    text = "One two three, four five six. " * 12
    segments = k.phonemize(tm, text.strip(), "a", 60)
    assert len(segments) > 4 and all(0 < len(ps) <= 60 for _, ps in segments)
    assert " ".join(g for g, _ in segments).split() == text.split()
    with pytest.raises(InvalidInput):
        k.settings_from({"speed": 0})
    with pytest.raises(InvalidInput):
        k.settings_from({"g2p": "festival"})
