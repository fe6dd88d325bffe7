"""Data-aware MLX quantization (mlx-awq, mlx-gptq, mlx-dwq, mlx-dynamic) on LOCAL calibration text.

mlx-lm's own CLIs (`mlx_lm.awq`, `.gptq`, `.dynamic_quant`, `.dwq`) fetch their calibration data
(a gist text file, a Hugging Face dataset); this module never downloads anything: the request
names a local text file (extra_options `calibration_text`), which is tokenized with the model's
tokenizer and cut into `[N, L]` blocks of token ids (non-overlapping, a seeded random choice, as
`mlx_lm.quant.utils.load_data` does), then handed to mlx-lm's functions:

    mlx-awq      awq_quantize(model, data, AWQ_MODEL_CONFIGS[model_type], …) + update_config
                 (per-layer `quantization` entries in config.json, as `mlx_lm.awq` saves them);
                 architectures: those in AWQ_MODEL_CONFIGS (llama, mistral, qwen2/3, gemma3, …)
    mlx-gptq     gptq_quantize(model, data, bits, group, fallback bits, group); bits 2, 4 or 8;
                 the non-Linear layers (embeddings) get `embed_bits` (default 6, as mlx-lm)
    mlx-dwq      the model quantized with quantize_model (the student) then distilled from the
                 float model (the teacher) with dwq_quantize: one pass over the N blocks, batch
                 4, Adam at `learning_rate` (default 1e-6, mlx-lm's); the student is saved
    mlx-dynamic  estimate_sensitivities + estimate_threshold (a target bits-per-weight) +
                 quantize_model(quant_predicate=…): sensitive layers get `high_bits`

mlx-q4 given `calibration_text` uses the same blocks (calibration_settings, calibration_blocks)
for its activation statistics (llama.cpp's imatrix, see `quantize.recipe` and run.py).

Progress and stop: mlx-lm's functions loop internally; their only hook is `tqdm`, which this
module replaces (inside the four mlx_lm.quant modules, for the duration of one call) by a
progress bar that publishes progress, checks the stop flag (raising `Stopped` inside the loop)
and ends the worker task's step (`worker.pause()`). So progress and stop are per AWQ transformer block,
per GPTQ Hessian batch / quantized layer, per DWQ training batch, per sensitivity batch; the
steps without a loop hook (GPTQ's Cholesky per layer, estimate_threshold's binary search of
deep copies, the final quantize_model) run to their end before a stop is seen.

The whole method is ONE task on the MLX worker thread (MLX arrays must stay on that thread);
each loop iteration is one step of it (worker.py's rule), so other requests on the backend keep
progressing, more slowly, while a job runs. The replaced `tqdm` is one dispatcher installed for
good; it finds the running job's hook in a context variable (each worker task has its own), so
two jobs whose steps interleave never see each other's bars."""

import contextlib
import contextvars
from pathlib import Path

from mlxbackend.errors import InvalidInput, NotFound
from mlxbackend.worker import pause

METHODS = ("awq", "gptq", "dwq", "dynamic")
TEXT_OPTION = "calibration_text"
QUANT_BITS = (2, 3, 4, 5, 6, 8)
DEFAULTS = {"bits": 4, "calibration_samples": 32, "calibration_seq_len": 256, "seed": 123}
MIN_SAMPLES = 4  # DWQ's batch; fewer blocks make poor statistics anyway
MIN_SEQ_LEN = 32
MIN_TOKENS = MIN_SAMPLES * MIN_SEQ_LEN
OPTIONS = (
    TEXT_OPTION,
    "calibration_samples",
    "calibration_seq_len",
    "bits",
    "seed",
    "embed_bits",
    "embed_group_size",
    "high_bits",
    "target_bpw",
    "learning_rate",
)


def _int(options: dict, key: str, default=None, low: int = 1):
    raw = options.get(key)
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise InvalidInput(f"extra_options {key} must be an integer, got {raw!r}") from None
    if value < low:
        raise InvalidInput(f"extra_options {key} must be >= {low}, got {value}")
    return value


