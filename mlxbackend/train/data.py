"""Datasets for fine-tuning jobs: load rows from files, folders or the HF cache; tokenize them.

Tokenization of SFT rows goes through mlx-lm's own dataset classes so that tokens and prompt
offsets are identical to ``mlx_lm.lora``. Every problem is reported with where it came from
(``file:line`` for JSON lines and CSV, ``file row N`` (0-based index) for JSON arrays and parquet).
"""

from __future__ import annotations

import csv
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InvalidInput, NotFound

DATA_EXTS = ("jsonl", "json", "parquet", "csv")
VALID_SPLITS = ("valid", "validation", "val")
SFT_FORMATS = ("text", "completions", "chat", "tools")
PREFERENCE_METHODS = ("dpo", "orpo")
KNOWN_ROLES = ("system", "developer", "user", "assistant", "tool", "function", "ipython")
JSON_COLUMNS = ("messages", "tools", "chosen", "rejected", "prompt")
DEFAULT_KEYS = {
    "text_feature": "text",
    "prompt_feature": "prompt",
    "completion_feature": "completion",
    "chat_feature": "messages",
}
MAX_PROBLEMS = 5


@dataclass
class Split:
    rows: list[dict]
    origins: list[str]  # per row: "path/train.jsonl:12" or "path/x.parquet row 7"
    source: str  # human description of where the split came from

    def __len__(self):
        return len(self.rows)


@dataclass
class _Problems:
    """Collects per-row problems and raises them together."""

    items: list[str] = field(default_factory=list)

    def add(self, origin: str, message: str):
        self.items.append(f"{origin}: {message}")

    def raise_if_any(self, what: str):
        if not self.items:
            return
        shown = self.items[:MAX_PROBLEMS]
        more = len(self.items) - len(shown)
        tail = f"\n  ... and {more} more" if more > 0 else ""
        raise InvalidInput(f"{what}:\n  " + "\n  ".join(shown) + tail)


# ---------------------------------------------------------------------------------------------
# Reading files


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise InvalidInput(f"{path}: not UTF-8 text ({e})") from e


def _object_rows(items, origins, problems: _Problems):
    """Keep the dict rows; report the others."""
    rows, kept = [], []
    for item, origin in zip(items, origins, strict=True):
        if isinstance(item, dict):
            rows.append(item)
            kept.append(origin)
        else:
            problems.add(origin, f"expected a JSON object, got {_type_name(item)}")
    return rows, kept


def _read_jsonl(path: Path, name: str, text: str | None = None):
    problems = _Problems()
    items, origins = [], []
    text = _read_text(path) if text is None else text
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            items.append(json.loads(line))
            origins.append(f"{name}:{lineno}")
        except json.JSONDecodeError as e:
            problems.add(f"{name}:{lineno}", f"invalid JSON ({e.msg} at column {e.colno})")
    rows, origins = _object_rows(items, origins, problems)
    problems.raise_if_any(f"malformed rows in {name}")
    return rows, origins


