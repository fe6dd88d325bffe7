"""Checkpoints: `<output_dir>/checkpoint-<step>/` holds the adapter (mlx-lm layout, so it loads
as a LoadModel LoraAdapter), the optimizer state, and `trainer_state.json` (step, epoch, loss,
created_at, …). Folders are published with mlxbackend.publish (staged beside, renamed when
complete), so a killed process or a full disk never leaves a half checkpoint under a final name;
listing checkpoints first recovers an interrupted publish (publish.clean_stale)."""

import json
import time
from datetime import datetime, timezone
from pathlib import Path

from mlxbackend import publish
from mlxbackend.errors import NotFound

ADAPTER_FILE = "adapters.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "trainer_state.json"
PREFIX = "checkpoint-"


def write_adapter(folder: Path, weights: dict, adapter_config: dict):
    """The adapter files, as mlx-lm's load_adapters reads them (into a folder being staged)."""
    import mlx.core as mx

    with open(
        folder / ADAPTER_FILE, "wb"
    ) as f:  # a file object: a full disk raises OSError(ENOSPC)
        mx.save_safetensors(f, weights)
    (folder / ADAPTER_CONFIG).write_text(json.dumps(adapter_config, indent=2))


def save_checkpoint(
    output_dir: Path,
    step: int,
    weights: dict,
    optimizer_state: dict,
    adapter_config: dict,
    trainer_state: dict,
) -> Path:
    """Write checkpoint-<step> atomically; returns its path."""
    import mlx.core as mx

    final = output_dir / f"{PREFIX}{step}"
    # re-saving a step (after a resume) replaces the old folder safely (publish.place_folder)
    with publish.atomic_folder(final) as tmp:
        write_adapter(tmp, weights, adapter_config)
        with open(tmp / OPTIMIZER_FILE, "wb") as f:
            mx.save_safetensors(f, optimizer_state)
        state = dict(trainer_state, step=step, created_at=_now())
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))
    return final


def save_final(output_dir: Path, weights: dict, adapter_config: dict, trainer_state: dict):
    """The trained adapter at the top of output_dir (each file published atomically; the
    weights last, so a complete adapters.safetensors means the other two are in place)."""
    import mlx.core as mx

    publish.write_json(output_dir / ADAPTER_CONFIG, adapter_config)
    publish.write_json(output_dir / STATE_FILE, dict(trainer_state, created_at=_now()))
    with publish.atomic_file(output_dir / ADAPTER_FILE) as f:
        mx.save_safetensors(f, weights)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def checkpoint_dirs(output_dir: Path) -> list:
    """Complete checkpoints, oldest step first."""
    found = []
    if output_dir.is_dir():
        publish.clean_stale(output_dir)
        for d in output_dir.iterdir():
            step = d.name[len(PREFIX) :]
            if (
                d.is_dir()
                and d.name.startswith(PREFIX)
                and step.isdigit()
                and (d / STATE_FILE).exists()
            ):
                found.append((int(step), d))
    return [d for _, d in sorted(found)]


def latest_checkpoint(output_dir: Path) -> Path | None:
    dirs = checkpoint_dirs(Path(output_dir))
    return dirs[-1] if dirs else None


def read_state(folder: Path) -> dict:
    return json.loads((folder / STATE_FILE).read_text())


def list_checkpoints(output_dir: str) -> list:
    """[{path, step, epoch, loss, created_at}] read from each checkpoint's own metadata."""
    out = []
    for d in checkpoint_dirs(Path(output_dir)):
        try:
            state = read_state(d)
        except (OSError, ValueError):
            continue
        created = state.get("created_at") or time.strftime(
            "%Y-%m-%dT%H:%M:%SZ", time.gmtime(d.stat().st_mtime)
        )
        out.append(
            {
                "path": str(d),
                "step": int(state.get("step", 0)),
                "epoch": float(state.get("epoch", 0.0)),
                "loss": float(state.get("loss", 0.0)),
                "created_at": created,
            }
        )
    return out


def resolve_resume(resume_from: str, output_dir: str) -> Path | None:
    """resume_from_checkpoint: a checkpoint folder, a job folder (its latest checkpoint), or
    `latest`/`true` (the latest in output_dir)."""

    if not resume_from or resume_from.lower() in ("false", "no", "0"):
        return None
    if resume_from.lower() in ("latest", "true", "yes", "1"):
        found = latest_checkpoint(Path(output_dir))
        if found is None:
            raise NotFound(f"resume_from_checkpoint={resume_from}: no checkpoint in {output_dir}")
        return found
    path = Path(resume_from)
    if (path / STATE_FILE).exists() and (path / OPTIMIZER_FILE).exists():
        return path
    found = latest_checkpoint(path)
    if found is None:
        raise NotFound(
            f"resume_from_checkpoint: {resume_from} is not a checkpoint folder and holds none"
        )
    return found
