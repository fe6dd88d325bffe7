"""Fine-tuning jobs over gRPC against a real server: train, progress fan-out, stop, checkpoints,
kill -9 + resume, export + LoadModel, preference methods, bad inputs."""

import json
import os
import signal
import threading
from pathlib import Path

import grpc
import pytest

from mlxbackend.client import chat_request
from mlxbackend.proto import backend_pb2 as pb
from tests.conftest import Server

SECRET = "The secret word is banana."
TERMINAL = ("completed", "failed", "stopped")


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def secret_data(tmp_path_factory) -> Path:
    """A synthetic pattern: every 'secret' question has the same answer."""
    folder = tmp_path_factory.mktemp("secret")
    write_jsonl(
        folder / "train.jsonl",
        [{"prompt": f"Tell me the secret {i % 4}.", "completion": SECRET} for i in range(16)],
    )
    write_jsonl(
        folder / "valid.jsonl", [{"prompt": "Tell me the secret 9.", "completion": SECRET}] * 2
    )
    return folder


def request(model, data, out, **kw) -> pb.FineTuneRequest:
    fields = dict(
        model=str(model),
        dataset_source=str(data),
        output_dir=str(out),
        learning_rate=2e-3,
        max_steps=60,
        batch_size=4,
        gradient_accumulation_steps=1,
        adapter_rank=16,
        adapter_alpha=32,
        extra_options={"mask_prompt": "true"},
    )
    fields.update(kw)
    return pb.FineTuneRequest(**fields)


def follow(srv, job_id, until=None) -> list:
    """Every update of a job's progress stream (until a predicate holds, or the stream ends)."""
    updates = []
    for u in srv.stub.FineTuneProgress(pb.FineTuneProgressRequest(job_id=job_id), timeout=300):
        updates.append(u)
        if until is not None and until(u):
            break
    return updates


def greedy(srv, text="Tell me the secret 2.", tokens=24) -> str:
    return srv.stub.Predict(chat_request(text, max_tokens=tokens)).message.decode()


@pytest.fixture(scope="module")
def ft_server():
    srv = Server(env={"MLXB_JOBS_DIR": "/tmp/mlxb-test-jobs"})
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def trained_job(ft_server, tiny_dir, secret_data, tmp_path_factory):
    """One LoRA job on the tiny random model, followed by two subscribers at once."""
    out = tmp_path_factory.mktemp("job") / "out"
    job = ft_server.stub.StartFineTune(
        request(tiny_dir, secret_data, out, save_steps=20, job_id="secret-job")
    )
    assert job.success and job.job_id == "secret-job"
    second = {}
    t = threading.Thread(target=lambda: second.setdefault("updates", follow(ft_server, job.job_id)))
    t.start()
    updates = follow(ft_server, job.job_id)
    t.join(60)
    return job.job_id, out, updates, second["updates"]


