"""Helpers shared by the full-disk and crash-safety tests."""

import hashlib
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
