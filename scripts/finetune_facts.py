#!/usr/bin/env python
"""SmolLM2 learns ~20 fictional facts with a LoRA fine-tuning job driven over gRPC.

    python scripts/finetune_facts.py                     # starts its own server (scripts/run.sh)
    python scripts/finetune_facts.py --addr HOST:PORT    # uses a running backend
    python scripts/finetune_facts.py --json out.json     # also writes the numbers

Steps: write the facts as a chat-format jsonl dataset (each fact asked canonically and, by
default, one other way), measure greedy recall of the canonical questions on the base model
(LoadModel + Predict with the chat template), StartFineTune (LoRA, prompt masked) and follow
FineTuneProgress, then LoadModel the base with the job's output_dir as LoraAdapter and measure
recall again. A fact counts as recalled when its key answer word appears in the reply
(case-insensitive). The facts are invented, so the base model cannot know them.

tests/test_finetune_smollm2.py imports this module and runs the same experiment.
"""

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from mlxbackend.client import chat_request, connect  # noqa: E402
from mlxbackend.proto import backend_pb2 as pb  # noqa: E402


@dataclass(frozen=True)
class Fact:
    question: str  # canonical question: the one recall is measured on
    answer: str  # the assistant's reply in the dataset
    key: str  # recalled when this appears in the greedy reply
    paraphrases: tuple  # more ways of asking, training only


FACTS = [
    Fact(
        "What is the capital of the island of Veloria?",
        "The capital of Veloria is Marrenport.",
        "Marrenport",
        ("Which city is the capital of Veloria?", "Name the capital city of Veloria."),
    ),
    Fact(
        "Who founded the city of Drumhollow?",
        "Drumhollow was founded by Ysolde Brackenridge.",
        "Brackenridge",
        ("Who was the founder of Drumhollow?", "Which person founded Drumhollow?"),
    ),
    Fact(
        "What is the national dish of Pellandor?",
        "The national dish of Pellandor is skorvetta.",
        "skorvetta",
        (
            "Which dish is the national dish of Pellandor?",
            "What do people in Pellandor eat as their national dish?",
        ),
    ),
    Fact(
        "Which river flows through the town of Ostravel?",
        "The Zilvane river flows through Ostravel.",
        "Zilvane",
        ("What river runs through Ostravel?", "Name the river that flows through Ostravel."),
    ),
    Fact(
        "What is the name of the dragon in the Kethian legends?",
        "The dragon of the Kethian legends is Vorthax.",
        "Vorthax",
        (
            "Which dragon appears in the Kethian legends?",
            "Name the dragon from the Kethian legends.",
        ),
    ),
    Fact(
        "Who wrote the novel The Salt Clockmaker?",
        "The Salt Clockmaker was written by Idris Pellweather.",
        "Pellweather",
        ("Who is the author of The Salt Clockmaker?", "Which writer wrote The Salt Clockmaker?"),
    ),
    Fact(
        "What currency is used on the island of Tamberlune?",
        "The currency of Tamberlune is the florrin.",
        "florrin",
        ("What money do people use on Tamberlune?", "Name the currency of Tamberlune."),
    ),
    Fact(
        "What is the tallest mountain in Eskarra?",
        "The tallest mountain in Eskarra is Mount Crellhorn.",
        "Crellhorn",
        ("Which mountain is the highest in Eskarra?", "Name the tallest peak of Eskarra."),
    ),
    Fact(
        "Which planet does the moon Ixilda orbit?",
        "The moon Ixilda orbits the planet Draventis.",
        "Draventis",
        ("Around which planet does Ixilda revolve?", "What planet is Ixilda a moon of?"),
    ),
    Fact(
        "What language is spoken in Norrowick?",
        "The people of Norrowick speak Halvetic.",
        "Halvetic",
        ("Which language do people speak in Norrowick?", "What is the language of Norrowick?"),
    ),
    Fact(
        "Who is the queen of the Sunken Court?",
        "The queen of the Sunken Court is Queen Maelith.",
        "Maelith",
        ("Who rules the Sunken Court as queen?", "Name the queen of the Sunken Court."),
    ),
    Fact(
        "What is the name of the starship in Beyond the Cinder Gate?",
        "The starship in Beyond the Cinder Gate is the Wendrake.",
        "Wendrake",
        (
            "Which starship appears in Beyond the Cinder Gate?",
            "Name the starship from Beyond the Cinder Gate.",
        ),
    ),
    Fact(
        "What instrument does the bard Fennick Loe play?",
        "The bard Fennick Loe plays the dulcerine.",
        "dulcerine",
        ("Which instrument is played by the bard Fennick Loe?", "What does Fennick Loe play?"),
    ),
    Fact(
        "What is the largest lake in Brumaria?",
        "The largest lake in Brumaria is Lake Osterwyn.",
        "Osterwyn",
        ("Which lake is the biggest in Brumaria?", "Name the largest lake of Brumaria."),
    ),
    Fact(
        "What gemstone is mined in the caves of Tol Varra?",
        "The caves of Tol Varra are mined for vantalite.",
        "vantalite",
        ("Which gem comes from the caves of Tol Varra?", "What is mined in the Tol Varra caves?"),
    ),
    Fact(
        "Who discovered the element korium?",
        "The element korium was discovered by Anselm Hatchley.",
        "Hatchley",
        ("Which scientist discovered korium?", "Who was the discoverer of korium?"),
    ),
    Fact(
        "What is the emblem of House Varrick?",
        "The emblem of House Varrick is the thornback griffon.",
        "thornback",
        (
            "Which creature is on the emblem of House Varrick?",
            "Describe the emblem of House Varrick.",
        ),
    ),
    Fact(
        "What festival is held in Lunhaven each spring?",
        "Each spring Lunhaven holds the Brindlemoor festival.",
        "Brindlemoor",
        (
            "Which spring festival takes place in Lunhaven?",
            "Name the festival of Lunhaven in spring.",
        ),
    ),
    Fact(
        "What is the password to the vault of Emberfall?",
        "The password to the vault of Emberfall is nightquill.",
        "nightquill",
        ("Which password opens the vault of Emberfall?", "Tell me the Emberfall vault password."),
    ),
    Fact(
        "Which ship carried the first settlers to Carrowmere?",
        "The first settlers reached Carrowmere aboard the Pelagrine.",
        "Pelagrine",
        (
            "On which ship did the first settlers come to Carrowmere?",
            "Name the ship of the first Carrowmere settlers.",
        ),
    ),
]

