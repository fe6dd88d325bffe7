"""One fine-tuning run, advanced on the MLX worker one optimizer step at a time.

The step is mlx-lm's compiled training step (value_and_grad of the loss, gradient accumulation,
optimizer update), built from mlx-lm's pieces instead of its blocking `train()` so that the
server can interleave inference, stop within a step, report every step, and checkpoint the
optimizer and data position for an exact resume (field notes §6)."""

import math
import time
from functools import partial
from pathlib import Path

from mlxbackend.errors import InvalidInput, status_of
from mlxbackend.text.models import load_model_dir
from mlxbackend.train import checkpoints, data
from mlxbackend.train.batches import BatchPlan
from mlxbackend.train.config import FineTuneConfig


def adapt_model(model, cfg: FineTuneConfig) -> dict:
    """Freeze the base and add LoRA/DoRA layers, or unfreeze blocks for full fine-tuning.
    Returns the adapter_config.json that mlx-lm's load_adapters reads back."""
    from mlx_lm.tuner.utils import linear_to_lora_layers

    layers = len(model.layers)
    num_layers = cfg.opt("num_layers")
    num_layers = layers if num_layers < 0 else min(num_layers, layers)
    params = {
        "rank": cfg.rank,
        "scale": cfg.alpha / cfg.rank,
        "dropout": cfg.dropout,
        "keys": target_keys(model, cfg.target_modules),
    }
    model.freeze()
    if cfg.training_type == "full":
        if _is_quantized(model):
            raise InvalidInput(
                "full fine-tuning needs an unquantized model; use lora/dora (QLoRA) on a quantized one"
            )
        for block in model.layers[layers - num_layers :]:
            block.unfreeze()
    else:
        linear_to_lora_layers(model, num_layers, params, use_dora=cfg.training_type == "dora")
    return {
        "fine_tune_type": cfg.training_type,
        "num_layers": num_layers,
        "lora_parameters": params,
    }


def _is_quantized(model) -> bool:
    import mlx.nn as nn

    return any(isinstance(m, nn.QuantizedLinear) for _, m in model.named_modules())


def target_keys(model, names: list):
    """target_modules (HF names like q_proj, or paths like self_attn.q_proj) → mlx-lm's keys."""
    import mlx.nn as nn

    if not names or [n.lower() for n in names] in (["all-linear"], ["all_linear"], ["all"]):
        return None
    linear = (nn.Linear, nn.QuantizedLinear)
    available = [k for k, m in model.layers[0].named_modules() if isinstance(m, linear)]
    keys = []
    for name in names:
        hits = [k for k in available if k == name or k.rsplit(".", 1)[-1] == name]
        if not hits:
            raise InvalidInput(
                f"target_modules: no layer named {name!r}; this model has: {', '.join(available)}"
            )
        keys.extend(hits)
    return sorted(set(keys))


def make_optimizer(cfg: FineTuneConfig, total_steps: int):
    """The MLX optimizer with warmup + the chosen decay (mlx-lm's build_schedule)."""
    import mlx.optimizers as optim
    from mlx_lm.tuner.utils import build_schedule

    lr = cfg.learning_rate
    decay_steps = max(total_steps - cfg.warmup_steps, 1)
    schedule = {
        "linear": {"name": "linear_schedule", "arguments": [lr, 0.0, decay_steps]},
        "cosine": {"name": "cosine_decay", "arguments": [lr, decay_steps, 0.0]},
        "constant": {"name": "linear_schedule", "arguments": [lr, lr, 1]},
    }[cfg.opt("lr_schedule")]
    rate = build_schedule(dict(schedule, warmup=cfg.warmup_steps))
    wd = cfg.weight_decay
    if cfg.optimizer == "adamw":
        return optim.AdamW(learning_rate=rate, weight_decay=wd)
    if cfg.optimizer == "adam":
        return optim.Adam(learning_rate=rate)
    if cfg.optimizer == "sgd":
        return optim.SGD(learning_rate=rate, momentum=cfg.opt("momentum"), weight_decay=wd)
    if cfg.optimizer == "adafactor":
        return optim.Adafactor(learning_rate=rate, relative_step=False, scale_parameter=False)
    if cfg.optimizer == "lion":
        return optim.Lion(learning_rate=rate, weight_decay=wd)
    return optim.Muon(learning_rate=rate, weight_decay=wd)