def _read_json(path: Path, name: str, split: str):
    """A JSON array of objects, {"<split>"|"data": [...]}, or (as HF often ships) JSON lines."""
    text = _read_text(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # more than one value: JSON lines in a .json file
            return _read_jsonl(path, name, text)
        raise InvalidInput(f"{name}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from e
    label = ""
    if isinstance(data, dict):
        key = next((k for k in (split, "data") if isinstance(data.get(k), list)), None)
        if key is None:
            lists = [k for k, v in data.items() if isinstance(v, list)]
            raise InvalidInput(
                f"{name}: expected a JSON array of rows, or an object with a {split!r} or 'data' "
                f"list; found an object with keys {sorted(data)[:10]}"
                + (f" (lists: {lists[:10]})" if lists else "")
            )
        data, label = data[key], f" {key}"
    if not isinstance(data, list):
        raise InvalidInput(f"{name}: expected a JSON array of rows, got {_type_name(data)}")
    origins = [f"{name}{label} row {i}" for i in range(len(data))]
    problems = _Problems()
    rows, origins = _object_rows(data, origins, problems)
    problems.raise_if_any(f"malformed rows in {name}")
    return rows, origins


def _json_dicts(path: Path) -> dict | None:
    """The top-level object of a .json file if it is one (to find split keys in it)."""
    try:
        data = json.loads(_read_text(path))
    except (json.JSONDecodeError, InvalidInput):
        return None
    return data if isinstance(data, dict) else None


def _read_csv(path: Path, name: str):
    problems = _Problems()
    rows, origins = [], []
    try:
        fid = open(path, newline="", encoding="utf-8-sig")
    except OSError as e:
        raise NotFound(f"cannot open {name}: {e}") from e
    with fid:
        reader = csv.DictReader(fid)
        try:
            header = reader.fieldnames
            if not header:
                raise InvalidInput(f"{name}: empty CSV file (no header line)")
            end = reader.line_num
            for row in reader:
                start, end = end + 1, reader.line_num
                origin = f"{name}:{start}"
                if None in row:
                    problems.add(origin, f"more fields than the {len(header)} header columns")
                    continue
                missing = [k for k, v in row.items() if v is None]
                if missing:
                    problems.add(origin, f"fewer fields than header columns (missing {missing})")
                    continue
                row = _decode_csv_row(row, origin, problems)
                if row is not None:
                    rows.append(row)
                    origins.append(origin)
        except csv.Error as e:
            raise InvalidInput(f"{name}:{reader.line_num}: malformed CSV ({e})") from e
        except UnicodeDecodeError as e:
            raise InvalidInput(f"{name}: not UTF-8 text ({e})") from e
    problems.raise_if_any(f"malformed rows in {name}")
    return rows, origins


def _decode_csv_row(row: dict, origin: str, problems: _Problems) -> dict | None:
    """JSON-decode the structured columns of a CSV row (their cells hold JSON text)."""
    out = dict(row)
    for key in JSON_COLUMNS:
        value = out.get(key)
        if not isinstance(value, str):
            continue
        if key == "tools" and not value.strip():
            del out[key]  # no tools for this row
            continue
        if not value.lstrip().startswith(("[", "{")):
            if key in ("messages", "tools"):
                problems.add(origin, f"column {key!r} must hold a JSON list")
                return None
            continue  # plain text prompt / chosen / rejected
        try:
            decoded = json.loads(value)
        except json.JSONDecodeError as e:
            if key in ("messages", "tools"):
                problems.add(origin, f"column {key!r} is not valid JSON ({e.msg})")
                return None
            continue
        if key in ("messages", "tools") or _is_messages(decoded):
            out[key] = decoded  # else: plain text that happens to look like JSON
    return out


def _read_parquet(path: Path, name: str):
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise InvalidInput(
            f"{name}: reading parquet datasets needs pyarrow: pip install pyarrow"
        ) from e
    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise InvalidInput(f"{name}: cannot read parquet file ({e})") from e
    for row in rows:  # struct columns give every message every field, mostly None
        for key in ("messages", "chosen", "rejected", "prompt"):
            value = row.get(key)
            if isinstance(value, list):
                row[key] = [_drop_none(m) for m in value]
        if row.get("tools") is None:
            row.pop("tools", None)
    return rows, [f"{name} row {i}" for i in range(len(rows))]


def _drop_none(value):
    if isinstance(value, dict):
        return {k: v for k, v in value.items() if v is not None}
    return value


def _read_file(path: Path, name: str, split: str = "train"):
    ext = _ext(path)
    if ext == "jsonl":
        return _read_jsonl(path, name)
    if ext == "json":
        return _read_json(path, name, split)
    if ext == "csv":
        return _read_csv(path, name)
    if ext == "parquet":
        return _read_parquet(path, name)
    raise InvalidInput(
        f"{name}: unsupported dataset file type {path.suffix or '(no extension)'!r}; "
        f"use one of {', '.join('.' + e for e in DATA_EXTS)}"
    )


def _ext(path: Path) -> str:
    return path.suffix.lower().lstrip(".")


def _type_name(value) -> str:
    return {
        dict: "an object",
        list: "an array",
        str: "a string",
        type(None): "null",
        bool: "a boolean",
        int: "a number",
        float: "a number",
    }.get(type(value), type(value).__name__)


# ---------------------------------------------------------------------------------------------
# Finding splits


def _data_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and _ext(p) in DATA_EXTS)


def _split_files(root: Path, split: str) -> list[Path]:
    """Files for `split` in a folder: <split>.<ext>, HF shards, or a <split>/ folder."""
    for ext in DATA_EXTS:
        if (root / f"{split}.{ext}").is_file():
            return [root / f"{split}.{ext}"]
    for base in (root, root / "data"):
        if base != root:
            for ext in DATA_EXTS:
                if (base / f"{split}.{ext}").is_file():
                    return [base / f"{split}.{ext}"]
        shards = [p for p in _data_files(base) if re.match(rf"{re.escape(split)}-\d+", p.name)]
        if shards:
            return shards
        for sub in (base / split, *sorted(base.glob(f"*/{split}"))):  # <split>/, <config>/<split>/
            files = _data_files(sub)
            if files:
                return files
    return []


def _default_train_files(root: Path) -> list[Path]:
    """A folder with data files that are not named after splits: all of them are `train`."""
    split_like = re.compile(r"^(train|valid|validation|val|test|dev|eval)([-_.].*)?$", re.I)
    for base in (root, root / "data"):
        files = [p for p in _data_files(base) if not split_like.match(p.name)]
        if files and not any(split_like.match(p.name) for p in _data_files(base)):
            return files
    return []


def _load_files(files: list[Path], root: Path, prefix: str, split: str) -> Split:
    rows, origins, names = [], [], []
    for path in files:
        name = prefix + str(path.relative_to(root)) if prefix else str(path)
        r, o = _read_file(path, name, split)
        rows += r
        origins += o
        names.append(name)
    source = names[0] if len(names) == 1 else f"{names[0]} (+{len(names) - 1} more files)"
    return Split(rows, origins, source)


def _find_in_folder(root: Path, split: str, prefix: str, default_train: bool) -> Split | None:
    files = _split_files(root, split)
    if not files and default_train:
        files = _default_train_files(root)
    if not files:
        # A single .json file holding {"train": [...], "validation": [...]}
        for path in _data_files(root):
            if _ext(path) == "json" and isinstance((_json_dicts(path) or {}).get(split), list):
                files = [path]
                break
    return _load_files(files, root, prefix, split) if files else None


def _split_names(folder: Path) -> list[str]:
    names = set()
    for base in (folder, folder / "data"):
        for p in _data_files(base):
            names.add(re.split(r"[-.]", p.name, maxsplit=1)[0])
        if base.is_dir():
            names.update(d.name for d in base.iterdir() if d.is_dir() and _data_files(d))
    names.discard("data")
    return sorted(names)


def _looks_like_repo_id(source: str) -> bool:
    if source.startswith(("/", ".", "~")) or "\\" in source:
        return False
    if Path(source).suffix.lower().lstrip(".") in DATA_EXTS:
        return False
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", source) is not None


def _offline() -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except Exception:
        return False


def _hf_cache_dir() -> str | None:
    """The hub cache as the environment says now (huggingface_hub reads it once, at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return str(Path(os.environ["HF_HOME"]) / "hub")
    return None


def _hf_snapshot(repo_id: str) -> Path:
    """The local snapshot folder of an HF dataset; download it unless offline."""
    from huggingface_hub import constants, snapshot_download

    cache_dir = _hf_cache_dir()
    where = cache_dir or constants.HF_HUB_CACHE
    try:
        return Path(
            snapshot_download(
                repo_id, repo_type="dataset", local_files_only=True, cache_dir=cache_dir
            )
        )
    except Exception as e:
        local_error = e
    if _offline():
        raise NotFound(
            f"dataset {repo_id!r} is not a local file or folder and is not in the local Hugging "
            f"Face cache ({where}); downloads are not attempted because HF_HUB_OFFLINE=1 "
            f"({type(local_error).__name__})"
        )
    try:
        return Path(
            snapshot_download(
                repo_id,
                repo_type="dataset",
                cache_dir=cache_dir,
                allow_patterns=[f"*.{e}" for e in DATA_EXTS] + ["*.md"],
            )
        )
    except Exception as e:
        raise NotFound(
            f"dataset {repo_id!r} is not a local file or folder, not in the local Hugging Face "
            f"cache ({where}), and downloading it failed: {type(e).__name__}: {e}"
        ) from e


def _check_nonempty(split: Split, name: str):
    if not split.rows:
        raise InvalidInput(f"{name} split is empty: {split.source} has no rows")


def load_splits(
    source: str, split: str = "train", valid_split: str = ""
) -> tuple[Split, Split | None]:
    """Rows for training and (optionally) validation.

    ``source``: a .jsonl/.json/.parquet/.csv file, a folder with ``<split>.<ext>`` (or HF
    layouts ``data/<split>-00000-of-00001.parquet``, ``<split>/*.parquet``), or a Hugging Face
    dataset id present in the local cache (downloaded when not offline). ``valid_split``: a
    split name or a file path; by default the first of valid/validation/val that exists, if any.
    """
    split = split or "train"
    if not source or not str(source).strip():
        raise InvalidInput("no dataset given")
    source = str(source).strip()
    path = Path(source).expanduser()
    prefix = ""
    if not path.exists():
        if not _looks_like_repo_id(source):
            raise NotFound(f"dataset not found: no such file or folder {source!r}")
        path = _hf_snapshot(source)
        prefix = source + "/"

    if path.is_file():
        train_rows, train_origins = _read_file(path, str(path), split)
        train = Split(train_rows, train_origins, str(path))
        valid = _valid_for_file(path, valid_split)
    else:
        train = _find_in_folder(path, split, prefix, default_train=(split == "train"))
        if train is None:
            found = _split_names(path)
            raise NotFound(
                f"no {split!r} split in {prefix.rstrip('/') or path}: expected "
                f"{split}.jsonl, {split}.json, {split}.parquet or {split}.csv (or HF-style "
                f"data/{split}-00000-of-00001.parquet)"
                + (f"; splits found: {', '.join(found)}" if found else "; no data files found")
            )
        valid = _valid_for_folder(path, valid_split, prefix)

    _check_nonempty(train, "training")
    if valid is not None:
        _check_nonempty(valid, "validation")
    return train, valid


def _valid_from_path(valid_split: str) -> Split | None:
    vpath = Path(valid_split).expanduser()
    if _ext(vpath) in DATA_EXTS or os.sep in valid_split:
        if not vpath.is_file():
            raise NotFound(f"validation dataset not found: no such file {valid_split!r}")
        rows, origins = _read_file(vpath, str(vpath), "validation")
        return Split(rows, origins, str(vpath))
    return None


def _valid_for_file(path: Path, valid_split: str) -> Split | None:
    if valid_split:
        from_path = _valid_from_path(valid_split)
        if from_path is not None:
            return from_path
    if _ext(path) != "json":
        if valid_split:
            raise NotFound(f"no validation split {valid_split!r}: {path} is a single-split file")
        return None
    data = _json_dicts(path) or {}
    names = (valid_split,) if valid_split else VALID_SPLITS
    for name in names:
        if isinstance(data.get(name), list):
            rows, origins = _read_json(path, str(path), name)
            return Split(rows, origins, f"{path} [{name}]")
    if valid_split:
        raise NotFound(f"no validation split {valid_split!r} in {path}")
    return None


def _valid_for_folder(path: Path, valid_split: str, prefix: str) -> Split | None:
    if valid_split:
        from_path = _valid_from_path(valid_split)
        if from_path is not None:
            return from_path
        found = _find_in_folder(path, valid_split, prefix, default_train=False)
        if found is None:
            names = _split_names(path)
            raise NotFound(
                f"no validation split {valid_split!r} in {prefix.rstrip('/') or path}"
                + (f"; splits found: {', '.join(names)}" if names else "")
            )
        return found
    for name in VALID_SPLITS:
        found = _find_in_folder(path, name, prefix, default_train=False)
        if found is not None:
            return found
    return None


# ---------------------------------------------------------------------------------------------
# Formats


def _keys(keys: dict | None) -> dict:
    out = dict(DEFAULT_KEYS)
    out.update({k: v for k, v in (keys or {}).items() if k in DEFAULT_KEYS and v})
    return out


def detect_format(rows: list[dict], method: str = "sft", keys: dict | None = None) -> str:
    """The row format, decided from the first row: one of SFT_FORMATS, or 'preference' for
    dpo/orpo. ``keys`` may rename fields (mlx-lm's text/prompt/completion/chat_feature)."""
    if not rows:
        raise InvalidInput("the dataset has no rows")
    row = rows[0]
    k = _keys(keys)
    if (method or "sft").lower() in PREFERENCE_METHODS:
        if (
            "chosen" in row
            and "rejected" in row
            and ("prompt" in row or isinstance(row["chosen"], list))
        ):
            return "preference"
        raise InvalidInput(
            f"unsupported dataset format for {method}: rows need 'prompt', 'chosen' and "
            f"'rejected' (found keys: {sorted(row)})"
        )
    if k["prompt_feature"] in row and k["completion_feature"] in row:
        return "completions"
    if k["chat_feature"] in row:
        return "tools" if row.get("tools") is not None else "chat"
    if k["text_feature"] in row:
        return "text"
    raise InvalidInput(
        "unsupported dataset format: supported row formats are "
        f"text {{{k['text_feature']!r}}}, completions {{{k['prompt_feature']!r}, "
        f"{k['completion_feature']!r}}}, chat {{{k['chat_feature']!r}}}, "
        f"tools {{{k['chat_feature']!r}, 'tools'}} (and for dpo/orpo: "
        f"{{'prompt', 'chosen', 'rejected'}}); the first row has keys {sorted(row)}"
    )


def _message_problem(messages, what: str) -> str | None:
    """Why `messages` is not a list of {role, content} dicts, or None."""
    if not isinstance(messages, list):
        return f"{what} must be a list of messages, got {_type_name(messages)}"
    if not messages:
        return f"{what} is an empty list"
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            return f"{what}[{i}] must be an object with 'role' and 'content', got {_type_name(m)}"
        role = m.get("role")
        if not isinstance(role, str):
            return f"{what}[{i}] has no 'role'"
        if role not in KNOWN_ROLES:
            return (
                f"{what}[{i}] has unknown role {role!r} (expected one of {', '.join(KNOWN_ROLES)})"
            )
        content = m.get("content")
        if content is None:
            if not m.get("tool_calls"):
                return f"{what}[{i}] ({role}) has no 'content'"
        elif not isinstance(content, (str, list)):
            return f"{what}[{i}] ({role}) 'content' must be a string or a list of parts, got {_type_name(content)}"
    return None


def _tools_problem(row: dict) -> str | None:
    tools = row.get("tools")
    if tools is not None and not (
        isinstance(tools, list) and all(isinstance(t, dict) for t in tools)
    ):
        return f"'tools' must be a list of objects, got {_type_name(tools)}"
    return None


def _decode_json_field(row: dict, key: str) -> dict:
    """Rows from CSV / HF files sometimes hold messages or tools as JSON text."""
    value = row.get(key)
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            decoded = json.loads(value)
        except json.JSONDecodeError:
            return row
        if isinstance(decoded, list) and all(isinstance(d, dict) for d in decoded):
            return {**row, key: decoded}
    return row


def _is_messages(value) -> bool:
    if isinstance(value, dict):
        return "role" in value
    return isinstance(value, list) and all(isinstance(d, dict) for d in value)


def _sft_row_problem(row: dict, fmt: str, k: dict) -> str | None:
    def need_str(key):
        if key not in row:
            return f"missing key {key!r} (row keys: {sorted(row)})"
        if not isinstance(row[key], str):
            return f"{key!r} must be a string, got {_type_name(row[key])}"
        return None

    if fmt == "text":
        return need_str(k["text_feature"]) or (
            None if row[k["text_feature"]].strip() else f"{k['text_feature']!r} is empty"
        )
    if fmt == "completions":
        return (
            need_str(k["prompt_feature"])
            or need_str(k["completion_feature"])
            or _tools_problem(row)
        )
    key = k["chat_feature"]
    if key not in row:
        return f"missing key {key!r} (row keys: {sorted(row)})"
    return _message_problem(row[key], repr(key)) or _tools_problem(row)


def _progress_every(total: int) -> int:
    return max(1, total // 100)


def tokenize_sft(
    split: Split,
    tokenizer,
    fmt: str,
    mask_prompt: bool = False,
    keys: dict | None = None,
    progress=None,
) -> list[tuple[list[int], int]]:
    """(tokens, prompt_offset) per row, through mlx-lm's TextDataset / CompletionsDataset /
    ChatDataset. Rows are validated first; problems are reported with their origins."""
    from mlx_lm.tuner.datasets import ChatDataset, CompletionsDataset, TextDataset

    if fmt not in SFT_FORMATS:
        raise InvalidInput(
            f"unsupported SFT format {fmt!r}; expected one of {', '.join(SFT_FORMATS)}"
        )
    if mask_prompt and fmt == "text":
        raise InvalidInput(
            "mask_prompt is not supported for 'text' datasets (there is no prompt to mask)"
        )
    k = _keys(keys)
    has_template = bool(getattr(tokenizer, "has_chat_template", False))
    if fmt in ("chat", "tools") and not has_template:
        raise InvalidInput(
            f"{split.source}: '{fmt}' rows need a chat template, but the model's tokenizer has none; "
            "use 'text' or prompt/completion rows"
        )

    rows = split.rows
    if fmt in ("chat", "tools", "completions"):
        rows = [_decode_json_field(_decode_json_field(r, k["chat_feature"]), "tools") for r in rows]
    problems = _Problems()
    for row, origin in zip(rows, split.origins, strict=True):
        problem = _sft_row_problem(row, fmt, k)
        if problem:
            problems.add(origin, problem)
    problems.raise_if_any(f"invalid {fmt} rows in {split.source}")

    if fmt == "text":
        dataset = TextDataset(rows, tokenizer, text_key=k["text_feature"])
    elif fmt == "completions" and has_template:
        dataset = CompletionsDataset(
            rows, tokenizer, k["prompt_feature"], k["completion_feature"], mask_prompt
        )
    elif fmt == "completions":
        dataset = _PlainCompletions(
            tokenizer, k["prompt_feature"], k["completion_feature"], mask_prompt
        )
    else:
        dataset = ChatDataset(rows, tokenizer, chat_key=k["chat_feature"], mask_prompt=mask_prompt)

    out, total, every = [], len(rows), _progress_every(len(rows))
    for i, (row, origin) in enumerate(zip(rows, split.origins, strict=True)):
        try:
            tokens, offset = dataset.process(row)
            tokens = list(tokens)
        except Exception as e:
            problems.add(origin, f"cannot tokenize: {type(e).__name__}: {e}")
            continue
        if len(tokens) < 2:
            problems.add(origin, f"tokenizes to {len(tokens)} token(s); at least 2 are needed")
        elif mask_prompt and offset >= len(tokens):
            problems.add(origin, "nothing left to train on once the prompt is masked")
        out.append((tokens, int(offset)))
        if progress is not None and ((i + 1) % every == 0 or i + 1 == total):
            progress(i + 1, total)
    problems.raise_if_any(f"unusable {fmt} rows in {split.source}")
    return out


def _eos_id(tokenizer) -> int:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        ids = sorted(getattr(tokenizer, "eos_token_ids", None) or [])
        if not ids:
            raise InvalidInput("the model's tokenizer has no EOS token")
        eos = ids[0]
    return int(eos)


@dataclass
class _PlainCompletions:
    """prompt + completion as plain text, for tokenizers without a chat template."""

    tokenizer: object
    prompt_key: str
    completion_key: str
    mask_prompt: bool

    def process(self, d):
        prompt = list(self.tokenizer.encode(d[self.prompt_key]))
        tokens = prompt + list(
            self.tokenizer.encode(d[self.completion_key], add_special_tokens=False)
        )
        eos = _eos_id(self.tokenizer)
        if not tokens or tokens[-1] != eos:
            tokens.append(eos)
        return tokens, (len(prompt) if self.mask_prompt else 0)


# ---------------------------------------------------------------------------------------------
# Preference pairs (DPO / ORPO)


def _response_text(value, what: str):
    """(text, problem) for a chosen/rejected value: a string, messages, or one message."""
    if isinstance(value, str):
        return value, None
    if isinstance(value, dict):
        value = [value]
    if isinstance(value, list):
        problem = _message_problem(value, what)
        if problem:
            return None, problem
        last = next((m for m in reversed(value) if m.get("role") == "assistant"), None)
        if last is None:
            return None, f"{what} has no assistant message"
        content = last.get("content")
        if isinstance(content, list):
            parts = [
                p if isinstance(p, str) else p.get("text")
                for p in content
                if isinstance(p, str) or (isinstance(p, dict) and p.get("type") == "text")
            ]
            content = "".join(t for t in parts if isinstance(t, str))
        if not isinstance(content, str):
            return None, f"{what}: the assistant message has no text content"
        return content, None
    if value is None:
        return None, f"missing key {what}"
    return None, f"{what} must be a string or a list of messages, got {_type_name(value)}"


def _preference_row(row: dict):
    """(prompt, chosen_text, rejected_text, problem) for one row."""
    for key in ("prompt", "chosen", "rejected", "tools"):
        row = _decode_json_field(row, key)
    chosen, problem = _response_text(row.get("chosen"), "'chosen'")
    if problem:
        return None, None, None, problem
    rejected, problem = _response_text(row.get("rejected"), "'rejected'")
    if problem:
        return None, None, None, problem
    if "prompt" in row:
        prompt = row["prompt"]
        if isinstance(prompt, list):
            problem = _message_problem(prompt, "'prompt'")
        elif not isinstance(prompt, str):
            problem = f"'prompt' must be a string or a list of messages, got {_type_name(prompt)}"
    elif isinstance(row.get("chosen"), list) and len(row["chosen"]) > 1:
        prompt = row["chosen"][:-1]  # implicit prompt: the conversation before the answer
    else:
        problem = f"missing key 'prompt' (row keys: {sorted(row)})"
        prompt = None
    return prompt, chosen, rejected, problem or _tools_problem(row)


def tokenize_preference(
    split: Split, tokenizer, progress=None
) -> list[tuple[list[int], list[int], list[int]]]:
    """(prompt_ids, chosen_ids, rejected_ids) per row. The prompt goes through the chat template
    (as a user message when it is a string) when there is one; chosen/rejected ids are the
    completion tokens (no special tokens) followed by EOS."""
    has_template = bool(getattr(tokenizer, "has_chat_template", False))
    problems = _Problems()
    parsed = []
    for row, origin in zip(split.rows, split.origins, strict=True):
        prompt, chosen, rejected, problem = _preference_row(row)
        if problem is None and isinstance(prompt, list) and not has_template:
            problem = (
                "the prompt is a list of messages but the model's tokenizer has no chat template"
            )
        if problem:
            problems.add(origin, problem)
        else:
            parsed.append((prompt, chosen, rejected, row.get("tools"), origin))
    problems.raise_if_any(f"invalid preference rows in {split.source}")

    eos = _eos_id(tokenizer)
    out, total, every = [], len(parsed), _progress_every(len(parsed))
    for i, (prompt, chosen, rejected, tools, origin) in enumerate(parsed):
        try:
            if has_template:
                messages = (
                    [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
                )
                kwargs = {"tools": tools} if isinstance(tools, list) else {}
                prompt_ids = list(
                    tokenizer.apply_chat_template(messages, add_generation_prompt=True, **kwargs)
                )
            else:
                prompt_ids = list(tokenizer.encode(prompt))
            chosen_ids = list(tokenizer.encode(chosen, add_special_tokens=False)) + [eos]
            rejected_ids = list(tokenizer.encode(rejected, add_special_tokens=False)) + [eos]
        except Exception as e:
            problems.add(origin, f"cannot tokenize: {type(e).__name__}: {e}")
            continue
        if not prompt_ids:
            problems.add(origin, "the prompt tokenizes to no tokens")
        out.append((prompt_ids, chosen_ids, rejected_ids))
        if progress is not None and ((i + 1) % every == 0 or i + 1 == total):
            progress(i + 1, total)
    problems.raise_if_any(f"unusable preference rows in {split.source}")
    return out