def _float(options: dict, key: str, default=None):
    raw = options.get(key)
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise InvalidInput(f"extra_options {key} must be a number, got {raw!r}") from None
    if not value > 0:
        raise InvalidInput(f"extra_options {key} must be > 0, got {raw!r}")
    return value


def calibration_settings(method: str, options: dict) -> dict:
    """The calibration text's validated settings: method, text (absolute path), samples,
    seq_len, seed (InvalidInput / NotFound; the file is only stat'ed)."""
    text = options.get(TEXT_OPTION, "")
    if not text:
        raise InvalidInput(
            f"mlx-{method} is data-aware: it needs local calibration text, extra_options "
            f"{TEXT_OPTION}=<path of a text file> (tokenized with the model's tokenizer into "
            f"calibration_samples x calibration_seq_len blocks). Nothing is downloaded: mlx-lm's "
            f"own CLIs would fetch a calibration set from the network, this backend does not"
        )
    path = Path(text).expanduser()
    if not path.exists():
        raise NotFound(f"extra_options {TEXT_OPTION}: {text!r} not found")
    if not path.is_file():
        raise InvalidInput(f"extra_options {TEXT_OPTION}: {text!r} is not a file")
    size = path.stat().st_size
    if size < MIN_TOKENS - 1:  # a token covers at least one byte (+ BOS)
        raise InvalidInput(
            f"extra_options {TEXT_OPTION}: {text!r} is too short ({size} bytes): at least "
            f"{MIN_TOKENS} tokens ({MIN_SAMPLES} blocks of {MIN_SEQ_LEN}) are needed"
        )
    return {
        "method": method,
        "text": str(path.absolute()),
        "samples": _int(options, "calibration_samples", DEFAULTS["calibration_samples"]),
        "seq_len": _int(
            options, "calibration_seq_len", DEFAULTS["calibration_seq_len"], low=MIN_SEQ_LEN
        ),
        "seed": _int(options, "seed", DEFAULTS["seed"], low=0),
    }


def settings(method: str, options: dict) -> dict:
    """The method's validated settings (InvalidInput / NotFound; the file is only stat'ed)."""
    s = calibration_settings(method, options)
    bits = _int(options, "bits", DEFAULTS["bits"])
    allowed = (2, 4, 8) if method == "gptq" else QUANT_BITS
    if bits not in allowed:
        raise InvalidInput(f"mlx-{method}: bits must be one of {allowed}, got {bits}")
    s.update(
        {
            "bits": bits,
            "embed_bits": _int(options, "embed_bits", {"awq": 4, "gptq": 6}.get(method)),
            "embed_group_size": _int(options, "embed_group_size"),
            "learning_rate": _float(options, "learning_rate", 1e-6),
            "target_bpw": _float(options, "target_bpw"),
        }
    )
    if s["embed_bits"] is not None and s["embed_bits"] not in QUANT_BITS:
        raise InvalidInput(
            f"extra_options embed_bits must be one of {QUANT_BITS}, got {s['embed_bits']}"
        )
    if method == "dynamic":
        higher = [b for b in QUANT_BITS if b > bits]
        high = _int(options, "high_bits", higher[0] if higher else None)
        if high is None or high not in QUANT_BITS or high <= bits:
            raise InvalidInput(
                f"mlx-dynamic: high_bits must be one of {QUANT_BITS} above bits={bits}"
            )
        s["high_bits"] = high
    return s


# -- calibration data (worker) --------------------------------------------------------------


