"""Voice activity detection over gRPC with the real Silero weights of the `silero-vad` package,
against that package's own reference model (its TorchScript file on CPU) on speech espeak-ng
speaks, separated by silences and noise."""

import shutil
import subprocess
from pathlib import Path

import grpc
import numpy as np
import pytest

from mlxbackend.proto import backend_pb2 as pb
from tests.conftest import Server

RATE = 16000
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Voice activity detection finds where people speak.",
    "Silence and noise are not speech.",
]
TOLERANCE_S = 0.030  # every boundary within 30 ms of the reference's


def silero_data() -> Path:
    import silero_vad

    return Path(silero_vad.__file__).parent / "data"


def say(text: str, folder: Path) -> np.ndarray:
    """espeak-ng's speech for `text`, float32 mono at 16 kHz (PyAV resamples its 22 kHz WAV)."""
    from mlxbackend.audio.decode import load_audio

    path = folder / f"{abs(hash(text))}.wav"
    subprocess.run(
        [shutil.which("espeak-ng"), "-v", "en-us", "-s", "150", "-w", str(path), text], check=True
    )
    return load_audio(str(path)).astype(np.float32)


@pytest.fixture(scope="module")
def speech(tmp_path_factory) -> np.ndarray:
    """Sentences separated by silence, low noise and a loud noise burst."""
    if not shutil.which("espeak-ng"):
        pytest.skip("espeak-ng is not installed (apt-get install -y espeak-ng)")
    folder = tmp_path_factory.mktemp("vad")
    rng = np.random.default_rng(0)
    parts = [np.zeros(RATE // 2, np.float32)]
    for i, text in enumerate(SENTENCES):
        parts.append(say(text, folder))
        gap = rng.normal(0, 0.003, RATE).astype(np.float32)  # one second of faint noise
        if i == 1:
            gap[RATE // 4 : RATE // 2] += rng.normal(0, 0.05, RATE // 4).astype(np.float32)
        parts.append(gap)
    return np.concatenate(parts)


def reference(audio: np.ndarray, **settings) -> list:
    """The silero-vad package's own get_speech_timestamps on its TorchScript model."""
    import torch
    from silero_vad import get_speech_timestamps, load_silero_vad

    model = load_silero_vad()
    stamps = get_speech_timestamps(torch.from_numpy(audio), model, sampling_rate=RATE, **settings)
    return [(s["start"] / RATE, s["end"] / RATE) for s in stamps]


def detect(srv, audio: np.ndarray) -> list:
    reply = srv.stub.VAD(pb.VADRequest(audio=audio.tolist()), timeout=120)
    return [(s.start, s.end) for s in reply.segments]


def load(srv, path: Path, options=()) -> str:
    reply = srv.stub.LoadModel(pb.ModelOptions(Model=str(path), Options=list(options)), timeout=120)
    assert reply.success, reply.message
    return reply.message


def assert_close(ours: list, ref: list):
    assert len(ours) == len(ref), (ours, ref)
    for (a, b), (c, d) in zip(ours, ref, strict=True):
        assert abs(a - c) <= TOLERANCE_S and abs(b - d) <= TOLERANCE_S, (ours, ref)


@pytest.fixture(scope="module")
def server():
    srv = Server()
    yield srv
    srv.stop()


def test_segments_equal_the_reference(server, speech):
    """LoadModel of the package's silero_vad.onnx itself (converted on load): the same segments
    as the package's TorchScript model, one per sentence."""
    message = load(server, silero_data() / "silero_vad.onnx")
    assert "Silero VAD" in message
    ours = detect(server, speech)
    ref = reference(speech)
    assert len(ref) == len(SENTENCES), ref
    assert_close(ours, ref)


def test_the_tinygrad_export_agrees_within_a_window(server, speech):
    """The package's silero_vad_16k.safetensors holds other weights than its ONNX/TorchScript
    model: the same segments, boundaries within one 32 ms window (512 samples)."""
    load(server, silero_data() / "silero_vad_16k.safetensors")
    ours, ref = detect(server, speech), reference(speech)
    assert len(ours) == len(ref), (ours, ref)
    for (a, b), (c, d) in zip(ours, ref, strict=True):
        assert abs(a - c) <= 0.033 and abs(b - d) <= 0.033, (ours, ref)


def test_options_reach_the_detector(server, speech):
    """threshold / minimum speech and silence / padding from Options (the model YAML)."""
    settings = dict(
        threshold=0.7, min_speech_duration_ms=500, min_silence_duration_ms=300, speech_pad_ms=100
    )
    load(server, silero_data(), [f"{k}:{v}" for k, v in settings.items()])  # the folder
    assert_close(detect(server, speech), reference(speech, **settings))


def test_jit_name_uses_the_onnx_beside_it(server, speech):
    """LocalAI YAMLs may name the TorchScript file: the same model is read from the .onnx."""
    load(server, silero_data() / "silero_vad.jit")
    assert_close(detect(server, speech), reference(speech))


def test_bad_audio_is_invalid_argument(server):
    load(server, silero_data() / "silero_vad.onnx")
    for audio, words in (([], "empty"), ([0.1, float("nan"), 0.2], "NaN")):
        with pytest.raises(grpc.RpcError) as err:
            server.stub.VAD(pb.VADRequest(audio=audio), timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
        assert words in err.value.details()
        assert server.healthy()
    assert detect(server, np.zeros(RATE, np.float32)) == []  # silence: no segment


def test_bad_options_and_missing_model(server, tmp_path):
    with pytest.raises(grpc.RpcError) as err:
        server.stub.LoadModel(
            pb.ModelOptions(Model=str(silero_data()), Options=["threshold:2"]), timeout=60
        )
    assert (
        err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "threshold" in err.value.details()
    )
    lone = tmp_path / "silero_vad.jit"
    lone.write_bytes((silero_data() / "silero_vad.jit").read_bytes())
    with pytest.raises(grpc.RpcError) as err:
        server.stub.LoadModel(pb.ModelOptions(Model=str(lone)), timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "silero_vad.onnx" in err.value.details()
    server.stub.Free(pb.HealthMessage(), timeout=30)
    with pytest.raises(grpc.RpcError) as err:
        server.stub.VAD(pb.VADRequest(audio=[0.0] * 100), timeout=30)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert server.healthy()


def test_vad_on_a_text_model_names_it(tiny_dir):
    srv = Server()
    try:
        load(srv, tiny_dir)
        with pytest.raises(grpc.RpcError) as err:
            srv.stub.VAD(pb.VADRequest(audio=[0.0] * 1600), timeout=30)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert tiny_dir.name in err.value.details() and "Silero" in err.value.details()
    finally:
        srv.stop()