def test_training_progress_and_pattern(ft_server, tiny_dir, trained_job, tmp_path):
    job_id, out, updates, second = trained_job
    statuses = [u.status for u in updates]
    assert statuses[-1] == "completed", updates[-1].message
    order = ["loading_model", "loading_dataset", "training", "saving", "completed"]
    assert [s for s in dict.fromkeys(statuses) if s in order] == order
    train = [u for u in updates if u.status == "training" and u.loss > 0]
    assert train[-1].current_step == train[-1].total_steps == 60
    assert train[-1].loss < train[0].loss / 5, (train[0].loss, train[-1].loss)
    last = updates[-1]
    assert last.progress_percent == 100 and last.current_epoch > 1 and last.learning_rate >= 0
    assert last.eval_loss > 0 and train[-1].grad_norm > 0 and train[5].eta_seconds > 0
    assert {"tokens_per_second", "peak_memory_mb", "trained_tokens"} <= set(last.extra_metrics)
    assert [u.checkpoint_path for u in updates if u.status == "saving" and u.checkpoint_path][
        0
    ].endswith("checkpoint-20")
    # every subscriber sees the whole run from where it joined, and the same end
    assert second[-1].status == "completed" and second[-1].current_step == 60
    assert {u.current_step for u in train} <= {u.current_step for u in second} | {0}
    # a subscriber after the end gets the final snapshot, then the stream ends
    late = follow(ft_server, job_id)
    assert len(late) == 1 and late[0].status == "completed"
    # the adapter folder is an mlx-lm adapter; checkpoints carry their own metadata
    assert (out / "adapters.safetensors").exists() and (out / "adapter_config.json").exists()
    ckpts = ft_server.stub.ListCheckpoints(
        pb.ListCheckpointsRequest(output_dir=str(out))
    ).checkpoints
    assert [c.step for c in ckpts] == [20, 40, 60]
    assert all(c.loss > 0 and c.epoch > 0 and c.created_at.endswith("Z") for c in ckpts)
    assert not [p for p in out.iterdir() if ".tmp" in p.name]
    empty = ft_server.stub.ListCheckpoints(
        pb.ListCheckpointsRequest(output_dir=str(tmp_path / "none"))
    )
    assert list(empty.checkpoints) == []

    # before training, the random model does not know the answer
    assert ft_server.stub.LoadModel(pb.ModelOptions(Model=str(tiny_dir))).success
    assert SECRET not in greedy(ft_server)
    # export as an adapter; LoadModel with it reproduces the pattern
    lora = tmp_path / "models" / "secret-lora"
    r = ft_server.stub.ExportModel(
        pb.ExportModelRequest(checkpoint_path=str(out), output_path=str(lora), export_format="lora")
    )
    assert r.success, r.message
    assert (lora.parent / "secret-lora.yaml").read_text().count("lora_adapter:") == 1
    assert ft_server.stub.LoadModel(
        pb.ModelOptions(Model=str(tiny_dir), LoraAdapter=str(lora))
    ).success
    assert greedy(ft_server).startswith(SECRET)
    # merged 16-bit: a plain HF-layout model folder that answers the same way
    merged = tmp_path / "models" / "secret-merged"
    r = ft_server.stub.ExportModel(
        pb.ExportModelRequest(
            checkpoint_path=str(out / "checkpoint-60"),
            output_path=str(merged),
            export_format="merged_16bit",
        )
    )
    assert r.success, r.message
    config = json.loads((merged / "config.json").read_text())
    assert "quantization" not in config and config["torch_dtype"] == "float16"
    assert (merged / "tokenizer.json").exists() or (merged / "tokenizer_config.json").exists()
    assert ft_server.stub.LoadModel(pb.ModelOptions(Model=str(merged))).success
    assert greedy(ft_server).startswith(SECRET)


def test_merged_4bit_export(ft_server, trained_job, tmp_path):
    _, out, _, _ = trained_job
    dst = tmp_path / "secret-4bit"
    r = ft_server.stub.ExportModel(
        pb.ExportModelRequest(
            checkpoint_path=str(out),
            output_path=str(dst),
            export_format="merged_4bit",
            extra_options={"group_size": "32"},
        )
    )
    assert r.success, r.message
    assert json.loads((dst / "config.json").read_text())["quantization"]["bits"] == 4
    assert ft_server.stub.LoadModel(pb.ModelOptions(Model=str(dst))).success
    assert greedy(ft_server)  # a 4-bit tiny model answers (exact text may drift)


def test_stop_with_checkpoint_while_serving(ft_server, tiny_dir, secret_data, tmp_path):
    """Inference and Health keep working during training; StopFineTune ends it with a checkpoint."""
    assert ft_server.stub.LoadModel(pb.ModelOptions(Model=str(tiny_dir))).success
    out = tmp_path / "out"
    job = ft_server.stub.StartFineTune(request(tiny_dir, secret_data, out, max_steps=100000))
    seen = follow(
        ft_server, job.job_id, until=lambda u: u.status == "training" and u.current_step >= 3
    )
    assert seen[-1].total_steps == 100000
    assert ft_server.healthy()
    assert greedy(ft_server, tokens=4)  # a chat request is served between training steps
    with pytest.raises(grpc.RpcError) as err:  # one job per process
        ft_server.stub.StartFineTune(request(tiny_dir, secret_data, tmp_path / "other"))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    r = ft_server.stub.StopFineTune(pb.FineTuneStopRequest(job_id=job.job_id, save_checkpoint=True))
    assert r.success
    rest = follow(ft_server, job.job_id)
    assert rest[-1].status == "stopped", rest[-1].message
    ckpt = Path(rest[-1].checkpoint_path)
    assert ckpt.is_dir() and (ckpt / "optimizer.safetensors").exists()
    assert rest[-1].current_step < 100000 and (out / "adapters.safetensors").exists()
    msg = ft_server.stub.StopFineTune(pb.FineTuneStopRequest(job_id=job.job_id)).message
    assert "already stopped" in msg


