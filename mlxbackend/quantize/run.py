"""One quantization job: resolve the input, convert/quantize, write the output atomically.

Phases and progress (contract §12.6):

    downloading  0–25 %   resolve the input: a download of an uncached Hugging Face id (plain
                          thread), or the import of a .gguf file into MLX (worker)
    converting  30–40 %   GGUF: dequantize an MLX-quantized folder (worker), then llama.cpp's
                          convert_hf_to_gguf.py (subprocess, from a plain thread);
                          MLX: load (and dequantize / cast) on the worker
    quantizing  50–95 %   GGUF: llama.cpp's quantizer (subprocess); MLX: mlx-lm's quantize_model,
                          evaluated one transformer block per worker call, then saved;
                          data-aware MLX types (mlx-awq/gptq/dwq/dynamic): the calibration text
                          tokenized (45 %), then mlx-lm's method in one worker call reporting
                          per loop iteration (50–85 %), see `quantize.calibrated`; mlx-q4 with
                          calibration_text: tokenized (45 %), the float model run over it a
                          batch per worker call collecting activation statistics (50–60 %),
                          then the searched layers (60–85 %), see `quantize.recipe`
    completed   100 %     output_file + extra_metrics {file_size_mb, compression_ratio, …}

Everything MLX runs on the backend's single MLX worker thread, one short call at a time, so
generation requests keep being served in between; llama.cpp's tools run as subprocesses from a
plain thread. Everything is written under `<output_dir>/.quantize-<job>.tmp/` and only the
finished output is renamed to its final name; that folder is always removed at the end.

Stop: a flag checked between phases and in every progress callback (which raises `Stopped`
inside the converters, whose clean-up then runs), and the job's llama.cpp subprocesses are
killed at once, so a stop ends the job as `stopped` within a second or two with no output."""

import asyncio
import json
import os
import shutil
import signal
import threading
from pathlib import Path

from converters.mlx_to_gguf import dequantize_mlx_folder, mlx_quantization, mlx_to_gguf
from mlxbackend.errors import InvalidInput, status_of
from mlxbackend.publish import no_space, place_file, place_folder
from mlxbackend.quantize import calibrated, perplexity
from mlxbackend.quantize.calibrated import calibration_blocks, calibration_settings, settings
from mlxbackend.quantize.config import DEFAULT_RECIPE, QuantConfig, base_name, output_path
from mlxbackend.text.models import fix_config, read_config
from mlxbackend.train.export import write_yaml

IMATRIX_BATCH = 4  # calibration blocks per worker call while collecting activation statistics


class Stopped(BaseException):
    """Raised inside the job's progress callbacks once a stop was asked for (a BaseException,
    so that no `except Exception` in a converter swallows it)."""


