"""Tiny RANDOM BERT and RoBERTa encoders in Hugging Face layout (transformers + torch, seeded),
with tokenizers built locally from CORPUS and, for the embedding variants, the
sentence-transformers files (modules.json, 1_Pooling, 2_Normalize, sentence_bert_config.json).
Nothing is downloaded."""

import json
from pathlib import Path

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A man is playing a guitar on the stage while the crowd sings along.",
    "Machine learning models turn text into vectors called embeddings.",
    "Rerankers score how relevant each document is to a search query.",
    "Paris is the capital of France; Berlin is the capital of Germany.",
    "She sells sea shells by the sea shore, and the shells she sells are surely sea shells.",
    "Numbers like 42, 3.14 and 1000 appear in text too!",
    "Caf\u00e9 na\u00efve r\u00e9sum\u00e9 \u2014 unicode words, accents and dashes.",
    "How do I bake bread at home without yeast?",
    "The weather today is sunny with a light breeze from the west.",
]
TINY = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
    max_position_embeddings=128,
)  # fmt: skip
BERT_SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
ROBERTA_SPECIAL = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]


def wordpiece_tokenizer(model_max_length: int = 512):
    """A BERT-style WordPiece fast tokenizer over CORPUS: its words, characters and ##characters
    (built directly: the WordPiece trainer is not deterministic)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import BertTokenizerFast

    normalizer = normalizers.BertNormalizer(lowercase=True)
    split = pre_tokenizers.BertPreTokenizer()
    words = [
        w for line in CORPUS for w, _ in split.pre_tokenize_str(normalizer.normalize_str(line))
    ]
    chars = sorted({c for w in words for c in w})
    vocab = [*BERT_SPECIAL, *chars, *(f"##{c}" for c in chars), *sorted(set(words) - set(chars))]
    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer = normalizer
    tok.pre_tokenizer = split
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )  # fmt: skip
    tok.decoder = decoders.WordPiece()
    return BertTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
        sep_token="[SEP]", mask_token="[MASK]", model_max_length=model_max_length,
    )  # fmt: skip


def bpe_tokenizer(model_max_length: int = 512):
    """A RoBERTa-style byte-level BPE fast tokenizer trained on CORPUS (<pad> = 1)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import RobertaTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(
        CORPUS,
        trainers.BpeTrainer(
            vocab_size=400, special_tokens=ROBERTA_SPECIAL,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )  # fmt: skip
    tok.post_processor = processors.RobertaProcessing(
        ("</s>", tok.token_to_id("</s>")), ("<s>", tok.token_to_id("<s>")), trim_offsets=True
    )
    tok.decoder = decoders.ByteLevel()
    return RobertaTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        pad_token="<pad>", cls_token="<s>", sep_token="</s>", mask_token="<mask>",
        model_max_length=model_max_length,
    )  # fmt: skip


def write_st_files(out: Path, pooling: str = "mean", normalize: bool = True, max_seq_length=None):
    """The sentence-transformers files: modules.json, 1_Pooling/config.json, 2_Normalize/."""
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {
            "idx": 1,
            "name": "1",
            "path": "1_Pooling",
            "type": "sentence_transformers.models.Pooling",
        },
    ]
    if normalize:
        modules.append(
            {
                "idx": 2,
                "name": "2",
                "path": "2_Normalize",
                "type": "sentence_transformers.models.Normalize",
            }
        )
        (out / "2_Normalize").mkdir(exist_ok=True)
    (out / "modules.json").write_text(json.dumps(modules, indent=2))
    (out / "1_Pooling").mkdir(exist_ok=True)
    flags = {"cls": "pooling_mode_cls_token", "mean": "pooling_mode_mean_tokens",
             "max": "pooling_mode_max_tokens", "last": "pooling_mode_lasttoken"}  # fmt: skip
    pool_cfg = {"word_embedding_dimension": TINY["hidden_size"]}
    pool_cfg.update({flag: mode == pooling for mode, flag in flags.items()})
    (out / "1_Pooling" / "config.json").write_text(json.dumps(pool_cfg, indent=2))
    if max_seq_length:
        (out / "sentence_bert_config.json").write_text(
            json.dumps({"max_seq_length": max_seq_length, "do_lower_case": False})
        )


def _randomize(model, seed: int, scale: float = 0.15):
    """Perturb every parameter (biases and LayerNorms included) so that none keeps its
    trivial init and attention is far from uniform."""
    import torch

    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    return model


def _build(
    out_dir, family: str, classifier: bool, num_labels: int, seed: int, st: dict | None, **cfg
):
    import torch
    import transformers

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = wordpiece_tokenizer() if family == "bert" else bpe_tokenizer()
    kwargs = dict(TINY, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, **cfg)
    if family == "bert":
        config = transformers.BertConfig(**kwargs)
        cls = transformers.BertForSequenceClassification if classifier else transformers.BertModel
    else:
        kwargs.update(max_position_embeddings=TINY["max_position_embeddings"] + 2, type_vocab_size=1,
                      bos_token_id=0, eos_token_id=2, layer_norm_eps=1e-5)  # fmt: skip
        config = transformers.RobertaConfig(**kwargs)
        cls = (
            transformers.RobertaForSequenceClassification
            if classifier
            else transformers.RobertaModel
        )
    if classifier:
        config.num_labels = num_labels
    torch.manual_seed(seed)
    model = _randomize(cls(config).eval(), seed)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    if st is not None:
        write_st_files(out, **st)
    return out


def build_tiny_bert(out_dir, classifier=False, num_labels=1, seed=0, st=None, **cfg) -> Path:
    """A tiny random BertModel (or BertForSequenceClassification) in HF layout.
    st: sentence-transformers settings (pooling, normalize, max_seq_length) or None for none."""
    return _build(out_dir, "bert", classifier, num_labels, seed, st, **cfg)


def build_tiny_roberta(out_dir, classifier=False, num_labels=1, seed=0, st=None, **cfg) -> Path:
    """A tiny random RobertaModel (or RobertaForSequenceClassification) in HF layout."""
    return _build(out_dir, "roberta", classifier, num_labels, seed, st, **cfg)


def load_torch(out_dir):
    """The saved tiny model and its tokenizer, through transformers (the reference)."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(out_dir, local_files_only=True)
    arch = (config.architectures or ["AutoModel"])[0]
    model = getattr(transformers, arch).from_pretrained(out_dir, local_files_only=True).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(out_dir, local_files_only=True)
    return model, tokenizer
