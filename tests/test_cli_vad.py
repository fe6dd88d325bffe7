"""`mlxbackend vad FILE --model silero_vad.onnx`: speech segments of a WAV file, computed locally,
equal to the silero-vad package's own reference on the same samples; clear errors, exit code 1."""

import json
import shutil
import subprocess

import numpy as np
import pytest

from mlxbackend.tts.wav import pcm16, write_wav
from tests.conftest import run_cli
from tests.test_vad import RATE, SENTENCES, assert_close, reference, say, silero_data


def vad(*args: str) -> subprocess.CompletedProcess:
    return run_cli("vad", *args, timeout=180)


@pytest.fixture(scope="module")
def wav(tmp_path_factory):
    """Two espeak-ng sentences between faint-noise gaps, as a 16 kHz PCM16 WAV file."""
    if not shutil.which("espeak-ng"):
        pytest.skip("espeak-ng is not installed (apt-get install -y espeak-ng)")
    folder = tmp_path_factory.mktemp("cli-vad")
    rng = np.random.default_rng(1)
    parts = [np.zeros(RATE // 2, np.float32)]
    for text in SENTENCES[:2]:
        parts += [say(text, folder), rng.normal(0, 0.003, RATE).astype(np.float32)]
    path = folder / "speech.wav"
    write_wav(str(path), [pcm16(np.concatenate(parts))], RATE)
    return path


def test_segments_equal_the_reference(wav):
    from mlxbackend.audio.decode import load_audio

    done = vad(str(wav), "--model", str(silero_data() / "silero_vad.onnx"), "--format", "json")
    assert done.returncode == 0, done.stderr
    segments = json.loads(done.stdout)
    ours = [(s["start"], s["end"]) for s in segments]
    ref = reference(load_audio(str(wav)))
    assert len(ref) == 2, ref
    assert_close(ours, ref)

    text = vad(str(wav), "--model", str(silero_data()))  # the folder; text format
    assert text.returncode == 0, text.stderr
    assert text.stdout.splitlines() == [f"{a:.3f} → {b:.3f}" for a, b in ours]


def test_errors_exit_1(wav, tmp_path):
    onnx = str(silero_data() / "silero_vad.onnx")
    missing = vad(str(tmp_path / "nope.wav"), "--model", onnx)
    assert missing.returncode == 1 and "audio file not found" in missing.stderr
    assert missing.stdout == ""
    not_silero = vad(str(wav), "--model", str(wav))
    assert not_silero.returncode == 1 and "not Silero VAD weights" in not_silero.stderr
    bad = vad(str(wav), "--model", onnx, "--option", "threshold:2")
    assert bad.returncode == 1 and "threshold" in bad.stderr
