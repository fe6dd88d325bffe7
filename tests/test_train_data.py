"""Fine-tuning datasets: loading files, folders and the HF cache; tokenizing like mlx-lm."""

import csv
import json
import shutil
import sys
from types import SimpleNamespace

import pytest

from mlxbackend.errors import InvalidInput, NotFound
from mlxbackend.train import data
from mlxbackend.train.data import (
    Split,
    detect_format,
    load_splits,
    tokenize_preference,
    tokenize_sft,
)

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]

ROWS = {
    "text": [
        {"text": "The baker lived at the foot of a hill."},
        {"text": "The oven was made of stone."},
    ],
    "completions": [
        {"prompt": "Where did the baker live?", "completion": "At the foot of a hill."},
        {"prompt": "What was the oven made of?", "completion": "Old stone."},
    ],
    "chat": [
        {
            "messages": [
                {"role": "system", "content": "You are helpful."},
                {"role": "user", "content": "Where did the baker live?"},
                {"role": "assistant", "content": "At the foot of a hill."},
            ]
        },
        {
            "messages": [
                {"role": "user", "content": "What was the oven made of?"},
                {"role": "assistant", "content": "Old stone."},
            ]
        },
    ],
    "tools": [
        {
            "messages": [
                {"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": "It is sunny in Paris."},
            ],
            "tools": TOOLS,
        },
        {
            "messages": [
                {"role": "user", "content": "Weather in Rome?"},
                {"role": "assistant", "content": "Rainy."},
            ],
            "tools": TOOLS,
        },
    ],
    "preference": [
        {
            "prompt": "Where did the baker live?",
            "chosen": "At the foot of a hill.",
            "rejected": "On the moon.",
        },
        {"prompt": "What was the oven made of?", "chosen": "Old stone.", "rejected": "Cheese."},
    ],
}


# ---------------------------------------------------------------------------------------------
# helpers


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_json(path, rows):
    path.write_text(json.dumps(rows))
    return path


def write_csv(path, rows):
    cols = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for r in rows:
            w.writerow(
                [v if isinstance(v, str) else json.dumps(v) for v in (r.get(c, "") for c in cols)]
            )
    return path


def write_parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    # tools have heterogeneous nested schemas in real datasets: HF stores them as JSON text
    rows = [{k: json.dumps(v) if k == "tools" else v for k, v in r.items()} for r in rows]
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


WRITERS = {"jsonl": write_jsonl, "json": write_json, "csv": write_csv, "parquet": write_parquet}


@pytest.fixture(scope="module")
def tok(tiny_dir):
    from mlx_lm.utils import load_tokenizer

    t = load_tokenizer(tiny_dir)
    assert t.has_chat_template
    return t


@pytest.fixture(scope="module")
def plain_tok(tiny_dir, tmp_path_factory):
    """The same tokenizer without a chat template."""
    from mlx_lm.utils import load_tokenizer

    d = tmp_path_factory.mktemp("plain")
    for name in (
        "tokenizer.json",
        "special_tokens_map.json",
        "config.json",
        "tokenizer_config.json",
    ):
        shutil.copy(tiny_dir / name, d / name)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg.pop("chat_template")
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    t = load_tokenizer(d)
    assert not t.has_chat_template
    return t


def mlx_lm_reference(rows, tokenizer, mask_prompt):
    from mlx_lm.tuner.datasets import create_dataset

    ds = create_dataset(rows, tokenizer, SimpleNamespace(mask_prompt=mask_prompt))
    return [tuple(ds.process(r)) for r in rows]


def split_of(rows, name="rows.jsonl"):
    return Split(rows, [f"{name}:{i + 1}" for i in range(len(rows))], name)


# ---------------------------------------------------------------------------------------------
# loading files


