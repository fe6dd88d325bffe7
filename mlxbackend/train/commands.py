"""`mlxbackend finetune` (a job over gRPC, with a rich progress bar) and `mlxbackend export`."""

from pathlib import Path

from mlxbackend.client import connect, spawn_server, stop_server
from mlxbackend.errors import BackendError
from mlxbackend.options import key_values
from mlxbackend.train.export import export_model


def add_parsers(sub):
    p = sub.add_parser(
        "finetune", help="fine-tune a model (LoRA/DoRA/full; sft/dpo/orpo) with a progress bar"
    )
    p.add_argument("--model", required=True, help="model folder, .gguf file or Hugging Face id")
    p.add_argument(
        "--data",
        required=True,
        help="jsonl/json/parquet/csv file, folder with train/valid, or HF dataset id",
    )
    p.add_argument("--output", required=True, help="job folder: checkpoints and the final adapter")
    p.add_argument("--type", default="lora", choices=["lora", "dora", "full"])
    p.add_argument("--method", default="sft", choices=["sft", "dpo", "orpo"])
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=16)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument(
        "--target-modules",
        default="",
        help="comma-separated, e.g. q_proj,v_proj (default: all linear)",
    )
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--max-steps", type=int, default=0, help="optimizer steps (0: use --epochs)")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--grad-accum", type=int, default=4)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--save-steps", type=int, default=0)
    p.add_argument("--optimizer", default="adamw")
    p.add_argument("--seed", type=int, default=3407)
    p.add_argument("--grad-checkpoint", action="store_true")
    p.add_argument("--resume", default="", help="checkpoint folder, job folder or 'latest'")
    p.add_argument(
        "--option",
        action="append",
        default=[],
        help="extra option key=value (repeatable), e.g. mask_prompt=true",
    )
    p.add_argument("--addr", default="", help="use a running backend instead of starting one")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser(
        "export", help="export a trained adapter: lora, merged_16bit, merged_4bit or gguf"
    )
    p.add_argument("checkpoint", help="a checkpoint-N folder or a job folder")
    p.add_argument("output", help="output folder")
    p.add_argument(
        "--format", default="lora", choices=["lora", "merged_16bit", "merged_4bit", "gguf"]
    )
    p.add_argument("--quantization", default="", help="gguf type: f16, q8_0, q4_k_m, …")
    p.add_argument(
        "--model", default="", help="base model (default: the one recorded at training time)"
    )
    p.add_argument(
        "--option",
        action="append",
        default=[],
        help="key=value (dtype, group_size, name, overwrite)",
    )
    p.set_defaults(func=cmd_export)


def cmd_finetune(args):
    import grpc
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    from mlxbackend.proto import backend_pb2 as pb

    console = Console()
    proc = None
    stub = connect(args.addr) if args.addr else None
    if stub is None:
        proc, stub = spawn_server()
    request = pb.FineTuneRequest(
        model=str(Path(args.model).absolute()) if Path(args.model).exists() else args.model,
        dataset_source=str(Path(args.data).absolute()) if Path(args.data).exists() else args.data,
        output_dir=str(Path(args.output).absolute()),
        training_type=args.type,
        training_method=args.method,
        adapter_rank=args.rank,
        adapter_alpha=args.alpha,
        adapter_dropout=args.dropout,
        target_modules=[m for m in args.target_modules.split(",") if m],
        learning_rate=args.lr,
        num_epochs=args.epochs,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        warmup_steps=args.warmup,
        save_steps=args.save_steps,
        optimizer=args.optimizer,
        seed=args.seed,
        gradient_checkpointing=args.grad_checkpoint,
        resume_from_checkpoint=args.resume,
        extra_options=key_values(args.option),
    )
    job_id = None
    try:
        job_id = stub.StartFineTune(request).job_id
        columns = (
            TextColumn("[bold]{task.fields[status]:<15}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn(
                "loss {task.fields[loss]:.4f}  lr {task.fields[lr]:.2e}  {task.fields[tps]:.0f} tok/s"
            ),
            TimeRemainingColumn(),
        )
        last = None
        with Progress(*columns, console=console) as bar:
            task = bar.add_task("finetune", total=None, status="queued", loss=0.0, lr=0.0, tps=0.0)
            for u in stub.FineTuneProgress(pb.FineTuneProgressRequest(job_id=job_id)):
                bar.update(
                    task,
                    total=u.total_steps or None,
                    completed=u.current_step,
                    status=u.status,
                    loss=u.loss,
                    lr=u.learning_rate,
                    tps=u.extra_metrics.get("tokens_per_second", 0.0),
                )
                if u.checkpoint_path and u.checkpoint_path != (
                    last.checkpoint_path if last else ""
                ):
                    bar.console.print(f"[dim]checkpoint {u.checkpoint_path}[/dim]")
                last = u
        style = "green" if last.status == "completed" else "red"
        console.print(f"[{style}]{last.status}[/{style}]: {last.message}")
        if last.eval_loss:
            console.print(f"eval loss {last.eval_loss:.4f}")
        return 0 if last.status == "completed" else 1
    except KeyboardInterrupt:
        if job_id:
            console.print("stopping (saving a checkpoint)…")
            stub.StopFineTune(pb.FineTuneStopRequest(job_id=job_id, save_checkpoint=True))
            for u in stub.FineTuneProgress(pb.FineTuneProgressRequest(job_id=job_id)):
                last = u
            console.print(f"{last.status}: {last.message}")
        return 130
    except grpc.RpcError as exc:
        console.print(f"[red]{exc.code().name}: {exc.details()}[/red]")
        return 1
    finally:
        if proc is not None:
            stop_server(proc)


def cmd_export(args):
    from rich.console import Console

    console = Console()
    with console.status(f"exporting {args.format}…") as status:

        def progress(stage, fraction):
            status.update(f"{stage} {fraction * 100:.0f}%")

        try:
            message = export_model(
                args.checkpoint,
                args.output,
                args.format,
                args.quantization,
                args.model,
                key_values(args.option),
                progress=progress,
            )
        except (BackendError, ValueError, FileNotFoundError) as exc:
            console.print(f"[red]{exc}[/red]")
            return 1
    console.print(message)
    return 0
