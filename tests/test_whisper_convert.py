"""converters.whisper_to_mlx: a tiny RANDOM transformers whisper (and an OpenAI-format .pt) converted to
MLX, checked numerically against torch, loaded by mlx-whisper and by the backend, re-saved as
float16 and 4-bit, and refused with clear errors on bad input."""

import json
from dataclasses import asdict

import numpy as np
import pytest

pytest.importorskip("mlx_whisper")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from converters.whisper_to_mlx import convert_whisper, main  # noqa: E402

TINY = dict(
    d_model=64, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
    encoder_ffn_dim=256, decoder_ffn_dim=256, num_mel_bins=80, vocab_size=51865,
    max_source_positions=1500, max_target_positions=64,
)  # fmt: skip
TOKENS = [50258, 50259, 50359, 50363, 1012, 345, 50257]
ALIGNMENT = [[0, 1]]


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(WhisperConfig(**TINY)).eval()
    folder = tmp_path_factory.mktemp("hf") / "whisper-hf-tiny"
    model.save_pretrained(folder, safe_serialization=True)
    gen = json.loads((folder / "generation_config.json").read_text())
    gen["alignment_heads"] = ALIGNMENT
    (folder / "generation_config.json").write_text(json.dumps(gen))
    return model, folder


@pytest.fixture(scope="module")
def converted(hf_model, tmp_path_factory):
    return convert_whisper(
        hf_model[1], tmp_path_factory.mktemp("mlx") / "whisper-mlx", dtype="float32"
    )


@pytest.fixture(scope="module")
def mel():
    return np.random.default_rng(1).standard_normal((1, 80, 3000)).astype(np.float32)


def mlx_outputs(folder, mel, positions=None):
    """Encoder output and decoder logits from mlx-whisper's own loader; `positions` replaces the
    encoder's recomputed sinusoids (MLX computes them in float32: up to ~1.2e-4 off transformers'
    stored table at late positions, which alone moves the encoder output by ~2e-4)."""
    import mlx.core as mx
    from mlx_whisper.load_models import load_model

    model = load_model(str(folder), dtype=mx.float32)
    if positions is not None:
        model.encoder._positional_embedding = mx.array(positions)
    features = model.embed_audio(mx.array(mel.transpose(0, 2, 1)))
    logits = model.logits(mx.array([TOKENS]), features)
    return model, np.array(features.astype(mx.float32)), np.array(logits.astype(mx.float32))


def test_layout(converted):
    import mlx.core as mx

    config = json.loads((converted / "config.json").read_text())
    assert config["model_type"] == "whisper" and "quantization" not in config
    assert {
        k: config[k] for k in ("n_mels", "n_audio_ctx", "n_audio_state", "n_vocab", "n_text_ctx")
    } == dict(n_mels=80, n_audio_ctx=1500, n_audio_state=64, n_vocab=51865, n_text_ctx=64)
    weights = mx.load(str(converted / "weights.safetensors"))
    assert weights["encoder.conv1.weight"].shape == (64, 3, 80)  # MLX (out, kernel, in)
    assert weights["decoder.token_embedding.weight"].dtype == mx.float32
    assert weights["alignment_heads"].tolist() == ALIGNMENT  # copied from generation_config.json
    assert not [
        p for p in converted.parent.iterdir() if p.name.startswith(".")
    ]  # no temp folder left