@pytest.mark.parametrize("ext", list(WRITERS))
@pytest.mark.parametrize("fmt", list(ROWS))
def test_each_format_in_each_file_type(tmp_path, tok, ext, fmt):
    path = WRITERS[ext](tmp_path / f"train.{ext}", ROWS[fmt])
    train, valid = load_splits(str(path))
    assert valid is None
    assert train.source == str(path)
    assert len(train.rows) == 2
    method = "dpo" if fmt == "preference" else "sft"
    assert detect_format(train.rows, method) == fmt
    if fmt == "preference":
        assert tokenize_preference(train, tok) == tokenize_preference(split_of(ROWS[fmt]), tok)
        return
    assert [tuple(t) for t in tokenize_sft(train, tok, fmt)] == mlx_lm_reference(
        ROWS[fmt], tok, False
    )


def test_origins_jsonl_lines_skip_blank_lines(tmp_path):
    p = tmp_path / "train.jsonl"
    p.write_text('{"text": "a b"}\n\n{"text": "c d"}\n')
    train, _ = load_splits(str(p))
    assert train.origins == [f"{p}:1", f"{p}:3"]


def test_origins_csv_lines_with_multiline_cells(tmp_path):
    p = tmp_path / "train.csv"
    p.write_text('text\n"first\nrow"\nsecond\n')
    train, _ = load_splits(str(p))
    assert [r["text"] for r in train.rows] == ["first\nrow", "second"]
    assert train.origins == [f"{p}:2", f"{p}:4"]


def test_origins_json_and_parquet_rows(tmp_path):
    j = write_json(tmp_path / "a.json", ROWS["text"])
    q = write_parquet(tmp_path / "b.parquet", ROWS["text"])
    assert load_splits(str(j))[0].origins == [f"{j} row 0", f"{j} row 1"]
    assert load_splits(str(q))[0].origins == [f"{q} row 0", f"{q} row 1"]


def test_json_object_with_splits_and_jsonl_in_json(tmp_path):
    p = write_json(tmp_path / "d.json", {"train": ROWS["text"], "validation": ROWS["text"][:1]})
    train, valid = load_splits(str(p))
    assert len(train.rows) == 2 and len(valid.rows) == 1
    assert train.origins[1] == f"{p} train row 1"
    p2 = write_json(tmp_path / "e.json", {"data": ROWS["chat"]})
    assert load_splits(str(p2))[0].rows == ROWS["chat"]
    p3 = write_jsonl(tmp_path / "lines.json", ROWS["text"])  # HF often ships JSON lines as .json
    assert load_splits(str(p3))[0].origins == [f"{p3}:1", f"{p3}:2"]


def test_csv_json_columns_decoded(tmp_path):
    p = write_csv(tmp_path / "train.csv", ROWS["tools"])
    train, _ = load_splits(str(p))
    assert train.rows == ROWS["tools"]
    p = write_csv(
        tmp_path / "pref.csv", [{"prompt": "[INST] hi", "chosen": "[1, 2]", "rejected": "no"}]
    )
    assert load_splits(str(p))[0].rows == [
        {"prompt": "[INST] hi", "chosen": "[1, 2]", "rejected": "no"}
    ]


# ---------------------------------------------------------------------------------------------
# folders and the HF cache


def test_folder_with_train_and_valid(tmp_path, tok):
    write_jsonl(tmp_path / "train.jsonl", ROWS["chat"])
    write_jsonl(tmp_path / "valid.jsonl", ROWS["chat"][:1])
    write_jsonl(tmp_path / "test.jsonl", ROWS["chat"])
    train, valid = load_splits(str(tmp_path))
    assert len(train.rows) == 2 and len(valid.rows) == 1
    assert valid.origins == [f"{tmp_path / 'valid.jsonl'}:1"]


def test_folder_validation_names_and_explicit_valid_split(tmp_path):
    write_csv(tmp_path / "train.csv", ROWS["text"])
    assert load_splits(str(tmp_path))[1] is None
    write_parquet(tmp_path / "validation.parquet", ROWS["text"][:1])
    assert len(load_splits(str(tmp_path))[1].rows) == 1
    write_jsonl(tmp_path / "test.jsonl", ROWS["text"])
    _, valid = load_splits(str(tmp_path), valid_split="test")
    assert len(valid.rows) == 2
    with pytest.raises(
        NotFound, match="no validation split 'dev'.*splits found: test, train, validation"
    ):
        load_splits(str(tmp_path), valid_split="dev")
    other = write_jsonl(tmp_path / "other.jsonl", ROWS["text"][:1])
    assert load_splits(str(tmp_path / "train.csv"), valid_split=str(other))[1].source == str(other)


