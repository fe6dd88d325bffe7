"""Fine-tuning jobs: start (validate, then train in the background on the worker), stop, progress."""

import asyncio
import os
from pathlib import Path

from mlxbackend.errors import InvalidInput, NotFound, Precondition
from mlxbackend.jobs import JobBoard, check_output_dir, remember, wait_ended
from mlxbackend.text.models import model_dir, read_config
from mlxbackend.train import checkpoints, data
from mlxbackend.train.config import FineTuneConfig
from mlxbackend.train.loop import TrainRun


class FineTunes:
    def __init__(self, worker):
        self.worker = worker
        self.board = JobBoard("finetune")
        self.runs: dict = {}  # job_id -> TrainRun (while it runs)

    async def start(self, cfg: FineTuneConfig) -> str:
        """Checks everything that can be checked before training, answers, then trains."""

        for other in self.board.running():
            raise Precondition(
                f"a fine-tuning job is already running in this process ({other}); "
                "stop it or start another backend process"
            )
        await asyncio.to_thread(check_output_dir, cfg.output_dir)
        train, valid, fmt, resume = await asyncio.to_thread(_prepare, cfg)
        models_dir = cfg.opt("model_path") or os.environ.get("MLXB_MODELS_DIR", "")
        base_dir = await self.worker.run(
            model_dir, cfg.model, "", models_dir
        )  # a .gguf is imported: MLX work
        await asyncio.to_thread(check_target_modules, base_dir, cfg.target_modules)
        if cfg.training_type == "full" and "quantization" in read_config(base_dir):
            raise InvalidInput(
                "full fine-tuning needs an unquantized model; use lora/dora (QLoRA) on a quantized one"
            )
        remember("finetune", cfg.job_id, Path(cfg.output_dir))
        self.board.open(
            cfg.job_id,
            {
                "status": "queued",
                "message": f"{cfg.training_type} {cfg.method} on {len(train.rows)} rows ({fmt})",
                "total_epochs": float(cfg.epochs),
            },
        )
        publish = self.board.publisher(
            cfg.job_id,
            cfg.output_dir,
            cfg.to_dict(),
            on_end=lambda: self.runs.pop(cfg.job_id, None),
        )
        run = TrainRun(cfg, publish, base_dir, train, valid, fmt, resume)
        self.runs[cfg.job_id] = run
        self.worker.add(run)
        return cfg.job_id

    def stop(self, job_id: str, save_checkpoint: bool) -> str:
        run = self.runs.get(job_id)
        if run is None:
            snapshot = self.board.get(job_id)
            if snapshot is None:
                raise NotFound(f"unknown job_id {job_id!r}")
            return f"job {job_id} already {snapshot.get('status')}"
        run.request_stop(save_checkpoint)
        return f"stopping job {job_id}" + (" (saving a checkpoint)" if save_checkpoint else "")

    async def stop_all(self, timeout: float = 10.0):
        """Free / shutdown: stop every run, keeping a checkpoint, and wait for them to end."""
        for run in list(self.runs.values()):
            run.request_stop(True)
        await wait_ended(self.runs, timeout)

    def watch(self, job_id: str):
        return self.board.watch(job_id)


def _prepare(cfg: FineTuneConfig):
    """Off the event loop, before answering: dataset rows and format, resume point."""

    valid_name = cfg.opt("validation_split")
    train, valid = data.load_splits(cfg.dataset, cfg.split, valid_name)
    keys = {
        k: cfg.opt(k)
        for k in ("text_feature", "prompt_feature", "completion_feature", "chat_feature")
    }
    fmt = data.detect_format(train.rows, cfg.method, keys)
    resume = checkpoints.resolve_resume(cfg.resume_from, cfg.output_dir)
    return train, valid, fmt, resume


def check_target_modules(base_dir: Path, names: list):
    """target_modules must name linear layers of the model's blocks (read from weight names)."""
    from safetensors import safe_open

    if not names or [n.lower() for n in names] in (["all-linear"], ["all_linear"], ["all"]):
        return
    weights = set()
    for f in Path(base_dir).glob("*.safetensors"):
        with safe_open(str(f), "np") as fh:
            weights.update(fh.keys())
    layer0 = sorted(
        {
            k.split(".layers.0.", 1)[1].rsplit(".", 1)[0]
            for k in weights
            if ".layers.0." in k and k.endswith(".weight")
        }
    )
    for name in names:
        if not any(path == name or path.rsplit(".", 1)[-1] == name for path in layer0):
            raise InvalidInput(
                f"target_modules: no layer named {name!r}; this model has: {', '.join(layer0)}"
            )