def calibration_blocks(tokenizer, s: dict):
    """[N, L] token ids from the text file: N and L clamped to what the text provides (at
    least MIN_SAMPLES blocks of MIN_SEQ_LEN); InvalidInput saying how many tokens are needed."""
    import mlx.core as mx
    import numpy as np

    want_n, want_l = s["samples"], s["seq_len"]
    limit = max(1 << 20, want_n * want_l * 32)  # ~8x the tokens asked for: enough choice
    with open(s["text"], "rb") as f:
        text = f.read(limit).decode("utf-8", errors="replace")
    ids = tokenizer.encode(text)
    total = len(ids)
    n = max(MIN_SAMPLES, min(want_n, total // want_l))
    seq = min(want_l, total // n)
    if seq < MIN_SEQ_LEN:
        raise InvalidInput(
            f"calibration text {s['text']!r} gives {total} tokens with this model's tokenizer; at least "
            f"{MIN_TOKENS} are needed ({MIN_SAMPLES} blocks of {MIN_SEQ_LEN}), and "
            f"{want_n * want_l} for calibration_samples={want_n} x calibration_seq_len={want_l}"
        )
    chunks = np.asarray(ids[: (total // seq) * seq], dtype=np.int32).reshape(-1, seq)
    order = np.random.RandomState(s["seed"]).permutation(len(chunks))[:n]
    return mx.array(chunks[np.sort(order)])


# -- progress / stop / fairness hook -----------------------------------------------------------


class Hook:
    """Stands in for `tqdm` in mlx_lm.quant's modules. `phases` maps a bar's desc (None: any
    other) to the (start, end) fraction of the method it covers; `progress(fraction, text)`
    publishes (and raises Stopped once a stop was asked for)."""

    MODULES = (
        "mlx_lm.quant.awq",
        "mlx_lm.quant.gptq",
        "mlx_lm.quant.dwq",
        "mlx_lm.quant.dynamic_quant",
    )

    def __init__(self, progress, phases: dict):
        self.progress = progress
        self.phases = phases
        self.notes: list = []

    def tqdm_class(self):
        hook = self

        class Bar:
            def __init__(self, iterable=None, total=None, desc=None, **_kw):
                self.iterable = iterable if iterable is not None else range(total or 0)
                if total is None and hasattr(iterable, "__len__"):
                    total = len(iterable)
                self.total, self.desc = total, desc

            def __iter__(self):
                lo, hi = hook.phases.get(self.desc, hook.phases.get(None, (0.0, 1.0)))
                total = max(1, self.total or 1)
                label = self.desc or "step"
                for i, item in enumerate(self.iterable):
                    hook.progress(
                        lo + (hi - lo) * min(1.0, i / total), f"{label} {i}/{self.total or '?'}"
                    )
                    pause()  # one loop iteration is one step of the worker task
                    yield item
                hook.progress(hi, None)

            def set_description(self, *_a, **_k):
                pass

            def update(self, *_a, **_k):
                pass

            def close(self):
                pass

            @staticmethod
            def write(text, *_a, **_k):
                hook.notes.append(str(text))

        return Bar

    @contextlib.contextmanager
    def installed(self):
        """This hook's bars for mlx_lm.quant's loops in the current task (context)."""
        _install_dispatcher()
        token = CURRENT_BAR.set(self.tqdm_class())
        try:
            yield self
        finally:
            CURRENT_BAR.reset(token)


CURRENT_BAR: contextvars.ContextVar = contextvars.ContextVar("mlxb_quant_bar", default=None)


def _install_dispatcher():
    """Replace `tqdm` in mlx_lm.quant's modules, once, by a function that builds the current
    context's Bar (or a silent pass-through outside a job)."""
    import importlib

    def dispatch(iterable=None, *args, **kwargs):
        bar = CURRENT_BAR.get()
        if bar is None:
            return iterable if iterable is not None else range(kwargs.get("total") or 0)
        return bar(iterable, *args, **kwargs)

    def write(text, *_a, **_k):  # tqdm.write (AWQ's "Loss reduction", DWQ's log lines)
        bar = CURRENT_BAR.get()
        if bar is not None:
            bar.write(text)

    dispatch.write = write

    for name in Hook.MODULES:
        module = importlib.import_module(name)
        if not getattr(module.tqdm, "mlxb_dispatch", False):
            dispatch.mlxb_dispatch = True
            module.tqdm = dispatch


# -- the methods (worker) ------------------------------------------------------------------------

PHASES = {
    "awq": {None: (0.0, 1.0)},
    "gptq": {"Computing Hessians": (0.0, 0.3), "Quantizing": (0.3, 1.0)},
    "dwq": {"Computing validation loss": (0.0, 0.05), None: (0.05, 0.95)},
    "dynamic": {"Estimating sensitivities": (0.0, 0.8)},
}


def _float_dtype(model):
    import mlx.core as mx
    from mlx.utils import tree_flatten

    for _, v in tree_flatten(model.parameters()):
        if mx.issubdtype(v.dtype, mx.floating):
            return v.dtype
    return mx.float32


def _check_groups(model, group_size: int, method: str):
    """AWQ and GPTQ quantize every Linear: each input dimension must split into groups."""
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    dims = sorted(
        {
            m.weight.shape[-1]
            for _, m in tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module)
            if isinstance(m, nn.Linear)
        }
    )
    bad = [d for d in dims if d % group_size]
    if bad:
        ok = [g for g in (32, 64, 128) if all(d % g == 0 for d in dims)]
        raise InvalidInput(
            f"mlx-{method}: group_size {group_size} does not divide the layer input sizes {bad}"
            + (f"; use group_size {ok[0]}" if ok else "")
        )


def quantize(model, config: dict, data, s: dict, group_size: int, progress):
    """Worker: run the method on the (float, evaluated) model; returns (model, config) ready
    for mlx_lm.utils.save. `progress(fraction, message)` may raise Stopped."""
    import copy

    import mlx.core as mx

    method, bits = s["method"], s["bits"]
    hook = Hook(progress, PHASES[method])
    mx.random.seed(s["seed"])
    with hook.installed():
        if method == "awq":
            from mlx_lm.quant.awq import AWQ_MODEL_CONFIGS, awq_quantize, update_config

            awq_config = AWQ_MODEL_CONFIGS.get(config.get("model_type"))
            if awq_config is None:
                raise InvalidInput(
                    f"mlx-awq does not support model_type {config.get('model_type')!r}; mlx-lm's "
                    f"AWQ knows {', '.join(sorted(AWQ_MODEL_CONFIGS))} (mlx-gptq, mlx-dwq and "
                    f"mlx-dynamic work with any architecture)"
                )
            _check_groups(model, group_size, method)
            awq_quantize(
                model,
                data,
                awq_config,
                group_size=group_size,
                bits=bits,
                embed_group_size=s["embed_group_size"] or 32,
                embed_bits=s["embed_bits"],
            )
            config = update_config(model, config)
        elif method == "gptq":
            from mlx_lm.quant.gptq import gptq_quantize

            _check_groups(model, group_size, method)
            model, config["quantization"] = gptq_quantize(
                model, data, bits, group_size, s["embed_bits"], s["embed_group_size"] or group_size
            )
        elif method == "dwq":
            import mlx.optimizers as optimizers
            from mlx_lm.quant.dwq import dwq_quantize
            from mlx_lm.utils import quantize_model

            dtype = _float_dtype(model)
            teacher = model
            student = copy.deepcopy(model)
            student, config = quantize_model(student, config, group_size, bits)
            progress(0.0, "distilling the quantized model from the float one")
            blocks = [(row, 0) for row in data.tolist()]
            batch = min(4, len(blocks))
            opt = optimizers.Adam(learning_rate=s["learning_rate"], bias_correction=True)
            dwq_quantize(
                student,
                lambda x, _i, split: teacher(x),
                opt,
                blocks,
                blocks[:batch],
                batch_size=batch,
                max_seq_length=data.shape[1],
                seed=s["seed"],
                dtype=dtype,
            )
            student.eval()
            model = student
            del teacher
        else:  # dynamic
            from mlx_lm.quant.dynamic_quant import estimate_sensitivities, estimate_threshold
            from mlx_lm.utils import quantize_model

            high = s["high_bits"]
            sens = dict(estimate_sensitivities(model, data, bits, group_size, high, group_size))
            progress(0.8, "searching the sensitivity threshold")
            target = s["target_bpw"] or (bits + high) / 2 + 32 / group_size
            threshold = estimate_threshold(model, sens, target, bits, group_size, high, group_size)
            progress(0.9, "quantizing")

            def predicate(path, module):
                if not hasattr(module, "to_quantized"):
                    return False
                if sens.get(path, float("-inf")) > threshold:
                    return {"bits": high, "group_size": group_size}
                return True

            model, config = quantize_model(
                model, config, group_size, bits, quant_predicate=predicate
            )
    mx.eval(model.parameters())
    progress(1.0, None)
    return model, config