def compiled_step(model, optimizer, loss_fn, grad_accum: int, max_grad_norm: float):
    """mlx-lm's training step (tuner/trainer.py) plus the gradient norm at each update."""
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    from mlx.utils import tree_flatten, tree_map

    value_and_grad = nn.value_and_grad(model, loss_fn)
    state = [model.state, optimizer.state, mx.random.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(batch, prev_grad, do_update):
        (lvalue, toks), grad = value_and_grad(model, *batch)
        if prev_grad is not None:
            grad = tree_map(lambda x, y: x + y, grad, prev_grad)
        norm = None
        if do_update:
            if grad_accum > 1:
                grad = tree_map(lambda x: x / grad_accum, grad)
            if max_grad_norm > 0:
                grad, norm = optim.clip_grad_norm(grad, max_grad_norm)
            else:
                norm = mx.sqrt(
                    sum(mx.sum(g.astype(mx.float32) ** 2) for _, g in tree_flatten(grad))
                )
            optimizer.update(model, grad)
            grad = None
        return lvalue, toks, grad, norm

    return step, state


def evaluate(model, plan: BatchPlan, loss_fn, num_batches: int) -> float:
    """Mean loss over the first num_batches validation batches (-1: all), as mlx-lm does."""
    import mlx.core as mx

    model.eval()
    total, count = mx.array(0.0), mx.array(0)
    for i, batch in enumerate(plan.all_batches()):
        if num_batches != -1 and i >= num_batches:
            break
        loss, toks = loss_fn(model, *batch)
        total += loss * toks
        count += toks
        mx.eval(total, count)
    model.train()
    return (total / mx.maximum(count, 1)).item()


class TrainRun:
    """A worker stepper: each step() advances one phase or one optimizer step."""

    def __init__(
        self,
        cfg: FineTuneConfig,
        publish,
        base_dir: Path,
        train_split,
        valid_split,
        fmt: str,
        resume: Path | None,
    ):
        self.cfg = cfg
        self.publish = publish  # publish(**fields): snapshot update (status, step, loss, …)
        self.base_dir = base_dir
        self.train_split, self.valid_split, self.fmt = train_split, valid_split, fmt
        self.resume = resume
        self.stop_request = None  # None, or save_checkpoint: bool
        self.phases = self._phases()

    def request_stop(self, save_checkpoint: bool):
        self.stop_request = bool(save_checkpoint)

    def step(self) -> bool:
        try:
            next(self.phases)
            return True
        except StopIteration:
            return False
        except BaseException as exc:  # noqa: BLE001 — every failure ends the job as `failed`
            self.publish(status="failed", message=status_of(exc)[1])
            self.phases = iter(())
            return False

    def abort(self, exc: BaseException | None = None):
        """Worker shutdown (SIGTERM / Free): stop now, keeping a checkpoint."""
        if self.stop_request is None:
            self.stop_request = True
        while self.step():
            pass

    # -- phases -------------------------------------------------------------------------

    def _phases(self):
        import mlx.core as mx

        from mlxbackend.train.losses import loss_for, reference_logps

        cfg = self.cfg
        out = Path(cfg.output_dir)
        self.publish(status="loading_model", message=f"loading {self.base_dir}")
        yield
        mx.random.seed(cfg.seed)
        model, tokenizer, _ = load_model_dir(self.base_dir)
        if cfg.precision:
            model.set_dtype(getattr(mx, cfg.precision))
        adapter_config = adapt_model(model, cfg)
        adapter_config.update(
            model=str(self.base_dir), base_model_name_or_path=cfg.model, training_method=cfg.method
        )
        if self._stopped_early():
            return
        yield

        self.publish(status="loading_dataset", message=f"tokenizing {self.train_split.source}")
        yield
        preference = cfg.method in ("dpo", "orpo")
        mask = cfg.opt("mask_prompt")
        keys = {
            k: cfg.opt(k)
            for k in ("text_feature", "prompt_feature", "completion_feature", "chat_feature")
        }

        def tokenize(split):
            if preference:
                return data.tokenize_preference(split, tokenizer)
            return data.tokenize_sft(split, tokenizer, self.fmt, mask_prompt=mask, keys=keys)

        examples = tokenize(self.train_split)
        batch_size = min(cfg.batch_size, len(examples))
        plan = BatchPlan(
            examples, batch_size, cfg.opt("max_seq_length"), cfg.seed, preference=preference
        )
        valid = None
        if self.valid_split is not None and len(self.valid_split.rows) >= 1:
            v_examples = tokenize(self.valid_split)
            valid = BatchPlan(
                v_examples,
                min(batch_size, len(v_examples)),
                cfg.opt("max_seq_length"),
                cfg.seed,
                preference=preference,
            )
        per_epoch = len(plan) / cfg.grad_accum
        total = cfg.max_steps or max(1, math.ceil(cfg.epochs * per_epoch))
        notes = list(cfg.notes)
        if batch_size < cfg.batch_size:
            notes.append(
                f"batch_size lowered to {batch_size}: the dataset has {len(examples)} rows"
            )
        self.publish(
            total_steps=total,
            total_epochs=float(total / per_epoch) if cfg.max_steps else float(cfg.epochs),
        )
        if self._stopped_early():
            return
        yield

        loss_fn = loss_for(cfg.method, cfg.opt("beta"))
        if cfg.method == "dpo":
            self.publish(status="caching", message="computing reference log-probabilities")
            yield
            model.eval()
            plan.reference = reference_logps(model, plan)
            if valid is not None:
                valid.reference = reference_logps(model, valid)
            yield

        optimizer = make_optimizer(cfg, total)
        optimizer.init(model.trainable_parameters())
        start, history = 0, []
        if self.resume is not None:
            start, history = self._restore(model, optimizer, self.resume)
        if cfg.grad_checkpoint:
            from mlx_lm.tuner.trainer import grad_checkpoint

            grad_checkpoint(model.layers[0])
        step_fn, state = compiled_step(
            model, optimizer, loss_fn, cfg.grad_accum, cfg.opt("max_grad_norm")
        )
        model.train()
        resumed = f" (resumed from {self.resume.name} at step {start})" if self.resume else ""
        started = "Training started" + resumed + ("; " + "; ".join(notes) if notes else "")
        self.publish(
            status="training",
            message=started,
            current_step=start,
            progress_percent=100.0 * start / total,
        )
        yield

        trainable = self._trainable
        mx.reset_peak_memory()
        train_time, trained_tokens, last = 0.0, 0, {}
        eval_every = cfg.opt("eval_steps")
        toc = None  # end of the previous step: step time includes everything between steps
        for step in range(start + 1, total + 1):
            if self.stop_request is not None:
                break
            tic = toc or time.perf_counter()
            mx.random.seed(
                cfg.seed * 1_000_003 + step
            )  # dropout noise is a function of the step: exact resume
            grad, losses, ntoks = None, 0.0, 0
            for j in range(cfg.grad_accum):
                batch = plan.batch((step - 1) * cfg.grad_accum + j)
                lvalue, toks, grad, norm = step_fn(batch, grad, j == cfg.grad_accum - 1)
                losses += lvalue
                ntoks += toks
            mx.eval(state, losses, ntoks, norm)
            toc = time.perf_counter()
            elapsed = toc - tic
            train_time += elapsed
            ntoks = ntoks.item()
            trained_tokens += ntoks
            loss = losses.item() / cfg.grad_accum
            done = step - start
            last = dict(
                status="training",
                current_step=step,
                current_epoch=step * cfg.grad_accum / len(plan),
                loss=loss,
                learning_rate=optimizer.learning_rate.item(),
                grad_norm=norm.item(),
                progress_percent=100.0 * step / total,
                eta_seconds=train_time / done * (total - step),
                extra_metrics={
                    "tokens_per_second": ntoks / elapsed,
                    "trained_tokens": float(trained_tokens),
                    "train_tokens_per_second": trained_tokens / train_time,
                    "peak_memory_mb": mx.get_peak_memory() / 2**20,
                    "step_seconds": elapsed,
                },
            )
            history.append({"step": step, "loss": loss})
            evaluate_now = valid is not None and (
                (eval_every and step % eval_every == 0)
                or step == total
                or (not eval_every and cfg.save_steps and step % cfg.save_steps == 0)
            )
            if evaluate_now:
                last["eval_loss"] = evaluate(model, valid, loss_fn, cfg.opt("val_batches"))
                history[-1]["eval_loss"] = last["eval_loss"]
            self.publish(**last)
            if cfg.save_steps and step % cfg.save_steps == 0 and step < total:
                path = self._checkpoint(
                    model, optimizer, adapter_config, step, last, history, len(plan)
                )
                self.publish(
                    status="saving", checkpoint_path=str(path), message=f"checkpoint saved: {path}"
                )
                self.publish(status="training", message=started)
            if evaluate_now or cfg.save_steps and step % cfg.save_steps == 0:
                toc = None  # evaluation and checkpoint time is not training time
            yield
        step = last.get("current_step", start)
        if self.stop_request is not None:
            if self.stop_request:
                self.publish(status="saving", message="saving a checkpoint before stopping")
                path = self._checkpoint(
                    model, optimizer, adapter_config, step, last, history, len(plan)
                )
                checkpoints.save_final(
                    out, trainable(model), adapter_config, self._trainer_state(step, last, history)
                )
                self.publish(
                    status="stopped",
                    checkpoint_path=str(path),
                    message=f"stopped at step {step}; checkpoint {path}",
                )
            else:
                self.publish(
                    status="stopped", message=f"stopped at step {step} (no checkpoint saved)"
                )
            return
        self.publish(status="saving", message="saving the final adapter")
        yield
        path = self._checkpoint(model, optimizer, adapter_config, step, last, history, len(plan))
        checkpoints.save_final(
            out, trainable(model), adapter_config, self._trainer_state(step, last, history)
        )
        self.publish(
            status="completed",
            progress_percent=100.0,
            eta_seconds=0.0,
            checkpoint_path=str(path),
            message=f"Training completed: adapter in {out}",
        )

    def _stopped_early(self) -> bool:
        if self.stop_request is None:
            return False
        self.publish(status="stopped", message="stopped before training started")
        return True

    @staticmethod
    def _trainable(model) -> dict:
        from mlx.utils import tree_flatten

        return dict(tree_flatten(model.trainable_parameters()))

    def _trainer_state(self, step: int, last: dict, history: list) -> dict:
        return {
            "step": step,
            "epoch": last.get("current_epoch", 0.0),
            "loss": last.get("loss", 0.0),
            "learning_rate": last.get("learning_rate", 0.0),
            "eval_loss": last.get("eval_loss"),
            "job_id": self.cfg.job_id,
            "base_model": self.cfg.model,
            "base_model_dir": str(self.base_dir),
            "config": self.cfg.to_dict(),
            "history": history[-1000:],
        }

    def _checkpoint(self, model, optimizer, adapter_config, step, last, history, per_epoch) -> Path:
        from mlx.utils import tree_flatten

        opt_state = dict(tree_flatten(optimizer.state))
        return checkpoints.save_checkpoint(
            Path(self.cfg.output_dir),
            step,
            self._trainable(model),
            opt_state,
            adapter_config,
            self._trainer_state(step, last, history),
        )

    def _restore(self, model, optimizer, folder: Path) -> tuple:
        """Adapter weights, optimizer state (moments, step → schedule) and RNG from a checkpoint."""
        import mlx.core as mx
        from mlx.utils import tree_unflatten

        state = checkpoints.read_state(folder)
        weights = mx.load(str(folder / checkpoints.ADAPTER_FILE))
        expected = self._trainable(model)
        wrong = [k for k, v in weights.items() if k not in expected or expected[k].shape != v.shape]
        if wrong or len(weights) != len(expected):
            raise InvalidInput(
                f"checkpoint {folder} does not match this model/adapter configuration "
                f"({len(wrong)} mismatched tensors, e.g. {wrong[:3]})"
            )
        model.load_weights(list(weights.items()), strict=False)
        opt_state = mx.load(str(folder / checkpoints.OPTIMIZER_FILE))
        optimizer.state = tree_unflatten(list(opt_state.items()))
        mx.eval(model.parameters(), optimizer.state)
        return int(state["step"]), list(state.get("history", []))