def test_folder_missing_split(tmp_path):
    write_jsonl(tmp_path / "test.jsonl", ROWS["text"])
    with pytest.raises(NotFound, match="no 'train' split.*splits found: test"):
        load_splits(str(tmp_path))
    with pytest.raises(NotFound, match="no 'dev' split.*splits found: test"):
        load_splits(str(tmp_path), split="dev")
    (tmp_path / "empty").mkdir()
    with pytest.raises(NotFound, match="no data files"):
        load_splits(str(tmp_path / "empty"))


def test_folder_single_unnamed_file_is_train(tmp_path):
    write_jsonl(tmp_path / "my-data.jsonl", ROWS["text"])
    train, valid = load_splits(str(tmp_path))
    assert len(train.rows) == 2 and valid is None


def test_hf_layouts(tmp_path):
    a = tmp_path / "a"
    (a / "data").mkdir(parents=True)
    write_parquet(a / "data" / "train-00000-of-00002.parquet", ROWS["text"])
    write_parquet(a / "data" / "train-00001-of-00002.parquet", ROWS["text"][:1])
    write_parquet(a / "data" / "validation-00000-of-00001.parquet", ROWS["text"][:1])
    train, valid = load_splits(str(a))
    assert len(train.rows) == 3 and len(valid.rows) == 1
    assert train.origins[2] == f"{a / 'data' / 'train-00001-of-00002.parquet'} row 0"
    b = tmp_path / "b"
    (b / "train").mkdir(parents=True)
    (b / "val").mkdir()
    write_parquet(b / "train" / "0000.parquet", ROWS["chat"])
    write_jsonl(b / "val" / "part.jsonl", ROWS["chat"])
    train, valid = load_splits(str(b))
    assert len(train.rows) == 2 and len(valid.rows) == 2


