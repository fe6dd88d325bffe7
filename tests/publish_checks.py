"""Helpers shared by the full-disk and crash-safety tests."""

import hashlib
import json
from pathlib import Path

from mlxbackend.proto import backend_pb2 as pb


def digest(path: Path) -> str:
    """A file's, or a folder's files', sha256."""
    h = hashlib.sha256()
    for f in sorted([path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]):
        h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


def chat(text: str) -> pb.PredictOptions:
    """A short templated chat request (thinking off)."""
    return pb.PredictOptions(
        Messages=[pb.Message(role="user", content=text)],
        UseTokenizerTemplate=True,
        Tokens=16,
        Metadata={"enable_thinking": "false"},
    )


def litter(root: Path, also: tuple = ()) -> list:
    """Temp files and staging folders left under root (names publish.py gives them; `also`: more
    name prefixes to count)."""
    return [
        str(p)
        for p in root.rglob("*")
        if ".tmp-" in p.name or ".old-" in p.name or (also and p.name.startswith(also))
    ]


def write_dataset(folder: Path) -> Path:
    """A tiny prompt/completion train.jsonl in folder."""
    rows = [
        {"prompt": f"Tell me the secret {i % 4}.", "completion": "The secret word is banana."}
        for i in range(8)
    ]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def finetune_request(model, data, out, job_id, **kw) -> pb.FineTuneRequest:
    """A small LoRA fine-tune of model on data into out; kw overrides any field."""
    fields = dict(
        model=str(model),
        dataset_source=str(data),
        output_dir=str(out),
        learning_rate=1e-3,
        batch_size=2,
        adapter_rank=8,
        adapter_alpha=16,
        job_id=job_id,
    )
    fields.update(kw)
    return pb.FineTuneRequest(**fields)
