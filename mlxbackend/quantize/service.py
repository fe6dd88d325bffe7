"""Quantization jobs: start (validate, then run in the background), stop, progress.

Several jobs may run in one process (LocalAI's reference backend allows it); their MLX work
shares the single MLX worker thread, their llama.cpp subprocesses run side by side."""

import asyncio
import functools
import json
import os
from pathlib import Path

from converters.llama_cpp_tools import ToolsMissing, find_llama_cpp_tools
from converters.mlx_to_gguf import check_tools
from mlxbackend.errors import InvalidInput, NotFound, Precondition
from mlxbackend.jobs import JobBoard, check_output_dir, recovered_snapshot, remember, wait_ended
from mlxbackend.quantize.config import QuantConfig, models_dir
from mlxbackend.quantize.run import QuantRun, describe


class Quantizations:
    def __init__(self, worker):
        self.worker = worker
        self.board = JobBoard("quantize")
        self.runs: dict = {}  # job_id -> QuantRun (while it runs)
        self.tasks: dict = {}  # job_id -> asyncio.Task

    async def start(self, cfg: QuantConfig) -> str:
        """Checks what can be checked cheaply (type, output_dir, input, architecture), answers,
        then runs the job in the background."""
        if cfg.job_id in self.runs:
            raise Precondition(f"quantization job {cfg.job_id!r} is already running")
        if cfg.family == "gguf":
            require_gguf_tools(cfg.qtype)
        await asyncio.to_thread(check_output_dir, cfg.output_dir)
        source, repo_id = await asyncio.to_thread(locate, cfg.model, models_dir(cfg))
        if source is not None and source.is_dir() and cfg.family == "gguf":
            await asyncio.to_thread(check_architecture, source)
        remember("quantize", cfg.job_id, Path(cfg.output_dir))
        self.board.open(
            cfg.job_id, {"status": "queued", "progress_percent": 0.0, "message": describe(cfg)}
        )
        publish = self.board.publisher(cfg.job_id, cfg.output_dir, cfg.to_dict())
        publish(status="queued")  # job.json from the start
        run = QuantRun(cfg, self.worker, publish, source, repo_id)
        self.runs[cfg.job_id] = run
        task = asyncio.ensure_future(run.run())
        self.tasks[cfg.job_id] = task
        task.add_done_callback(
            lambda _t, j=cfg.job_id: (self.runs.pop(j, None), self.tasks.pop(j, None))
        )
        return cfg.job_id

    def stop(self, job_id: str) -> str:
        run = self.runs.get(job_id)
        if run is None:
            snapshot = self.board.get(job_id) or recovered_snapshot(
                "quantize", job_id
            )  # NotFound if none
            return f"job {job_id} already {snapshot.get('status')}"
        run.request_stop()
        return f"stopping quantization job {job_id}"

    async def stop_all(self, timeout: float = 10.0):
        """Free / shutdown: stop every job and wait for them to end (their temp files removed)."""
        for run in list(self.runs.values()):
            run.request_stop()
        await wait_ended(self.runs, timeout)

    def watch(self, job_id: str):
        return self.board.watch(job_id)


def locate(model: str, model_path: str = "") -> tuple:
    """(local input path, "") or (None, repo id) for an uncached Hugging Face id to download.

    A path is taken as given (absolute, or relative to model_path, then to the working folder);
    NotFound when nothing matches."""
    tried = []
    path = Path(model).expanduser()
    candidates = [path] if path.is_absolute() else [Path(model_path) / model] if model_path else []
    if not path.is_absolute():
        candidates.append(path)
    for candidate in candidates:
        if candidate.exists():
            return _check_input(candidate.absolute()), ""
        tried.append(str(candidate))
    if not path.is_absolute() and model.count("/") == 1 and not model.startswith((".", "~")):
        from huggingface_hub import snapshot_download
        from mlx_lm.utils import DEFAULT_ALLOW_PATTERNS

        try:
            return _check_input(
                Path(
                    snapshot_download(
                        model, local_files_only=True, allow_patterns=DEFAULT_ALLOW_PATTERNS
                    )
                )
            ), ""
        except (NotFound, InvalidInput):
            raise
        except Exception:
            tried.append(f"the Hugging Face cache for {model}")
        if os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("1", "true", "yes"):
            return None, model  # downloaded by the job (status downloading)
        tried.append(f"a download of {model} (HF_HUB_OFFLINE is set)")
    raise NotFound(f"model {model!r} not found; tried: {', '.join(tried)}")


def require_gguf_tools(qtype: str) -> None:
    """Precondition (FAILED_PRECONDITION) naming the install command when the GGUF tools (torch
    + llama.cpp's converter, llama-cpp-python's quantizer) are not installed: `make run` leaves
    them out, `make install-gguf` / `scripts/install.sh --with-gguf` add them."""

    try:
        check_tools(qtype)
    except ToolsMissing as e:
        raise Precondition(str(e)) from None


def _check_input(path: Path) -> Path:
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise InvalidInput(
                f"{path} is a file but not a .gguf; give a model folder, a .gguf file or a HF id"
            )
        return path
    if not (path / "config.json").is_file():
        raise InvalidInput(f"{path} is not an MLX/Hugging Face model folder (no config.json)")
    return path


@functools.lru_cache(maxsize=1)
def _converter_sources(tools: str) -> str:
    root = Path(tools)
    files = [root / "convert_hf_to_gguf.py", *sorted((root / "conversion").glob("*.py"))]
    return "\n".join(f.read_text(errors="replace") for f in files if f.is_file())


def check_architecture(model_dir: Path):
    """InvalidInput when llama.cpp's converter registers none of the model's architectures
    (it would fail with "Architecture … not supported!" after loading)."""

    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        return
    archs = [a for a in config.get("architectures") or [] if isinstance(a, str)]
    tools = find_llama_cpp_tools()
    if not archs or tools is None:
        return  # nothing to check against: the converter will say
    source = _converter_sources(str(tools))
    if "register(" not in source:
        return
    if not any(f'"{a}"' in source for a in archs):
        raise InvalidInput(
            f"llama.cpp's converter does not support the architecture {', '.join(archs)} of "
            f"{model_dir}: it cannot be written as GGUF (MLX types such as mlx-q4 still work)"
        )
