"""LocalAI registration: metadata.json and gallery.yaml in the shapes LocalAI's gallery code
reads (core/gallery: BackendMetadata, GalleryBackend, ListSystemBackends,
FindBestBackendFromMeta, transcribed below), and drop-in folders that really start the server."""

import json
import os
import signal
import subprocess
import time
from datetime import datetime
from pathlib import Path

import pytest
import yaml

from mlxbackend import gallery
from mlxbackend.client import connect
from mlxbackend.proto import backend_pb2 as pb
from tests.conftest import ROOT, free_port

# encoding/json ignores unknown keys, so a key outside these would be silently lost
BACKEND_METADATA = {"alias", "meta_backend_for", "name", "gallery_url", "installed_at"}
GALLERY_BACKEND = {
    "url", "name", "description", "license", "urls", "icon", "tags", "files", "size",
    "gallery", "installed", "alias", "uri", "capabilities", "mirrors",
}  # fmt: skip


def list_system_backends(backends_path: Path) -> dict:
    """LocalAI's ListSystemBackends: every folder with run.sh, by name and by its alias."""
    found = {}
    for folder in sorted(p for p in backends_path.iterdir() if p.is_dir()):
        run = folder / "run.sh"
        meta_file = folder / "metadata.json"
        meta = json.loads(meta_file.read_text()) if meta_file.exists() else {"name": folder.name}
        if folder.name not in found and run.exists():
            found[folder.name] = run
        if meta.get("alias"):
            found[meta["alias"]] = run
    return found


def best_backend(meta_entry: dict, entries: list, capability: str) -> dict | None:
    """FindBestBackendFromMeta: the reported capability if the map has it, else "default"."""
    caps = meta_entry["capabilities"]
    name = caps.get(capability if capability in caps else "default", "")
    return next((e for e in entries if e["name"] == name), None)


@pytest.fixture()
def installed(tmp_path):
    """A backend folder as install.sh lays it out (run.sh from the package, the venv linked)."""
    backends = tmp_path / "backends"
    target = backends / "mlxbackend"
    target.mkdir(parents=True)
    (target / "run.sh").write_text((ROOT / "mlxbackend" / "run.sh").read_text())
    (target / "run.sh").chmod(0o755)
    (target / "venv").symlink_to(ROOT / ".venv")
    return target


def test_metadata_and_gallery_have_localai_shapes(installed):
    code = subprocess.run(
        [str(ROOT / ".venv/bin/python"), "-m", "mlxbackend.gallery", str(installed), "--drop-in"],
        capture_output=True,
        text=True,
    )
    assert code.returncode == 0, code.stderr
    meta = json.loads((installed / "metadata.json").read_text())
    assert set(meta) <= BACKEND_METADATA
    assert meta["name"] == "mlxbackend" and meta["alias"] == "mlx"
    datetime.fromisoformat(meta["installed_at"])  # RFC 3339, like time.RFC3339

    entries = yaml.safe_load((installed / "gallery.yaml").read_text())
    assert isinstance(entries, list) and entries
    for entry in entries:
        assert set(entry) <= GALLERY_BACKEND, set(entry) - GALLERY_BACKEND
        assert entry["name"] and isinstance(entry.get("tags", []), list)
    metas = [e for e in entries if e.get("capabilities") and not e.get("uri")]  # IsMeta()
    assert [m["name"] for m in metas] == ["mlxbackend"]
    for capability in ("metal", "nvidia", "default"):  # darwin/arm64 reports metal
        concrete = best_backend(metas[0], entries, capability)
        assert concrete is not None and concrete.get("uri"), capability
        # a directory URI is copied as the backend folder: it must be one, with run.sh
        assert (Path(concrete["uri"]) / "run.sh").exists()
    assert best_backend(metas[0], entries, "metal")["name"] == "metal-mlxbackend"

    registered = list_system_backends(installed.parent)
    assert {"mlxbackend", "mlx", "mlx-vlm", "mlx-distributed"} <= set(registered)
    for name in ("mlx-vlm", "mlx-distributed"):
        assert set(json.loads((installed.parent / name / "metadata.json").read_text())) <= (
            BACKEND_METADATA
        )


def test_drop_in_folder_starts_the_backend(installed):
    gallery.write_all(installed, drop_in=True)
    run = list_system_backends(installed.parent)["mlx-distributed"]
    port = free_port()
    proc = subprocess.Popen(
        [str(run), "--addr", f"127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        stub = connect(f"127.0.0.1:{port}")
        deadline = time.time() + 40
        while True:
            try:
                assert stub.Health(pb.HealthMessage(), timeout=2).message == b"OK"
                break
            except Exception:
                if time.time() > deadline:
                    raise
                time.sleep(0.2)
        # LocalAI's job-process load: LoadModel(Model=<backend name>) succeeds without loading
        assert stub.LoadModel(pb.ModelOptions(Model="mlx-distributed"), timeout=30).success
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(15)


def test_gallery_cli_refuses_a_folder_without_run_sh(tmp_path):
    assert gallery.main([str(tmp_path)]) == 2