def test_matches_transformers(hf_model, converted, mel):
    model, _ = hf_model
    with torch.no_grad():
        ref_features = model.model.encoder(torch.from_numpy(mel)).last_hidden_state.numpy()
        ref_logits = model(
            input_features=torch.from_numpy(mel), decoder_input_ids=torch.tensor([TOKENS])
        ).logits.numpy()
        positions = model.model.encoder.embed_positions.weight.numpy()
    # as mlx-whisper loads it (its own float32 sinusoids)
    _, features, logits = mlx_outputs(converted, mel)
    enc_diff = np.abs(features - ref_features).max()
    logit_diff = np.abs(logits - ref_logits).max()
    # the same weights with transformers' positional table: isolates the weight mapping
    _, features_p, logits_p = mlx_outputs(converted, mel, positions)
    enc_diff_p = np.abs(features_p - ref_features).max()
    logit_diff_p = np.abs(logits_p - ref_logits).max()
    print(
        f"\nHF: encoder max|diff| {enc_diff:.3g} (same positions: {enc_diff_p:.3g}), "
        f"logits max|diff| {logit_diff:.3g} (same positions: {logit_diff_p:.3g})"
    )
    assert features.shape == ref_features.shape == (1, 1500, 64)
    assert logits.shape == ref_logits.shape == (1, len(TOKENS), 51865)
    assert enc_diff_p < 1e-4 and logit_diff_p < 1e-3
    assert enc_diff < 1e-3 and logit_diff < 1e-3
    assert np.abs(features - ref_features).mean() < 1e-5


def test_openai_checkpoint(tmp_path, mel):
    import mlx.core as mx
    from mlx_whisper import torch_whisper

    dims = torch_whisper.ModelDimensions(
        n_mels=80, n_audio_ctx=1500, n_audio_state=64, n_audio_head=2, n_audio_layer=1,
        n_vocab=51865, n_text_ctx=64, n_text_state=64, n_text_head=2, n_text_layer=1,
    )  # fmt: skip
    torch.manual_seed(2)
    model = torch_whisper.Whisper(dims).eval()
    with torch.no_grad():
        model.decoder.positional_embedding.normal_(0, 0.02)  # torch.empty in OpenAI's code
    torch.save({"dims": asdict(dims), "model_state_dict": model.state_dict()}, tmp_path / "tiny.pt")
    out = convert_whisper(tmp_path / "tiny.pt", tmp_path / "from-pt")
    _, features, logits = mlx_outputs(out, mel, model.encoder.positional_embedding.numpy())
    with torch.no_grad():
        ref_features = model.encoder(torch.from_numpy(mel))
        ref_logits = model.decoder(torch.tensor([TOKENS]), ref_features)
    enc_diff = np.abs(features - ref_features.numpy()).max()
    logit_diff = np.abs(logits - ref_logits.numpy()).max()
    print(
        f"\nOpenAI .pt (same positions): encoder max|diff| {enc_diff:.3g}, logits max|diff| {logit_diff:.3g}"
    )
    assert enc_diff < 1e-4 and logit_diff < 1e-3
    _, features, _ = mlx_outputs(out, mel)  # mlx-whisper's own sinusoids
    assert np.abs(features - ref_features.numpy()).max() < 1e-3
    assert "alignment_heads" in mx.load(
        str(out / "weights.safetensors")
    )  # the default (last half of layers)


def test_resave_float16_and_quantized(converted, mel, tmp_path):
    import mlx.core as mx

    _, features, logits = mlx_outputs(converted, mel)

    half = convert_whisper(converted, tmp_path / "f16", dtype="float16")
    weights = mx.load(str(half / "weights.safetensors"))
    assert weights["decoder.token_embedding.weight"].dtype == mx.float16
    assert weights["alignment_heads"].tolist() == ALIGNMENT
    _, f16_features, f16_logits = mlx_outputs(half, mel)
    assert np.abs(f16_logits - logits).max() < 0.05

    q4 = convert_whisper(converted, tmp_path / "q4", quantize=True, q_bits=4, q_group_size=64)
    config = json.loads((q4 / "config.json").read_text())
    assert config["quantization"] == {"group_size": 64, "bits": 4}
    weights = mx.load(str(q4 / "weights.safetensors"))
    assert "decoder.token_embedding.scales" in weights and "encoder.blocks.0.mlp1.scales" in weights
    assert "encoder.conv1.scales" not in weights
    model, _, q_logits = mlx_outputs(q4, mel)
    assert np.isfinite(q_logits).all()
    corr = np.corrcoef(q_logits.ravel(), logits.ravel())[0, 1]
    assert corr > 0.9, corr

    # quantized → plain float32 again (dequantized)
    back = convert_whisper(q4, tmp_path / "dq", dtype="float32")
    assert "quantization" not in json.loads((back / "config.json").read_text())
    _, _, dq_logits = mlx_outputs(back, mel)
    assert np.abs(dq_logits - q_logits).max() < 1e-3