def test_kill9_then_resume_continues(tiny_dir, secret_data, tmp_path):
    """kill -9 mid-training; a new process resumes from the last checkpoint: the step count goes
    on and the losses are the ones the killed run produced for the same steps."""
    env = {"MLXB_JOBS_DIR": str(tmp_path / "jobs")}
    out = tmp_path / "out"
    first = Server(env=env)
    try:
        req = request(
            tiny_dir,
            secret_data,
            out,
            max_steps=400,
            save_steps=10,
            job_id="resume-me",
            gradient_accumulation_steps=2,
        )
        first.stub.StartFineTune(req)
        seen = follow(
            first, "resume-me", until=lambda u: u.status == "training" and u.current_step >= 23
        )
        os.killpg(first.proc.pid, signal.SIGKILL)
        first.proc.wait(10)
    finally:
        first.stop()
    losses = {u.current_step: u.loss for u in seen if u.status == "training" and u.current_step}
    assert not [
        p
        for p in out.iterdir()
        if p.name.startswith("checkpoint-") and not (p / "trainer_state.json").exists()
    ]
    second = Server(env=env)
    try:
        # the new process knows the job from disk: the run did not finish
        old = follow(second, "resume-me")
        assert old[-1].status == "failed" and "resume_from_checkpoint" in old[-1].message
        latest = max(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))
        second.stub.StartFineTune(
            request(
                tiny_dir,
                secret_data,
                out,
                max_steps=400,
                save_steps=10,
                job_id="resumed",
                gradient_accumulation_steps=2,
                resume_from_checkpoint="latest",
            )
        )
        after = follow(
            second,
            "resumed",
            until=lambda u: u.status == "training" and u.current_step >= latest + 3,
        )
        assert after[-1].status == "training", after[-1].message
        second.stub.StopFineTune(pb.FineTuneStopRequest(job_id="resumed"))
        follow(second, "resumed")
    finally:
        second.stop()
    trained = [u for u in after if u.status == "training" and u.loss > 0]
    assert f"resumed from checkpoint-{latest}" in next(
        u.message for u in after if u.message.startswith("Training")
    )
    assert trained[0].current_step == latest + 1
    for u in trained:
        if u.current_step in losses:
            assert u.loss == pytest.approx(losses[u.current_step], rel=1e-3), u.current_step


@pytest.mark.parametrize("method", ["dpo", "orpo"])
def test_preference_methods(ft_server, tiny_dir, tmp_path, method):
    data = write_jsonl(
        tmp_path / "pairs.jsonl",
        [
            {"prompt": f"Pick a fruit {i}.", "chosen": "Banana.", "rejected": "A rock."}
            for i in range(8)
        ],
    )
    job = ft_server.stub.StartFineTune(
        request(
            tiny_dir,
            data,
            tmp_path / "out",
            training_method=method,
            max_steps=25,
            learning_rate=1e-3,
        )
    )
    updates = follow(ft_server, job.job_id)
    assert updates[-1].status == "completed", updates[-1].message
    if method == "dpo":
        assert "caching" in [u.status for u in updates]
    train = [u for u in updates if u.status == "training" and u.loss]
    assert train[-1].loss < train[0].loss
    if method == "dpo":
        assert train[0].loss == pytest.approx(0.693, abs=0.01)  # log 2 before the policy moves


@pytest.mark.parametrize("kind", ["dora", "full"])
def test_training_types(ft_server, tiny_dir, secret_data, tmp_path, kind):
    job = ft_server.stub.StartFineTune(
        request(
            tiny_dir,
            secret_data,
            tmp_path / "out",
            training_type=kind,
            max_steps=8,
            learning_rate=1e-3,
            target_modules=["q_proj", "v_proj"],
            optimizer="adamw_8bit",
            gradient_checkpointing=True,
        )
    )
    updates = follow(ft_server, job.job_id)
    assert updates[-1].status == "completed", updates[-1].message
    assert "adamw_8bit is not available in MLX" in next(
        u.message for u in updates if u.message.startswith("Training")
    )
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["fine_tune_type"] == kind