def fake_hf_cache(hub, repo_id, files):
    """A hub cache laid out as huggingface_hub does: datasets--o--n/{refs/main,snapshots/<hash>}."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = hub / ("datasets--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snap = repo / "snapshots" / commit
    for rel, (writer, rows) in files.items():
        (snap / rel).parent.mkdir(parents=True, exist_ok=True)
        writer(snap / rel, rows)
    return snap


@pytest.mark.parametrize("env", ["HF_HUB_CACHE", "HF_HOME"])
def test_hf_dataset_from_local_cache(tmp_path, monkeypatch, env):
    hub = tmp_path / "hf" / "hub"
    fake_hf_cache(
        hub,
        "owner/name",
        {
            "data/train-00000-of-00001.parquet": (write_parquet, ROWS["completions"]),
            "data/test-00000-of-00001.parquet": (write_parquet, ROWS["completions"]),
        },
    )
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv(env, str(hub if env == "HF_HUB_CACHE" else hub.parent))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    train, valid = load_splits("owner/name")
    assert train.rows == ROWS["completions"] and valid is None
    assert train.origins[1] == "owner/name/data/train-00000-of-00001.parquet row 1"
    _, valid = load_splits("owner/name", valid_split="test")
    assert len(valid.rows) == 2


def test_hf_dataset_not_cached_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(
        NotFound, match="not in the local Hugging Face cache.*HF_HUB_OFFLINE=1"
    ) as e:
        load_splits("owner/missing")
    assert "'owner/missing'" in str(e.value)


def test_hf_dataset_download_failure(tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub import constants

    calls = []

    def fake_snapshot_download(repo_id, repo_type=None, local_files_only=False, **kw):
        calls.append((repo_id, repo_type, local_files_only))
        if local_files_only:
            raise FileNotFoundError("not cached")
        raise ConnectionError("network unreachable")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(
        NotFound, match="downloading it failed: ConnectionError: network unreachable"
    ):
        load_splits("owner/name")
    assert calls == [("owner/name", "dataset", True), ("owner/name", "dataset", False)]


def test_missing_path(tmp_path):
    with pytest.raises(NotFound, match="no such file or folder"):
        load_splits(str(tmp_path / "nope.jsonl"))
    with pytest.raises(NotFound, match="no such file or folder"):
        load_splits(str(tmp_path / "nope"))


# ---------------------------------------------------------------------------------------------
# malformed data


def test_malformed_json_lines_reported_with_line_numbers(tmp_path):
    p = tmp_path / "train.jsonl"
    p.write_text('{"text": "ok"}\n{"text": "broken\n[1, 2]\n{"text": "fine"}\n')
    with pytest.raises(InvalidInput) as e:
        load_splits(str(p))
    msg = str(e.value)
    assert f"{p}:2: invalid JSON" in msg
    assert f"{p}:3: expected a JSON object, got an array" in msg
    assert f"{p}:1" not in msg and f"{p}:4" not in msg


def test_many_problems_are_truncated(tmp_path):
    p = tmp_path / "train.jsonl"
    p.write_text("nope\n" * 9)
    with pytest.raises(InvalidInput, match=r"and 4 more") as e:
        load_splits(str(p))
    assert f"{p}:5:" in str(e.value) and f"{p}:6:" not in str(e.value)


def test_bad_files(tmp_path):
    empty = tmp_path / "train.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(InvalidInput, match="empty"):
        load_splits(str(empty))
    j = tmp_path / "x.json"
    j.write_text('{"rows": 3}')
    with pytest.raises(InvalidInput, match="expected a JSON array"):
        load_splits(str(j))
    j.write_text('[{"text": "a"}, "b"]')
    with pytest.raises(InvalidInput, match=r"x.json row 1: expected a JSON object, got a string"):
        load_splits(str(j))
    t = tmp_path / "x.txt"
    t.write_text("hello")
    with pytest.raises(InvalidInput, match="unsupported dataset file type '.txt'"):
        load_splits(str(t))
    c = tmp_path / "y.csv"
    c.write_text('text,tools\n"a",not json\n"b",\n"c","x","extra"\n')
    with pytest.raises(InvalidInput) as e:
        load_splits(str(c))
    assert f"{c}:2: column 'tools' must hold a JSON list" in str(e.value)
    assert f"{c}:4: more fields than" in str(e.value)
    assert f"{c}:3" not in str(e.value)


def test_parquet_without_pyarrow(tmp_path, monkeypatch):
    p = write_parquet(tmp_path / "train.parquet", ROWS["text"])
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(InvalidInput, match="pip install pyarrow"):
        load_splits(str(p))


def test_rows_missing_keys_reported_with_lines(tmp_path, tok):
    p = tmp_path / "train.jsonl"
    rows = [
        ROWS["chat"][0],
        {"text": "oops"},
        ROWS["chat"][1],
        {"messages": [{"role": "wizard", "content": "x"}]},
        {"messages": "hello"},
        {"messages": [{"role": "user"}]},
        {"messages": [], "tools": "x"},
    ]
    write_jsonl(p, rows)
    train, _ = load_splits(str(p))
    fmt = detect_format(train.rows)
    assert fmt == "chat"
    with pytest.raises(InvalidInput) as e:
        tokenize_sft(train, tok, fmt)
    msg = str(e.value)
    assert f"{p}:2: missing key 'messages'" in msg
    assert f"{p}:4: 'messages'[0] has unknown role 'wizard'" in msg
    assert f"{p}:5: 'messages' must be a list of messages, got a string" in msg
    assert f"{p}:6: 'messages'[0] (user) has no 'content'" in msg
    assert f"{p}:7: 'messages' is an empty list" in msg
    assert f"{p}:1:" not in msg and f"{p}:3:" not in msg


def test_completions_wrong_types(tok):
    rows = [{"prompt": "a", "completion": "b"}, {"prompt": 3, "completion": "b"}, {"prompt": "a"}]
    with pytest.raises(InvalidInput) as e:
        tokenize_sft(split_of(rows), tok, "completions")
    assert "rows.jsonl:2: 'prompt' must be a string, got a number" in str(e.value)
    assert "rows.jsonl:3: missing key 'completion'" in str(e.value)


def test_too_short_rows(tok):
    rows = [{"text": "hello there"}, {"text": "<|im_end|>"}]
    with pytest.raises(InvalidInput, match=r"rows.jsonl:2: tokenizes to 1 token"):
        tokenize_sft(split_of(rows), tok, "text")


# ---------------------------------------------------------------------------------------------
# formats and tokenization


def test_detect_format():
    assert detect_format(ROWS["text"]) == "text"
    assert detect_format(ROWS["completions"]) == "completions"
    assert detect_format(ROWS["chat"]) == "chat"
    assert detect_format(ROWS["tools"]) == "tools"
    assert detect_format(ROWS["preference"], "dpo") == "preference"
    assert detect_format(ROWS["preference"], "orpo") == "preference"
    assert (
        detect_format(
            [{"q": "a", "a": "b"}], keys={"prompt_feature": "q", "completion_feature": "a"}
        )
        == "completions"
    )
    assert detect_format([{"conv": []}], keys={"chat_feature": "conv"}) == "chat"
    assert detect_format([{"body": "x"}], keys={"text_feature": "body"}) == "text"
    with pytest.raises(
        InvalidInput, match=r"text .*completions.*chat.*tools.*keys \['answer', 'question'\]"
    ):
        detect_format([{"question": "a", "answer": "b"}])
    with pytest.raises(InvalidInput, match="'prompt', 'chosen' and 'rejected'"):
        detect_format(ROWS["chat"], "dpo")
    with pytest.raises(InvalidInput, match="no rows"):
        detect_format([])


@pytest.mark.parametrize("fmt", ["completions", "chat", "tools"])
@pytest.mark.parametrize("mask", [False, True])
def test_tokens_and_offsets_equal_mlx_lm(tok, fmt, mask):
    out = tokenize_sft(split_of(ROWS[fmt]), tok, fmt, mask_prompt=mask)
    ref = mlx_lm_reference(ROWS[fmt], tok, mask)
    assert [tuple(t) for t in out] == ref
    if mask:
        assert all(0 < off < len(toks) for toks, off in out)
        # the masked prefix is the prompt with the generation header
        toks, off = out[0]
        assert tok.decode(toks[:off]).endswith("<|im_start|>assistant\n")
    else:
        assert all(off == 0 for _, off in out)


def test_text_tokens_and_mask_prompt_refused(tok):
    out = tokenize_sft(split_of(ROWS["text"]), tok, "text")
    assert [tuple(t) for t in out] == mlx_lm_reference(ROWS["text"], tok, False)
    assert out[0][0][-1] == tok.eos_token_id
    with pytest.raises(InvalidInput, match="mask_prompt is not supported"):
        tokenize_sft(split_of(ROWS["text"]), tok, "text", mask_prompt=True)


def test_renamed_keys(tok):
    rows = [{"q": r["prompt"], "a": r["completion"]} for r in ROWS["completions"]]
    keys = {"prompt_feature": "q", "completion_feature": "a"}
    assert detect_format(rows, keys=keys) == "completions"
    out = tokenize_sft(split_of(rows), tok, "completions", mask_prompt=True, keys=keys)
    assert out == tokenize_sft(split_of(ROWS["completions"]), tok, "completions", mask_prompt=True)


def test_progress_reported(tok):
    calls = []
    tokenize_sft(split_of(ROWS["chat"]), tok, "chat", progress=lambda d, t: calls.append((d, t)))
    assert calls[-1] == (2, 2)
    calls.clear()
    tokenize_preference(
        split_of(ROWS["preference"]), tok, progress=lambda d, t: calls.append((d, t))
    )
    assert calls[-1] == (2, 2)


def test_no_chat_template_fallback(plain_tok):
    rows = ROWS["completions"]
    out = tokenize_sft(split_of(rows), plain_tok, "completions", mask_prompt=True)
    eos = plain_tok.eos_token_id
    for (toks, off), r in zip(out, rows, strict=True):
        prompt = plain_tok.encode(r["prompt"])
        assert toks == prompt + plain_tok.encode(r["completion"], add_special_tokens=False) + [eos]
        assert off == len(prompt)
        assert plain_tok.decode(toks[:-1]) == r["prompt"] + r["completion"]
    assert all(off == 0 for _, off in tokenize_sft(split_of(rows), plain_tok, "completions"))
    for fmt in ("chat", "tools"):
        with pytest.raises(InvalidInput, match="no chat template|has none"):
            tokenize_sft(split_of(ROWS[fmt]), plain_tok, fmt)


def test_preference_tokenization(tok):
    eos = tok.eos_token_id
    rows = [
        ROWS["preference"][0],
        {
            "prompt": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Oven?"},
            ],
            "chosen": [
                {"role": "user", "content": "Oven?"},
                {"role": "assistant", "content": "Stone."},
            ],
            "rejected": {"role": "assistant", "content": "Cheese."},
        },
    ]
    out = tokenize_preference(split_of(rows), tok)
    p0, c0, r0 = out[0]
    assert p0 == tok.apply_chat_template(
        [{"role": "user", "content": rows[0]["prompt"]}], add_generation_prompt=True
    )
    assert c0 == tok.encode("At the foot of a hill.", add_special_tokens=False) + [eos]
    assert r0 == tok.encode("On the moon.", add_special_tokens=False) + [eos]
    p1, c1, r1 = out[1]
    assert p1 == tok.apply_chat_template(rows[1]["prompt"], add_generation_prompt=True)
    assert tok.decode(c1) == "Stone.<|im_end|>" and tok.decode(r1) == "Cheese.<|im_end|>"
    # prompt + chosen is what the chat template renders for the whole conversation (minus newline)
    full = tok.apply_chat_template(rows[1]["prompt"] + [{"role": "assistant", "content": "Stone."}])
    assert tok.decode(full).startswith(tok.decode(p1 + c1))


def test_preference_implicit_prompt_and_errors(tok):
    conv = [{"role": "user", "content": "Oven?"}, {"role": "assistant", "content": "Stone."}]
    bad = [{"role": "user", "content": "Oven?"}, {"role": "assistant", "content": "Cheese."}]
    out = tokenize_preference(split_of([{"chosen": conv, "rejected": bad}]), tok)
    assert out[0][0] == tok.apply_chat_template(conv[:1], add_generation_prompt=True)
    rows = [
        ROWS["preference"][0],
        {"prompt": "x", "chosen": "y"},
        {"prompt": "x", "chosen": [{"role": "user", "content": "q"}], "rejected": "n"},
        {"prompt": 5, "chosen": "y", "rejected": "n"},
    ]
    with pytest.raises(InvalidInput) as e:
        tokenize_preference(split_of(rows), tok)
    msg = str(e.value)
    assert "rows.jsonl:2: missing key 'rejected'" in msg
    assert "rows.jsonl:3: 'chosen' has no assistant message" in msg
    assert "rows.jsonl:4: 'prompt' must be a string or a list of messages" in msg
    assert "rows.jsonl:1:" not in msg


def test_preference_without_chat_template(plain_tok):
    out = tokenize_preference(split_of(ROWS["preference"]), plain_tok)
    eos = plain_tok.eos_token_id
    p, c, r = out[0]
    assert p == plain_tok.encode("Where did the baker live?")
    assert c[-1] == eos and r[-1] == eos
    rows = [{"prompt": [{"role": "user", "content": "q"}], "chosen": "a", "rejected": "b"}]
    with pytest.raises(InvalidInput, match="rows.jsonl:1: .*no chat template"):
        tokenize_preference(split_of(rows), plain_tok)


def test_parquet_struct_messages_round_trip(tmp_path, tok):
    """Parquet unifies struct fields: messages come back with None for absent keys."""
    rows = [
        {
            "messages": [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "yo", "name": "bot"},
            ]
        }
    ]
    p = write_parquet(tmp_path / "train.parquet", rows)
    train, _ = load_splits(str(p))
    assert train.rows == rows
    assert tokenize_sft(train, tok, "chat") == tokenize_sft(split_of(rows), tok, "chat")


def test_module_constants():
    assert data.SFT_FORMATS == ("text", "completions", "chat", "tools")