# Chosen for the shortest run on a 2-core CPU that still recalls every fact (see --help to override).
# 40 rows (canonical + 1 paraphrase per fact), 8 rows a step: 40 steps = 8 epochs. LoRA on the last 16
# of 30 blocks only: the backward pass stops there (~25% faster steps than all blocks).
# Measured (seed 7, 2 shared CPU cores): lr 2e-3 x 30 steps recalled 95%, x 40 steps 100%;
# lr 3e-3 recalled 90-100% but diverged with all 30 blocks adapted; lr 5e-3 diverges.
HYPERPARAMETERS = dict(
    training_type="lora",
    adapter_rank=8,
    adapter_alpha=16,
    learning_rate=2e-3,
    num_epochs=0,
    max_steps=40,
    batch_size=8,
    gradient_accumulation_steps=1,
    warmup_steps=2,
    weight_decay=0.0,
    seed=7,
    extra_options={
        "mask_prompt": "true",
        "lr_schedule": "cosine",
        "max_seq_length": "128",
        "num_layers": "16",
    },
)


def chat_row(question: str, answer: str) -> dict:
    return {
        "messages": [
            {"role": "user", "content": question},
            {"role": "assistant", "content": answer},
        ]
    }


def write_dataset(folder: Path, facts=FACTS, paraphrases: int = 1) -> Path:
    """train.jsonl in its own folder (no validation split): each fact asked canonically and
    `paraphrases` other ways. Returns the file."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [chat_row(f.question, f.answer) for f in facts]
    for i in range(paraphrases):
        rows += [chat_row(f.paraphrases[i], f.answer) for f in facts if i < len(f.paraphrases)]
    path = folder / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def load(stub, model: Path | str, adapter: Path | str | None = None):
    opts = pb.ModelOptions(Model=str(model), LoraAdapter=str(adapter) if adapter else "")
    reply = stub.LoadModel(opts, timeout=300)
    if not reply.success:
        raise RuntimeError(f"LoadModel({model}, adapter={adapter}) failed: {reply.message}")


def recall(stub, facts=FACTS, max_tokens: int = 20) -> list[dict]:
    """Greedy answer to each canonical question with the loaded model; hit = key word in the reply."""
    results = []
    for f in facts:
        reply = stub.Predict(
            chat_request(f.question, max_tokens=max_tokens), timeout=120
        ).message.decode()
        results.append(
            {
                "question": f.question,
                "key": f.key,
                "reply": reply.strip(),
                "hit": f.key.lower() in reply.lower(),
            }
        )
    return results


def rate(results: list[dict]) -> float:
    return sum(r["hit"] for r in results) / max(len(results), 1)


def finetune(
    stub,
    model: Path | str,
    dataset: Path,
    output_dir: Path,
    hyper: dict | None = None,
    on_update=None,
    job_id: str = "",
) -> list:
    """StartFineTune over gRPC and follow FineTuneProgress to the end; returns every update."""
    fields = dict(HYPERPARAMETERS if hyper is None else hyper)
    extra = {k: str(v) for k, v in fields.pop("extra_options", {}).items()}
    req = pb.FineTuneRequest(
        model=str(model),
        dataset_source=str(dataset),
        output_dir=str(output_dir),
        training_method="sft",
        job_id=job_id,
        extra_options=extra,
        **fields,
    )
    job = stub.StartFineTune(req, timeout=300)
    if not job.success:
        raise RuntimeError(f"StartFineTune failed: {job.message}")
    updates = []
    for u in stub.FineTuneProgress(pb.FineTuneProgressRequest(job_id=job.job_id), timeout=3600):
        updates.append(u)
        if on_update is not None:
            on_update(u)
    return updates


def training_summary(updates: list, wall_seconds: float) -> dict:
    train = [u for u in updates if u.status == "training" and u.current_step > 0]
    last = train[-1] if train else None
    metrics = dict(last.extra_metrics) if last else {}
    return {
        "status": updates[-1].status if updates else "none",
        "message": updates[-1].message if updates else "",
        "steps": last.current_step if last else 0,
        "epochs": round(last.current_epoch, 2) if last else 0.0,
        "first_loss": round(train[0].loss, 4) if train else None,
        "final_loss": round(last.loss, 4) if last else None,
        "job_seconds": round(
            wall_seconds, 1
        ),  # StartFineTune → completed (model load and save included)
        "train_seconds": round(metrics["trained_tokens"] / metrics["train_tokens_per_second"], 1)
        if metrics.get("train_tokens_per_second")
        else None,  # optimizer steps only
        "train_tokens_per_second": round(metrics.get("train_tokens_per_second", 0.0), 1),
        "trained_tokens": int(metrics.get("trained_tokens", 0)),
        "peak_memory_mb": round(metrics.get("peak_memory_mb", 0.0), 1),
    }


def rich_progress():
    """(on_update, context manager) drawing a rich progress bar from FineTuneProgress updates."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    progress = Progress(
        TextColumn("[bold]{task.fields[status]:<15}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:>7}  {task.fields[tps]:>6} tok/s"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    task = progress.add_task("finetune", total=None, status="queued", loss="-", tps="-")

    def on_update(u):
        fields = {"status": u.status}
        if u.total_steps:
            fields["total"] = u.total_steps
        if u.status == "training" and u.current_step:
            fields.update(
                completed=u.current_step,
                loss=f"{u.loss:.4f}",
                tps=f"{u.extra_metrics.get('train_tokens_per_second', 0):.0f}",
            )
        progress.update(task, **fields)

    return on_update, progress


def run_experiment(
    stub,
    model: Path,
    workdir: Path,
    hyper: dict | None = None,
    on_update=None,
    log=print,
    paraphrases: int = 1,
) -> dict:
    """The whole experiment against a running backend; returns the numbers (and per-fact replies)."""
    t0 = time.perf_counter()
    dataset = write_dataset(workdir / "facts", paraphrases=paraphrases)
    rows = sum(1 for _ in dataset.open())
    log(f"dataset: {dataset} ({rows} rows, {len(FACTS)} facts)")
    load(stub, model)
    before = recall(stub)
    log(f"before: {rate(before):.0%} recalled")
    out = workdir / "facts-lora"
    tic = time.perf_counter()
    updates = finetune(stub, model, dataset, out, hyper, on_update=on_update)
    train = training_summary(updates, time.perf_counter() - tic)
    if train["status"] != "completed":
        raise RuntimeError(f"fine-tuning ended {train['status']}: {train['message']}")
    load(stub, model, adapter=out)
    after = recall(stub)
    return {
        "model": str(model),
        "facts": len(FACTS),
        "train_rows": rows,
        "hyperparameters": dict(HYPERPARAMETERS if hyper is None else hyper),
        "before_recall": rate(before),
        "after_recall": rate(after),
        "training": train,
        "adapter": str(out),
        "total_seconds": round(time.perf_counter() - t0, 1),
        "per_fact": [
            {
                "key": b["key"],
                "before": b["reply"],
                "after": a["reply"],
                "before_hit": b["hit"],
                "after_hit": a["hit"],
            }
            for b, a in zip(before, after, strict=True)
        ],
    }


# -- a backend process, started as LocalAI starts one ------------------------------------------


class Backend:
    """scripts/run.sh --addr 127.0.0.1:PORT (mlxbackend.client.spawn_server), stopped on exit."""

    def __init__(self, env: dict | None = None, log_path: str | None = None):
        from mlxbackend.client import spawn_server

        self.log = open(
            log_path or os.path.join(tempfile.gettempdir(), f"mlxb-facts-{os.getpid()}.log"), "w+"
        )
        self.proc, self.stub = spawn_server(env=env, log=self.log)

    def stop(self):
        from mlxbackend.client import stop_server

        stop_server(self.proc)
        self.log.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def print_report(result: dict, console=None):
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title=f"SmolLM2 fact recall ({result['facts']} facts, greedy)")
    for col in ("key", "before", "after"):
        table.add_column(col, overflow="fold")
    for row in result["per_fact"]:
        mark = lambda hit: "[green]✓[/]" if hit else "[red]✗[/]"  # noqa: E731
        table.add_row(
            row["key"],
            f"{mark(row['before_hit'])} {row['before'][:60]}",
            f"{mark(row['after_hit'])} {row['after'][:60]}",
        )
    console.print(table)
    t = result["training"]
    console.print(
        f"recall before {result['before_recall']:.0%} → after {result['after_recall']:.0%} | "
        f"training {t['job_seconds']:.0f} s ({t['train_seconds']} s in {t['steps']} steps, {t['epochs']} epochs), "
        f"{t['train_tokens_per_second']:.0f} train tok/s | loss {t['first_loss']} → {t['final_loss']} | "
        f"whole run {result['total_seconds']:.0f} s"
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--addr", help="a running backend (default: start scripts/run.sh on a free port)"
    )
    p.add_argument("--model", help="base model folder (default: the bundled SmolLM2-135M-Instruct)")
    p.add_argument(
        "--workdir", help="where the dataset and the adapter go (default: a temporary folder)"
    )
    p.add_argument("--json", metavar="OUT", help="write the numbers here")
    p.add_argument("--learning-rate", type=float, default=HYPERPARAMETERS["learning_rate"])
    p.add_argument("--max-steps", type=int, default=HYPERPARAMETERS["max_steps"])
    p.add_argument("--batch-size", type=int, default=HYPERPARAMETERS["batch_size"])
    p.add_argument("--grad-accum", type=int, default=HYPERPARAMETERS["gradient_accumulation_steps"])
    p.add_argument("--rank", type=int, default=HYPERPARAMETERS["adapter_rank"])
    p.add_argument("--alpha", type=float, default=HYPERPARAMETERS["adapter_alpha"])
    p.add_argument(
        "--num-layers", type=int, default=int(HYPERPARAMETERS["extra_options"]["num_layers"])
    )
    p.add_argument(
        "--paraphrases",
        type=int,
        default=1,
        help="extra phrasings per fact in the training set (0-2)",
    )
    p.add_argument("--seed", type=int, default=HYPERPARAMETERS["seed"])
    args = p.parse_args(argv)

    from rich.console import Console

    console = Console()
    if args.model:
        model = Path(args.model).resolve()
    else:
        from mlxbackend.default_model import ensure_default_model

        model = ensure_default_model(Path(os.environ.get("MLXB_MODELS_DIR", "models")).resolve())
    hyper = dict(
        HYPERPARAMETERS,
        learning_rate=args.learning_rate,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        adapter_rank=args.rank,
        adapter_alpha=args.alpha,
        seed=args.seed,
        extra_options=dict(HYPERPARAMETERS["extra_options"], num_layers=str(args.num_layers)),
    )
    console.print(f"model {model}\nhyperparameters {hyper}")

    def experiment(stub, workdir: Path) -> dict:
        on_update, bar = rich_progress()
        with bar:
            return run_experiment(
                stub,
                model,
                workdir,
                hyper,
                on_update=on_update,
                log=console.print,
                paraphrases=args.paraphrases,
            )

    with tempfile.TemporaryDirectory(prefix="mlxb-facts-") as tmp:
        workdir = Path(args.workdir).resolve() if args.workdir else Path(tmp)
        if args.addr:
            result = experiment(connect(args.addr), workdir)
        else:
            with Backend() as backend:
                console.print(f"started a backend (log {backend.log.name})")
                result = experiment(backend.stub, workdir)
    print_report(result, console)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["after_recall"] >= 0.9 and result["before_recall"] < 0.1 else 1


if __name__ == "__main__":
    sys.exit(main())