def test_backend_transcribes(converted, tmp_path):
    from mlxbackend.proto import backend_pb2 as pb
    from tests.conftest import Server
    from tests.tiny_whisper import write_wav

    wav = write_wav(tmp_path / "tone.wav", 2.0, rate=16000, channels=1)
    srv = Server()
    try:
        reply = srv.stub.LoadModel(
            pb.ModelOptions(Model=converted.name, ModelPath=str(converted.parent))
        )
        assert reply.success and "whisper" in reply.message, reply.message
        result = srv.stub.AudioTranscription(pb.TranscriptRequest(dst=str(wav)), timeout=120)
        assert abs(result.duration - 2.0) < 0.1
        assert result.language
    finally:
        srv.stop()


def test_cli(converted, tmp_path, capsys):
    from mlxbackend import cli

    with pytest.raises(SystemExit) as exc:
        cli.main(
            ["convert", "whisper", str(converted), str(tmp_path / "cli-f16"), "--dtype", "float16"]
        )
    assert exc.value.code == 0
    assert (tmp_path / "cli-f16" / "weights.safetensors").exists()
    assert main([str(converted), str(tmp_path / "cli-f16")]) == 2  # exists
    assert "already exists" in capsys.readouterr().err


def test_bad_input(tmp_path, converted, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "out"
    with pytest.raises(FileNotFoundError, match="no such"):
        convert_whisper(tmp_path / "missing", out)
    with pytest.raises(FileNotFoundError, match="not available offline"):
        convert_whisper("nobody-here/whisper-none", out)
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="not a whisper model"):
        convert_whisper(llama, out)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        convert_whisper(tmp_path / "empty", out)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="not a whisper checkpoint"):
        convert_whisper(tmp_path / "notes.txt", out)
    nohf = tmp_path / "hf-noweights"
    nohf.mkdir()
    (nohf / "config.json").write_text(json.dumps({"model_type": "whisper", **TINY}))
    with pytest.raises(ValueError, match="no model"):
        convert_whisper(nohf, out)
    with pytest.raises(ValueError, match="dtype"):
        convert_whisper(converted, out, dtype="int8")
    with pytest.raises(ValueError, match="quantization"):
        convert_whisper(converted, out, quantize=True, q_bits=7)
    # a checkpoint whose shapes do not fit its config
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    (wrong / "weights.safetensors").write_bytes((converted / "weights.safetensors").read_bytes())
    config = json.loads((converted / "config.json").read_text())
    (wrong / "config.json").write_text(json.dumps({**config, "n_text_layer": 2}))
    with pytest.raises(ValueError, match="missing: decoder.blocks.1"):
        convert_whisper(wrong, out)
    with pytest.raises(FileExistsError):
        convert_whisper(converted, converted)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_cached_hub_id(hf_model, tmp_path, monkeypatch):
    """A repo id resolves from the local Hugging Face cache, offline (a hand-made cache entry)."""
    import shutil

    from huggingface_hub import constants

    commit = "0" * 40
    repo = tmp_path / "hub" / "models--someone--whisper-tiny-random"
    shutil.copytree(hf_model[1], repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = convert_whisper("someone/whisper-tiny-random", tmp_path / "from-cache", offline=True)
    assert json.loads((out / "config.json").read_text())["n_vocab"] == 51865