def weight_bytes(path: Path) -> int:
    """Bytes of model weights: a .gguf file's size, or a folder's safetensors/bin/gguf files."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(
        f.stat().st_size
        for f in path.iterdir()
        if f.is_file() and f.suffix in (".safetensors", ".bin", ".gguf", ".npz")
    )


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)[:100]


class QuantRun:
    """Runs one job (`await run()` on the event loop); `request_stop()` from anywhere."""

    def __init__(self, cfg: QuantConfig, worker, publish, source: Path | None, repo_id: str = ""):
        self.cfg = cfg
        self.worker = worker
        self.publish = publish  # publish(**fields): snapshot update
        self.source = source  # resolved local input (folder or .gguf), None = download repo_id
        self.repo_id = repo_id
        self.final = output_path(cfg)
        self.tmp = Path(cfg.output_dir) / f".quantize-{_safe(cfg.job_id)}.tmp"
        self.stop_event = threading.Event()
        self.percent = 0.0
        self.status = "queued"
        self.state: dict = {}  # MLX objects, touched on the worker thread only
        self.recipe_metrics: dict = {}  # how mlx-q4 ran (extra_metrics)

    # -- control --------------------------------------------------------------------------

    def request_stop(self):
        self.stop_event.set()
        self._kill_children()

    def check(self):
        if self.stop_event.is_set():
            raise Stopped()

    def _kill_children(self):
        """Kill this job's llama.cpp subprocesses (their command lines name the job's temp folder)."""
        me, marker = os.getpid(), str(self.tmp).encode()
        for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else ():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
                ppid = int(stat.rsplit(")", 1)[1].split()[1])
                if ppid == me and marker in (entry / "cmdline").read_bytes():
                    os.kill(int(entry.name), signal.SIGKILL)
            except (OSError, ValueError, IndexError):
                continue

    def report(self, status: str, percent: float, message: str | None = None, **fields):
        """Any thread. Progress never goes back; stops are noticed here."""
        self.check()
        percent = round(max(self.percent, min(100.0, float(percent))), 1)
        if status == self.status and percent == self.percent and message is None and not fields:
            return  # nothing new (converter output lines without progress)
        self.percent, self.status = percent, status
        if message is not None:
            fields["message"] = message
        self.publish(status=status, progress_percent=percent, **fields)

    # -- the job ----------------------------------------------------------------------------

    async def run(self):
        """The whole job; the terminal status is published once the temp folder is gone."""
        stopped = dict(
            status="stopped", message="quantization stopped by request; no output was written"
        )
        try:
            await asyncio.to_thread(self._fresh_tmp)
            src = await self._resolve()
            base_bytes = weight_bytes(self.source if self.source is not None else src)
            staged = await (self._gguf(src) if self.cfg.family == "gguf" else self._mlx(src))
            metrics = await self._metrics(src, base_bytes, staged)
            self.report("quantizing", 95, "finishing")
            await asyncio.to_thread(self._place, staged)
            # The output is in place: from here on the job completes, whatever arrives.
            final = dict(
                status="completed",
                progress_percent=100.0,
                message=f"wrote {self.final}",
                output_file=str(self.final),
                extra_metrics=metrics,
            )
        except Stopped:
            final = stopped
        except asyncio.CancelledError:  # the server is going away
            self.state.clear()
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.publish(**stopped)
            raise
        except BaseException as exc:  # noqa: BLE001 — every failure ends the job as `failed`
            exc = no_space(exc, self.final, self.tmp) or exc  # a full disk, named as such
            final = (
                stopped
                if self.stop_event.is_set()
                else dict(status="failed", message=status_of(exc)[1])
            )
        self.state.clear()
        await asyncio.to_thread(shutil.rmtree, self.tmp, True)
        self.publish(**final)

    def _fresh_tmp(self):
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)

    async def _resolve(self) -> Path:
        """downloading 0–25 %: a local MLX/HF folder for the input."""
        self.report("downloading", 0, f"resolving {self.cfg.model}")
        src = self.source
        if src is None:
            self.report("downloading", 5, f"downloading {self.repo_id} from Hugging Face")
            src = await asyncio.to_thread(self._download)
            self.source = src
        if src.is_file() and src.suffix.lower() == ".gguf":
            self.report("downloading", 5, f"importing {src.name} into MLX")
            src = await self.worker.run(self._import_gguf, src)
        if not (src / "config.json").is_file():
            raise InvalidInput(f"{src} is not an MLX/Hugging Face model folder (no config.json)")
        self.report("downloading", 25, f"input ready: {src}")
        return src

    def _download(self) -> Path:
        from huggingface_hub import snapshot_download
        from mlx_lm.utils import DEFAULT_ALLOW_PATTERNS

        token = self.cfg.opt("hf_token") or None
        return Path(
            snapshot_download(
                self.repo_id, allow_patterns=DEFAULT_ALLOW_PATTERNS, token=token, etag_timeout=10
            )
        )

    def _import_gguf(self, gguf: Path) -> Path:
        """Worker: the .gguf as a float MLX folder inside the job's temp folder."""
        from converters.gguf_to_mlx import convert_gguf

        def progress(done, total, _name):
            self.report("downloading", 5 + 20 * done / max(1, total))

        dtype = "float16" if self.cfg.family == "gguf" else None
        return convert_gguf(
            gguf, self.tmp / "imported", dtype=dtype, dequantize=True, progress=progress
        )

    # -- GGUF ------------------------------------------------------------------------------

    async def _gguf(self, src: Path):
        cfg = self.cfg
        self.report(
            "converting", 30, f"converting {src.name} with llama.cpp's convert_hf_to_gguf.py"
        )
        if mlx_quantization(json.loads((src / "config.json").read_text())) is not None:
            self.report("converting", 30, "dequantizing the MLX-quantized input")
            src = await self.worker.run(dequantize_mlx_folder, src, self.tmp / "dequantized")
            self.check()

        def progress(stage, fraction):
            if stage == "quantizing":
                self.report(
                    "quantizing",
                    50 + 45 * fraction,
                    None if fraction else f"llama.cpp quantizer: {cfg.qtype}",
                )
            else:
                self.report("converting", 30 + 10 * fraction)

        out = self.tmp / self.final.name
        await asyncio.to_thread(
            mlx_to_gguf,
            src,
            out,
            cfg.qtype,
            progress=progress,
            work_dir=self.tmp,
            pre_tokenizer=cfg.opt("pre_tokenizer") or None,
            nthread=int(cfg.opt("threads", "0")),
        )
        return out

    # -- MLX -------------------------------------------------------------------------------

    async def _mlx(self, src: Path):
        cfg = self.cfg
        self.report("converting", 30, f"loading {src.name}")
        n_layers = await self.worker.run(self._load, src)
        self.check()
        self.report("converting", 40, "loaded")
        if cfg.method:
            await self._calibrated(n_layers)
        elif cfg.quantize:
            start = await self._imatrix(n_layers) if cfg.imatrix else 50
            self.report("quantizing", start, f"quantizing ({cfg.qtype})")
            await self.worker.run(self._quantize)
            for i in range(n_layers):
                self.check()
                await self.worker.run(self._eval_layer, i)
                self.report("quantizing", start + (85 - start) * (i + 1) / max(1, n_layers))
        else:
            self.report("quantizing", 50, f"casting to {cfg.dtype}")
        self.check()
        await self.worker.run(self._eval_all)
        self.report("quantizing", 85, "saving")
        staged = self.tmp / self.final.name
        await self.worker.run(self._save, src, staged)
        return staged

    async def _calibrated(self, n_layers: int):
        """Data-aware methods (quantize.calibrated): evaluate the float model layer by layer,
        tokenize the calibration text, then mlx-lm's method in one worker call whose loop
        iterations publish progress (50–85 %), see stops and serve the worker's other work."""

        cfg = self.cfg
        s = settings(cfg.method, cfg.options)
        shape = await self._calibration_blocks(n_layers, s)
        self.report(
            "quantizing", 50, f"{cfg.qtype}: {shape[0]} calibration blocks of {shape[1]} tokens"
        )
        await self.worker.run(self._run_method, s)
        self.check()

    async def _calibration_blocks(self, n_layers: int, s: dict) -> tuple:
        """Evaluate the float model layer by layer (40–45 %), then tokenize the calibration
        text (45 %); returns the blocks' shape (N, L)."""
        for i in range(n_layers):
            self.check()
            await self.worker.run(self._eval_layer, i)
            self.report("converting", 40 + 5 * (i + 1) / max(1, n_layers))
        self.check()
        await self.worker.run(self._eval_all)
        self.report("quantizing", 45, "tokenizing the calibration text")
        shape = await self.worker.run(self._calibration, s)
        self.check()
        return shape

    async def _imatrix(self, n_layers: int) -> float:
        """mlx-q4 with calibration_text: the float model over the calibration blocks, a batch
        per worker call (50–60 %), each Linear's inputs summed as x² per channel (llama.cpp's
        imatrix) for the recipe's search; returns the progress the search starts at."""
        cfg = self.cfg
        s = calibration_settings(DEFAULT_RECIPE, cfg.options)
        n, length = await self._calibration_blocks(n_layers, s)
        self.report(
            "quantizing",
            50,
            f"{cfg.qtype}: {n} calibration blocks of {length} tokens: activation statistics",
        )
        await self.worker.run(self._stats_attach)
        for start in range(0, n, IMATRIX_BATCH):
            self.check()
            await self.worker.run(self._stats_batch, start)
            done = min(n, start + IMATRIX_BATCH)
            self.report("quantizing", 50 + 10 * done / n, f"activation statistics {done}/{n}")
        layers = await self.worker.run(self._stats_detach)
        self.recipe_metrics.update(calibration_tokens=n * length, imatrix_layers=layers)
        return 60

    def _stats_attach(self):
        from mlxbackend.quantize import recipe

        self.state["stats"] = recipe.attach_stats(self.state["model"])

    def _stats_batch(self, start: int):
        from mlxbackend.quantize import recipe

        st = self.state
        batch = st["calibration"][start : start + IMATRIX_BATCH]
        recipe.collect_stats(st["model"], st["stats"], batch)

    def _stats_detach(self) -> int:
        from mlxbackend.quantize import recipe

        st = self.state
        st["importance"] = recipe.detach_stats(st["model"], st.pop("stats"))
        st.pop("calibration", None)
        return len(st["importance"])

    def _calibration(self, s: dict) -> tuple:
        """Worker: the [N, L] calibration token blocks."""

        data = calibration_blocks(self.state["tokenizer"], s)
        self.state["calibration"] = data
        return tuple(data.shape)

    def _run_method(self, s: dict):
        """Worker: the method itself (one call; see quantize.calibrated for its granularity)."""

        def progress(fraction, message):
            self.report("quantizing", 50 + 35 * fraction, message)

        st = self.state
        model, config = calibrated.quantize(
            st.pop("model"),
            st["config"],
            st.pop("calibration"),
            s,
            self.cfg.group_size or 64,
            progress,
        )
        st.update(model=model, config=config)

    def _load(self, src: Path) -> int:
        """Worker: lazy load; dequantize an MLX-quantized input; cast when asked."""
        import mlx.core as mx
        from mlx.utils import tree_map_with_path
        from mlx_lm.utils import dequantize_model, load

        model, tokenizer, config = load(
            str(src), model_config=fix_config(read_config(src)), return_config=True, lazy=True
        )
        if "quantization" in config or "quantization_config" in config:
            if "quantization" in config:
                model = dequantize_model(model)
            config.pop("quantization", None)
            config.pop("quantization_config", None)
        if self.cfg.dtype:
            dtype = getattr(mx, self.cfg.dtype)
            cast = getattr(model, "cast_predicate", lambda _: True)
            model.update(
                tree_map_with_path(
                    lambda k, v: (
                        v.astype(dtype) if cast(k) and mx.issubdtype(v.dtype, mx.floating) else v
                    ),
                    model.parameters(),
                )
            )
            config["torch_dtype"] = self.cfg.dtype
        self.state.update(model=model, tokenizer=tokenizer, config=config)
        return len(getattr(model, "layers", []) or [])

    def _quantize(self):
        """Worker: replace the layers by quantized ones (lazy: evaluated layer by layer after;
        the default recipe then searches each layer's scales from its float weights)."""
        from mlx.utils import tree_flatten
        from mlx_lm.convert import mixed_quant_predicate_builder
        from mlx_lm.utils import quantize_model

        from mlxbackend.quantize import recipe

        cfg, model = self.cfg, self.state["model"]
        predicate, originals = None, None
        if cfg.recipe == "k_m":
            predicate = recipe.k_m_predicate(model, cfg.group_size)
            originals = dict(tree_flatten(model.parameters()))  # lazy: read when searched
        elif cfg.recipe:
            predicate = mixed_quant_predicate_builder(cfg.recipe, model, cfg.group_size or 64)
        model, config = quantize_model(
            model,
            self.state["config"],
            cfg.group_size,
            cfg.bits,
            mode=cfg.mode,
            quant_predicate=predicate,
        )
        paths = {id(m): p for p, m in model.named_modules()}
        prefixes = [paths.get(id(layer), "") for layer in getattr(model, "layers", [])]
        self.state.update(model=model, config=config, originals=originals, prefixes=prefixes)

    def _eval_layer(self, i: int):
        import mlx.core as mx

        from mlxbackend.quantize import recipe

        s = self.state
        layer = s["model"].layers[i]
        if s.get("originals") is not None:
            recipe.search_quantized_layers(
                layer, s["originals"], s["prefixes"][i], s.get("importance")
            )
        mx.eval(layer.parameters())

    def _eval_all(self):
        import mlx.core as mx

        from mlxbackend.quantize import recipe

        s = self.state
        if s.get("originals") is not None:  # embeddings, output layer
            recipe.search_quantized_layers(s["model"], s["originals"], "", s.get("importance"))
            s["originals"] = s["importance"] = None
        mx.eval(s["model"].parameters())

    def _save(self, src: Path, dst: Path):
        from mlx_lm.utils import save

        s = self.state
        save(dst, src, s["model"], s["tokenizer"], s["config"], donate_model=True)
        self.state.clear()

    def _place(self, staged: Path):
        """Thread: rename the finished output to its final name (an MLX folder also gets its
        LocalAI config `<output_dir>/<name>.yaml`, backend mlx)."""

        self.check()
        if staged.is_file():
            place_file(staged, self.final)
            return
        place_folder(
            staged, self.final
        )  # an existing output is replaced only once this one is complete
        write_yaml(self.final, self.cfg.opt("name") or self.final.name, model=str(self.final))

    # -- metrics ---------------------------------------------------------------------------

    async def _metrics(self, src: Path, base_bytes: int, staged: Path) -> dict:
        out_bytes = await asyncio.to_thread(weight_bytes, staged)
        metrics = {
            "file_size_mb": round(out_bytes / 2**20, 3),
            "compression_ratio": round(base_bytes / out_bytes, 4) if out_bytes else 0.0,
        }
        if self.cfg.recipe == "k_m":  # which way mlx-q4 ran: 1 = data-aware (imatrix)
            metrics["imatrix"] = 1.0 if self.cfg.imatrix else 0.0
            metrics.update(self.recipe_metrics)
        text_file = self.cfg.opt("perplexity_text")
        if text_file:
            self.report("quantizing", 90, "measuring perplexity")
            text = Path(text_file).read_text(errors="replace")
            metrics["perplexity_base"] = round(
                await self.worker.run(perplexity.base_perplexity, src, text), 4
            )
            if self.cfg.family == "mlx":
                ppl = await self.worker.run(perplexity.mlx_perplexity, staged, text)
            else:
                ppl = await asyncio.to_thread(perplexity.gguf_perplexity, staged, text)
            metrics["perplexity"] = round(ppl, 4)
        return metrics


def describe(cfg: QuantConfig) -> str:
    kind = "one GGUF file" if cfg.family == "gguf" else "an MLX model folder"
    return f"{cfg.qtype} of {base_name(cfg.model)} into {kind}: {output_path(cfg)}"
