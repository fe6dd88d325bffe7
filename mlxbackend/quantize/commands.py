"""`mlxbackend quantize`: a quantization job over gRPC with a rich progress bar."""

from pathlib import Path

from mlxbackend.client import connect, spawn_server, stop_server
from mlxbackend.options import key_values


def add_parser(sub):
    p = sub.add_parser(
        "quantize", help="quantize a model: GGUF types (q4_k_m, q8_0, …) or MLX types (mlx-q4, …)"
    )
    p.add_argument("model", help="model folder, .gguf file or Hugging Face id")
    p.add_argument(
        "--type", default="q4_k_m", help="quantization type (see mlxbackend/quantize/config.py)"
    )
    p.add_argument(
        "--output", required=True, help="output folder (the .gguf file or MLX folder goes inside)"
    )
    p.add_argument(
        "--option",
        action="append",
        default=[],
        help="extra option key=value (group_size, pre_tokenizer, …)",
    )
    p.add_argument("--addr", default="", help="use a running backend instead of starting one")
    p.set_defaults(func=cmd_quantize)


def cmd_quantize(args):
    import grpc
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

    from mlxbackend.proto import backend_pb2 as pb

    console = Console()
    proc = None
    stub = connect(args.addr) if args.addr else None
    if stub is None:
        proc, stub = spawn_server()
    model = str(Path(args.model).absolute()) if Path(args.model).exists() else args.model
    request = pb.QuantizationRequest(
        model=model,
        quantization_type=args.type,
        output_dir=str(Path(args.output).absolute()),
        extra_options=key_values(args.option),
    )
    job_id = None
    try:
        job_id = stub.StartQuantization(request).job_id
        last = None
        columns = (
            TextColumn("[bold]{task.fields[status]:<11}"),
            BarColumn(),
            TaskProgressColumn(),
            TimeElapsedColumn(),
        )
        with Progress(*columns, console=console) as bar:
            task = bar.add_task("quantize", total=100, status="queued")
            for u in stub.QuantizationProgress(pb.QuantizationProgressRequest(job_id=job_id)):
                bar.update(task, completed=u.progress_percent, status=u.status)
                last = u
        style = "green" if last.status == "completed" else "red"
        console.print(f"[{style}]{last.status}[/{style}]: {last.message}")
        if last.output_file:
            metrics = ", ".join(f"{k} {v:.3g}" for k, v in sorted(last.extra_metrics.items()))
            console.print(f"{last.output_file}  ({metrics})")
        return 0 if last.status == "completed" else 1
    except KeyboardInterrupt:
        if job_id:
            stub.StopQuantization(pb.QuantizationStopRequest(job_id=job_id))
            console.print("stopped")
        return 130
    except grpc.RpcError as exc:
        console.print(f"[red]{exc.code().name}: {exc.details()}[/red]")
        return 1
    finally:
        if proc is not None:
            stop_server(proc)