def test_bad_inputs(ft_server, tiny_dir, secret_data, tmp_path):
    def code_of(**kw):
        args = {"model": tiny_dir, "data": secret_data, "out": tmp_path / "out"}
        for key, name in (("model", "model"), ("dataset_source", "data"), ("output_dir", "out")):
            if key in kw:
                args[name] = kw.pop(key)
        with pytest.raises(grpc.RpcError) as err:
            ft_server.stub.StartFineTune(request(args["model"], args["data"], args["out"], **kw))
        return err.value.code(), err.value.details()

    assert code_of(dataset_source=str(tmp_path / "missing.jsonl"))[0] == grpc.StatusCode.NOT_FOUND
    assert code_of(model=str(tmp_path / "no-model"))[0] == grpc.StatusCode.NOT_FOUND
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"prompt": "a", "completion": "b"}\n{"prompt": "a"\n{"prompt": "c", "completion": "d"}\n'
    )
    code, details = code_of(dataset_source=str(bad))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "bad.jsonl:2" in details
    code, details = code_of(training_method="grpo")
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "sft" in details and "dpo" in details
    assert code_of(training_type="lokr")[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(optimizer="prodigy")[0] == grpc.StatusCode.INVALID_ARGUMENT
    blocker = tmp_path / "file"
    blocker.write_text("")
    code, details = code_of(output_dir=str(blocker / "out"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "not writable" in details
    assert code_of(resume_from_checkpoint=str(tmp_path))[0] == grpc.StatusCode.NOT_FOUND
    code, details = code_of(target_modules=["no_such_proj"])
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "q_proj" in details
    for call, req in ((ft_server.stub.StopFineTune, pb.FineTuneStopRequest(job_id="nope")),):
        with pytest.raises(grpc.RpcError) as err:
            call(req)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as err:
        follow(ft_server, "nope")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    for fmt, code in (
        ("lokr", grpc.StatusCode.INVALID_ARGUMENT),
        ("bogus", grpc.StatusCode.INVALID_ARGUMENT),
    ):
        with pytest.raises(grpc.RpcError) as err:
            ft_server.stub.ExportModel(
                pb.ExportModelRequest(
                    checkpoint_path=str(tmp_path),
                    output_path=str(tmp_path / "x"),
                    export_format=fmt,
                )
            )
        assert err.value.code() == code
    with pytest.raises(grpc.RpcError) as err:
        ft_server.stub.ExportModel(
            pb.ExportModelRequest(
                checkpoint_path=str(tmp_path / "nothing"),
                output_path=str(tmp_path / "x"),
                export_format="lora",
            )
        )
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert not (tmp_path / "x").exists()
    assert ft_server.healthy()


def test_cli_finetune_and_export(tiny_dir, secret_data, tmp_path):
    """`mlxbackend finetune` starts its own backend and shows progress; `mlxbackend export` merges."""
    import subprocess
    import sys

    out = tmp_path / "job"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "mlxbackend",
            "finetune",
            "--model",
            str(tiny_dir),
            "--data",
            str(secret_data),
            "--output",
            str(out),
            "--lr",
            "2e-3",
            "--max-steps",
            "6",
            "--batch-size",
            "4",
            "--grad-accum",
            "1",
            "--option",
            "mask_prompt=true",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "completed" in run.stdout and "6/6" in run.stdout
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "mlxbackend",
            "export",
            str(out),
            str(tmp_path / "merged"),
            "--format",
            "merged_16bit",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert (tmp_path / "merged" / "config.json").exists() and (tmp_path / "merged.yaml").exists()
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "mlxbackend",
            "export",
            str(tmp_path / "no-job"),
            str(tmp_path / "x"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert (
        run.returncode == 1 and "no trained adapter" in run.stdout and not (tmp_path / "x").exists()
    )
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "mlxbackend",
            "finetune",
            "--model",
            str(tiny_dir),
            "--data",
            str(tmp_path / "nope.jsonl"),
            "--output",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 1 and "NOT_FOUND" in run.stdout


def test_qlora_on_quantized_base(ft_server, tiny_dir, secret_data, tmp_path):
    """LoRA on a 4-bit base is QLoRA: the base stays quantized, the adapter loads back on it."""
    from mlx_lm import convert

    base = tmp_path / "tiny-q4"
    convert(str(tiny_dir), str(base), quantize=True, q_group_size=32, q_bits=4)
    job = ft_server.stub.StartFineTune(request(base, secret_data, tmp_path / "out", max_steps=40))
    updates = follow(ft_server, job.job_id)
    assert updates[-1].status == "completed", updates[-1].message
    train = [u for u in updates if u.status == "training" and u.loss]
    assert train[-1].loss < train[0].loss / 3
    assert ft_server.stub.LoadModel(
        pb.ModelOptions(Model=str(base), LoraAdapter=str(tmp_path / "out"))
    ).success
    assert greedy(ft_server).startswith(SECRET)
    with pytest.raises(grpc.RpcError) as err:  # full fine-tuning needs float weights
        job = ft_server.stub.StartFineTune(
            request(base, secret_data, tmp_path / "full", training_type="full")
        )
        follow(ft_server, job.job_id)
    assert "unquantized" in err.value.details()


def test_gguf_export_answers_like_mlx(ft_server, trained_job, tmp_path):
    """gguf export: fused → llama.cpp's converter → quantizer; llama.cpp answers as MLX does."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    _, out, _, _ = trained_job
    merged = tmp_path / "merged"
    assert ft_server.stub.ExportModel(
        pb.ExportModelRequest(
            checkpoint_path=str(out), output_path=str(merged), export_format="merged_16bit"
        )
    ).success
    prompt = load_tokenizer(merged).apply_chat_template(
        [{"role": "user", "content": "Tell me the secret 2."}],
        add_generation_prompt=True,
        tokenize=False,
    )
    assert ft_server.stub.LoadModel(pb.ModelOptions(Model=str(merged))).success
    mlx_text = ft_server.stub.Predict(
        pb.PredictOptions(Prompt=prompt, Tokens=10, Temperature=0)
    ).message.decode()
    assert mlx_text.startswith("The secret word")
    for qtype in ("f16", "q8_0"):
        dst = tmp_path / f"gguf-{qtype}"
        r = ft_server.stub.ExportModel(
            pb.ExportModelRequest(
                checkpoint_path=str(out),
                output_path=str(dst),
                export_format="gguf",
                quantization_method=qtype,
                extra_options={"pre_tokenizer": "gpt-2", "name": "secret"},
            )
        )  # the test tokenizer is custom BPE
        assert r.success, r.message
        gguf = dst / f"secret-{qtype}.gguf"
        assert (
            gguf.read_bytes()[:4] == b"GGUF"
            and "backend: llama-cpp" in (tmp_path / "secret.yaml").read_text()
        )
        llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=256, verbose=False)
        text = llm(prompt, max_tokens=10, temperature=0.0)["choices"][0]["text"]
        assert text == mlx_text, (qtype, text, mlx_text)


def test_mixed_precision_bf16(ft_server, tiny_dir, secret_data, tmp_path):
    """mixed_precision bf16: frozen weights in bfloat16, the job trains; fp8 is refused."""
    job = ft_server.stub.StartFineTune(
        request(tiny_dir, secret_data, tmp_path / "out", max_steps=20, mixed_precision="bf16")
    )
    updates = follow(ft_server, job.job_id)
    train = [u for u in updates if u.status == "training" and u.loss]
    assert updates[-1].status == "completed" and train[-1].loss < train[0].loss / 3
    with pytest.raises(grpc.RpcError) as err:
        ft_server.stub.StartFineTune(
            request(tiny_dir, secret_data, tmp_path / "fp8", mixed_precision="fp8")
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "bf16" in err.value.details()


def test_localai_stop_free_then_sigterm_keeps_checkpoint(tiny_dir, secret_data, tmp_path):
    """LocalAI stops a job by Free, then SIGTERM: the job ends `stopped` with a checkpoint and the
    process exits cleanly."""
    srv = Server(env={"MLXB_JOBS_DIR": str(tmp_path / "jobs")})
    try:
        out = tmp_path / "out"
        job = srv.stub.StartFineTune(request(tiny_dir, secret_data, out, max_steps=100000))
        follow(srv, job.job_id, until=lambda u: u.status == "training" and u.current_step >= 3)
        assert srv.stub.Free(pb.HealthMessage()).success
        rest = follow(srv, job.job_id)
        assert rest[-1].status == "stopped" and Path(rest[-1].checkpoint_path).is_dir()
        srv.proc.send_signal(signal.SIGTERM)
        assert srv.proc.wait(15) == 0
    finally:
        srv.stop()
