"""A fine-tuning request as plain, validated values (proto defaults applied, extra_options typed)."""

import os
import uuid
from dataclasses import asdict, dataclass, field

from mlxbackend.errors import InvalidInput
from mlxbackend.options import parse_value

TYPES = ("lora", "dora", "full")  # QLoRA = lora/dora on a quantized base
METHODS = ("sft", "dpo", "orpo")
NOT_SUPPORTED_METHODS = ("grpo", "rloo", "reward", "kto", "network_training")
OPTIMIZERS = ("adamw", "adam", "sgd", "adafactor", "lion", "muon")
# Names LocalAI's UI (or TRL habits) send that map onto an MLX optimizer.
OPTIMIZER_ALIASES = {
    "": "adamw",
    "adamw_torch": "adamw",
    "adamw_hf": "adamw",
    "adamw_torch_fused": "adamw",
    "adamw_8bit": "adamw",
    "paged_adamw_8bit": "adamw",
    "paged_adamw_32bit": "adamw",
    "adamw_bnb_8bit": "adamw",
}
SCHEDULES = ("linear", "cosine", "constant")
PRECISIONS = {"": None, "no": None, "fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}

# extra_options keys this backend reads, with their types and defaults (README documents them).
EXTRA_OPTIONS = {
    "mask_prompt": False,  # train only on completions / the last assistant turn
    "max_seq_length": 2048,  # longer rows are truncated
    "lr_schedule": "linear",  # linear | cosine | constant (after warmup)
    "eval_steps": 0,  # evaluate on the validation split every N steps (0: at save points and the end)
    "val_batches": 25,  # validation batches per evaluation (-1: the whole split)
    "validation_split": "",  # name of the validation split (default: valid/validation/val if present)
    "num_layers": -1,  # adapt only the last N transformer blocks (-1: all)
    "max_grad_norm": 0.0,  # clip gradients to this global norm (0: no clipping; the norm is reported)
    "beta": 0.1,  # DPO temperature / ORPO odds-ratio weight
    "model_path": "",  # folder that relative model names are looked up in
    "text_feature": "text",
    "prompt_feature": "prompt",
    "completion_feature": "completion",
    "chat_feature": "messages",
    "momentum": 0.0,  # sgd
}


@dataclass
class FineTuneConfig:
    job_id: str
    model: str
    dataset: str
    output_dir: str
    training_type: str = "lora"
    method: str = "sft"
    rank: int = 16
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list = field(default_factory=list)
    learning_rate: float = 2e-4
    epochs: int = 3
    batch_size: int = 2
    grad_accum: int = 4
    warmup_steps: int = 5
    max_steps: int = 0
    save_steps: int = 0
    weight_decay: float = 0.01
    grad_checkpoint: bool = False
    optimizer: str = "adamw"
    seed: int = 3407
    precision: str | None = None  # an mlx dtype name for the frozen weights, None = as loaded
    split: str = "train"
    resume_from: str = ""
    options: dict = field(default_factory=dict)  # EXTRA_OPTIONS, typed
    notes: list = field(default_factory=list)  # substitutions worth telling the user

    def opt(self, key: str):
        return self.options.get(key, EXTRA_OPTIONS[key])

    def to_dict(self) -> dict:
        return asdict(self)


def typed_extras(extra: dict) -> dict:
    options = {}
    for key, raw in extra.items():
        if key in EXTRA_OPTIONS:
            default = EXTRA_OPTIONS[key]
            value = parse_value(raw)
            if isinstance(default, bool):
                value = str(raw).strip().lower() in ("1", "true", "yes", "on")
            elif isinstance(default, float) and isinstance(value, int):
                value = float(value)
            elif isinstance(default, str):
                value = str(raw).strip()
            if type(value) is not type(default):
                raise InvalidInput(
                    f"extra_options[{key!r}]={raw!r}: expected {type(default).__name__}"
                )
            options[key] = value
    return options


def fine_tune_config(
    *,
    model,
    training_type,
    training_method,
    adapter_rank,
    adapter_alpha,
    adapter_dropout,
    target_modules,
    learning_rate,
    num_epochs,
    batch_size,
    gradient_accumulation_steps,
    warmup_steps,
    max_steps,
    save_steps,
    weight_decay,
    gradient_checkpointing,
    optimizer,
    seed,
    mixed_precision,
    dataset_source,
    dataset_split,
    output_dir,
    job_id,
    resume_from_checkpoint,
    extra_options,
) -> FineTuneConfig:
    """Validate a FineTuneRequest's fields (zeros mean the proto defaults)."""
    if not model:
        raise InvalidInput("model is required (a model folder, a .gguf file or a Hugging Face id)")
    if not dataset_source:
        raise InvalidInput(
            "dataset_source is required (a jsonl/json/parquet/csv file, a folder, or a HF dataset id)"
        )
    kind = (training_type or "lora").lower()
    if kind == "qlora":
        kind = "lora"
    if kind not in TYPES:
        raise InvalidInput(
            f"training_type {training_type!r} is not supported; supported: {', '.join(TYPES)} "
            "(lora/dora on a quantized model is QLoRA)"
        )
    method = (training_method or "sft").lower()
    if method not in METHODS:
        hint = (
            " (listed by LocalAI but not implemented by this backend)"
            if method in NOT_SUPPORTED_METHODS
            else ""
        )
        raise InvalidInput(
            f"training_method {training_method!r} is not supported{hint}; supported: {', '.join(METHODS)}"
        )
    notes = []
    opt_name = (optimizer or "").lower()
    if opt_name in OPTIMIZER_ALIASES:
        if opt_name not in ("", "adamw_torch", "adamw_hf"):
            notes.append(f"optimizer {optimizer} is not available in MLX; using adamw")
        opt_name = OPTIMIZER_ALIASES[opt_name]
    if opt_name not in OPTIMIZERS:
        raise InvalidInput(
            f"optimizer {optimizer!r} is not supported; supported: {', '.join(OPTIMIZERS)} "
            f"(and the aliases {', '.join(a for a in OPTIMIZER_ALIASES if a)})"
        )
    precision_name = (mixed_precision or "").lower()
    if precision_name not in PRECISIONS:
        raise InvalidInput(
            f"mixed_precision {mixed_precision!r} is not supported by MLX; supported: "
            f"{', '.join(p for p in PRECISIONS if p)}"
        )
    options = typed_extras(dict(extra_options))
    if options.get("lr_schedule", "linear") not in SCHEDULES:
        raise InvalidInput(f"extra_options lr_schedule must be one of {', '.join(SCHEDULES)}")
    for name, value in (
        ("adapter_rank", adapter_rank),
        ("num_epochs", num_epochs),
        ("batch_size", batch_size),
        ("gradient_accumulation_steps", gradient_accumulation_steps),
        ("max_steps", max_steps),
        ("save_steps", save_steps),
        ("warmup_steps", warmup_steps),
    ):
        if value < 0:
            raise InvalidInput(f"{name} must not be negative (got {value})")
    if learning_rate < 0 or weight_decay < 0 or not 0 <= adapter_dropout < 1:
        raise InvalidInput("learning_rate and weight_decay must be >= 0, adapter_dropout in [0, 1)")
    if not output_dir:
        raise InvalidInput("output_dir is required")
    rank = adapter_rank or 16
    return FineTuneConfig(
        job_id=job_id or str(uuid.uuid4()),
        model=model,
        dataset=dataset_source,
        output_dir=os.path.abspath(output_dir),
        training_type=kind,
        method=method,
        rank=rank,
        alpha=float(adapter_alpha or 16),
        dropout=float(adapter_dropout),
        target_modules=[m for m in target_modules if m],
        learning_rate=float(learning_rate or 2e-4),
        epochs=num_epochs or 3,
        batch_size=batch_size or 2,
        grad_accum=gradient_accumulation_steps or 4,
        warmup_steps=warmup_steps,
        max_steps=max_steps,
        save_steps=save_steps,
        weight_decay=float(weight_decay),
        grad_checkpoint=bool(gradient_checkpointing),
        optimizer=opt_name,
        seed=seed or 3407,
        precision=PRECISIONS[precision_name],
        split=dataset_split or "train",
        resume_from=resume_from_checkpoint,
        options=options,
        notes=notes,
    )
