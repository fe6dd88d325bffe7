"""Distributed inference with mx.distributed (ring backend over loopback, 2 ranks).

Rank 0 is the gRPC server (LoadModel with Options hostfile:), rank 1 is `mlxbackend worker`.
Greedy output, token counts, logprobs, stop hold-back and seeded sampling must equal the
single-process server's; a killed worker fails the request within seconds (UNAVAILABLE), a
frozen one within `distributed_timeout`; the server stays healthy, reports the broken group in
Status, and the next LoadModel rebuilds the group."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest

from mlxbackend.proto import backend_pb2 as pb
from tests import tiny_model as tm
from tests.conftest import ROOT, Server
from tests.test_localai_dropin import custom_code_copy, eos_option

KILL_BOUND_S = 20  # documented upper bound for a failed request after a worker dies (seen: < 1 s)
FREEZE_TIMEOUT_S = 3  # distributed_timeout used for the frozen-worker test


# -- helpers ---------------------------------------------------------------------------------
def rank_port() -> int:
    """A free port below Linux's ephemeral range (32768+): a port from bind(0) can be handed out
    again as the source port of the ring's own connections before a rank binds it (EADDRINUSE)."""
    import random
    import socket

    while True:
        port = random.randint(20000, 32000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue


def write_hostfile(folder: Path, ranks: int = 2) -> Path:
    path = folder / "hosts.json"
    path.write_text(json.dumps([f"127.0.0.1:{rank_port()}" for _ in range(ranks)]))
    return path


class Worker:
    """`mlxbackend worker --rank 1 --hostfile F` in its own process group."""

    def __init__(self, hostfile: Path, rank: int = 1, localai: bool = False, extra=()):
        self.log = open(f"/tmp/mlxb-worker-{os.getpid()}-{time.monotonic_ns()}.log", "w+")
        if localai:  # as `local-ai worker mlx-distributed` starts it: run.sh … --worker
            cmd = [
                str(ROOT / "scripts" / "run.sh"),
                "--backend",
                "ring",
                "--hostfile",
                str(hostfile),
                "--rank",
                str(rank),
                "--worker",
            ]
        else:
            cmd = [
                sys.executable,
                "-m",
                "mlxbackend",
                "worker",
                "--rank",
                str(rank),
                "--hostfile",
                str(hostfile),
                *extra,
            ]
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def rank_pid(self, timeout: float = 10) -> int:
        """The current rank process (the supervisor's child)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                kids = (
                    Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
                )
            except OSError:
                kids = []
            if kids:
                return int(kids[0])
            time.sleep(0.05)
        raise RuntimeError("no rank process")

    def output(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text()

    def kill(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self):
        self.kill()
        self.log.close()


def messages(conversation):
    return [pb.Message(role=m["role"], content=m["content"]) for m in conversation]


def tiny_requests():
    chat = pb.PredictOptions(
        Messages=messages(tm.CHAT_CONVERSATION),
        UseTokenizerTemplate=True,
        Tokens=200,
        Logprobs=1,
        TopLogprobs=2,
    )
    stop = pb.PredictOptions(
        Prompt=tm.COMPLETION_PROMPT, Tokens=197, StopPrompts=[" the dragon"], Logprobs=1
    )
    seeded = pb.PredictOptions(
        Prompt=tm.COMPLETION_PROMPT, Tokens=40, Temperature=1.5, TopK=0, TopP=1.0, Seed=7
    )
    return [
        ("predict", chat),
        ("stream", chat),
        ("predict", stop),
        ("stream", stop),
        ("predict", seeded),
    ]


def smol_requests():
    ask = pb.PredictOptions(
        Messages=[
            pb.Message(
                role="user", content="What is the capital of France? Answer in one sentence."
            )
        ],
        UseTokenizerTemplate=True,
        Tokens=30,
        Temperature=0,
        Logprobs=1,
        TopLogprobs=2,
    )
    return [("predict", ask), ("stream", ask)]


def outputs(stub, requests) -> list:
    """Everything a client sees, per request (stream: chunk by chunk), timings left out."""
    out = []
    for kind, request in requests:
        if kind == "predict":
            r = stub.Predict(request, timeout=120)
            deltas = [(d.content, d.reasoning_content) for d in r.chat_deltas]
            out.append(
                (r.message.decode(), r.tokens, r.prompt_tokens, deltas, _logprobs(r.logprobs))
            )
        else:
            chunks = list(stub.PredictStream(request, timeout=120))
            out.append(
                [
                    (c.message.decode(), c.tokens, c.prompt_tokens, _logprobs(c.logprobs))
                    for c in chunks
                ]
            )
    out.append(list(stub.TokenizeString(requests[0][1]).tokens))
    return out


def _logprobs(raw: bytes):
    return json.loads(raw) if raw else None


def close(a, b, tol: float = 1e-4) -> bool:
    """Equal outputs, logprobs within `tol`: a prompt-cache hit re-feeds the last prompt token
    alone where a cold prefill computes it in its last chunk, which moves logprobs by ~1e-6."""
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b) <= tol
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(close(x, y, tol) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(close(a[k], b[k], tol) for k in a)
    return a == b


def load(srv, model: Path, options=(), timeout=180, **kw):
    return srv.stub.LoadModel(
        pb.ModelOptions(Model=model.name, ModelPath=str(model.parent), Options=list(options), **kw),
        timeout=timeout,
    )


def status(srv):
    reply = srv.stub.Status(pb.HealthMessage(), timeout=10)
    return reply.state, dict(reply.memory.breakdown)


def long_request():
    return pb.PredictOptions(Prompt=tm.COMPLETION_PROMPT, Tokens=4000, IgnoreEOS=True)


# -- fixtures --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reference(trained_dir, smollm2_dir):
    """The single-process server's outputs for the same requests."""
    srv = Server()
    try:
        assert load(srv, trained_dir, ContextSize=8192).success
        tiny = outputs(srv.stub, tiny_requests())
        assert load(srv, smollm2_dir).success
        smol = outputs(srv.stub, smol_requests())
        weights = status(srv)[1]["weights"]
    finally:
        srv.stop()
    return {"tiny": tiny, "smol": smol, "smol_weights": weights}


@pytest.fixture(scope="module")
def group(tmp_path_factory):
    """A rank-1 worker and a gRPC server (rank 0) sharing a loopback hostfile."""
    hostfile = write_hostfile(tmp_path_factory.mktemp("dist"))
    worker = Worker(hostfile)
    srv = Server()
    state = {"srv": srv, "worker": worker, "hostfile": hostfile}
    yield state
    srv.stop()
    state["worker"].stop()


# -- options ---------------------------------------------------------------------------------
def test_bad_options(trained_dir, smollm2_dir, tmp_path):
    srv = Server()
    try:

        def code(options, model=trained_dir):
            with pytest.raises(grpc.RpcError) as err:
                load(srv, model, options, timeout=60)
            return err.value.code(), err.value.details()

        c, msg = code(["hostfile:/nonexistent/hosts.json"])
        assert c == grpc.StatusCode.NOT_FOUND and "hostfile not found" in msg
        bad = tmp_path / "bad.json"
        bad.write_text("{not json")
        c, msg = code([f"hostfile:{bad}"])
        assert c == grpc.StatusCode.INVALID_ARGUMENT and "not valid JSON" in msg
        one = tmp_path / "one.json"
        one.write_text('["127.0.0.1:5000"]')
        c, msg = code([f"hostfile:{one}"])
        assert c == grpc.StatusCode.INVALID_ARGUMENT and "at least 2" in msg
        entry = tmp_path / "entry.json"
        entry.write_text('["127.0.0.1:5000", "nohostport"]')
        c, msg = code([f"hostfile:{entry}"])
        assert c == grpc.StatusCode.INVALID_ARGUMENT and "entry 1" in msg
        two = write_hostfile(tmp_path)
        c, msg = code([f"hostfile:{two}", "distributed_backend:carrier-pigeon"])
        assert c == grpc.StatusCode.INVALID_ARGUMENT and "distributed_backend" in msg
        c, msg = code([f"hostfile:{two}", "distributed_mode:sideways"])
        assert c == grpc.StatusCode.INVALID_ARGUMENT and "distributed_mode" in msg
        c, msg = code(
            [f"hostfile:{two}", "distributed_mode:tensor"], smollm2_dir
        )  # 9 heads, 3 KV heads
        assert (
            c == grpc.StatusCode.INVALID_ARGUMENT
            and "attention heads 9" in msg
            and "pipeline" in msg
        )
        c, msg = code([f"hostfile:{two}", "distributed_split:1,2"])  # the tiny model has 2 layers
        assert c == grpc.StatusCode.INVALID_ARGUMENT and "sum to" in msg
        # a well-formed group whose worker never comes: UNAVAILABLE after distributed_init_timeout
        started = time.monotonic()
        c, msg = code([f"hostfile:{two}", "distributed_init_timeout:2"])
        assert (
            c == grpc.StatusCode.UNAVAILABLE
            and "did not form" in msg
            and "mlxbackend worker" in msg
        )
        assert time.monotonic() - started < 30
        assert srv.healthy()
    finally:
        srv.stop()


# -- exact output ----------------------------------------------------------------------------
def test_pipeline_tiny_matches_single_process(group, reference, trained_dir):
    srv = group["srv"]
    reply = load(srv, trained_dir, [f"hostfile:{group['hostfile']}"], ContextSize=8192)
    assert reply.success and "pipeline over 2 ranks" in reply.message, reply.message
    assert close(outputs(srv.stub, tiny_requests()), reference["tiny"])
    # concurrent requests interleave step by step, each on its own twin KV cache on every rank
    results = [None] * 3
    threads = [
        threading.Thread(
            target=lambda i=i: results.__setitem__(i, outputs(srv.stub, tiny_requests()[:1]))
        )
        for i in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(close(r, [reference["tiny"][0], reference["tiny"][-1]]) for r in results)
    state, memory = status(srv)
    assert state == pb.StatusResponse.READY
    assert memory["ranks"] == 2 and memory["rank0_weights"] > 0 and memory["rank1_weights"] > 0
    assert memory["rank1_active"] > 0


def test_tensor_tiny_matches_single_process(group, reference, trained_dir):
    srv = group["srv"]
    reply = load(
        srv,
        trained_dir,
        [f"hostfile:{group['hostfile']}", "distributed_mode:tensor"],
        ContextSize=8192,
    )
    assert reply.success and "tensor over 2 ranks" in reply.message, reply.message
    got, want = outputs(srv.stub, tiny_requests()), reference["tiny"]
    # all_sum adds partial products in another order: same tokens, logprobs within float noise
    assert _strip_logprobs(got) == _strip_logprobs(want)
    for a, b in zip(_logprob_values(got), _logprob_values(want), strict=True):
        assert abs(a - b) < 1e-3


def test_pipeline_smollm2_matches_single_process(group, reference, smollm2_dir):
    srv = group["srv"]
    reply = load(srv, smollm2_dir, [f"hostfile:{group['hostfile']}"])
    assert reply.success and "layers 15-29" in reply.message, reply.message
    got = outputs(srv.stub, smol_requests())
    assert close(got, reference["smol"])
    assert "Paris" in got[0][0] and got[0][1] > 3
    _, memory = status(srv)
    # each rank read only its own layers (plus the shared embedding): well under the whole model
    for r in (0, 1):
        assert memory[f"rank{r}_weights"] < 0.7 * reference["smol_weights"], memory
    assert memory["rank0_weights"] + memory["rank1_weights"] > reference["smol_weights"]


# -- failures --------------------------------------------------------------------------------
def test_killed_worker_fails_fast_and_group_rebuilds(group, reference, trained_dir):
    srv, hostfile = group["srv"], group["hostfile"]
    assert load(srv, trained_dir, [f"hostfile:{hostfile}"], ContextSize=8192).success
    stream = srv.stub.PredictStream(long_request(), timeout=120)
    for i, _ in enumerate(stream):
        if i == 20:
            break
    killed = time.monotonic()
    group["worker"].kill()
    with pytest.raises(grpc.RpcError) as err:
        for _ in stream:
            pass
    elapsed = time.monotonic() - killed
    print(f"killed worker: request failed after {elapsed:.2f} s: {err.value.details()}")
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()
    assert "distributed group broken" in err.value.details() and "LoadModel" in err.value.details()
    assert elapsed < KILL_BOUND_S, elapsed
    assert srv.healthy()
    state, memory = status(srv)
    assert state == pb.StatusResponse.ERROR and memory["group_broken"] == 1
    with pytest.raises(grpc.RpcError) as err:  # later requests: the same clear error at once
        srv.stub.Predict(tiny_requests()[0][1], timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "rebuild" in err.value.details()
    group["worker"].stop()
    group["worker"] = Worker(
        hostfile, localai=True
    )  # a fresh worker; the next LoadModel rebuilds the group
    assert load(srv, trained_dir, [f"hostfile:{hostfile}"], ContextSize=8192).success
    assert status(srv)[0] == pb.StatusResponse.READY
    assert close(
        outputs(srv.stub, tiny_requests()[:1]), [reference["tiny"][0], reference["tiny"][-1]]
    )


def test_frozen_worker_times_out_and_worker_rejoins(group, reference, trained_dir):
    """SIGSTOP keeps the sockets open (an unreachable machine): only the timeout can tell."""
    srv, hostfile, worker = group["srv"], group["hostfile"], group["worker"]
    options = [f"hostfile:{hostfile}", f"distributed_timeout:{FREEZE_TIMEOUT_S}"]
    assert load(srv, trained_dir, options, ContextSize=8192).success
    stream = srv.stub.PredictStream(long_request(), timeout=120)
    for i, _ in enumerate(stream):
        if i == 20:
            break
    rank = worker.rank_pid()
    os.kill(rank, signal.SIGSTOP)
    frozen = time.monotonic()
    try:
        with pytest.raises(grpc.RpcError) as err:
            for _ in stream:
                pass
        elapsed = time.monotonic() - frozen
    finally:
        os.kill(
            rank, signal.SIGCONT
        )  # it then finds its group gone and the supervisor starts a new rank
    print(f"frozen worker: request failed after {elapsed:.2f} s: {err.value.details()}")
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()
    assert f"no answer from the other ranks for {FREEZE_TIMEOUT_S} s" in err.value.details()
    assert FREEZE_TIMEOUT_S - 0.5 < elapsed < FREEZE_TIMEOUT_S + 10, elapsed
    assert srv.healthy()
    assert status(srv)[0] == pb.StatusResponse.ERROR
    # the same worker process rejoins the next group by itself
    assert load(srv, trained_dir, [f"hostfile:{hostfile}"], ContextSize=8192).success, (
        worker.output()
    )
    assert close(
        outputs(srv.stub, tiny_requests()[:1]), [reference["tiny"][0], reference["tiny"][-1]]
    )
    assert srv.stub.Free(pb.HealthMessage()).success
    assert status(srv)[0] == pb.StatusResponse.UNINITIALIZED


def test_worker_lost_while_idle_shows_in_status(group, trained_dir):
    """Idle rank 0 pings the group (every distributed_timeout/3 s, at most 5 s): a worker that dies
    between requests turns Status to ERROR without any request."""
    srv, hostfile = group["srv"], group["hostfile"]
    assert load(srv, trained_dir, [f"hostfile:{hostfile}", "distributed_timeout:3"]).success
    group["worker"].stop()
    killed = time.monotonic()
    while status(srv)[0] != pb.StatusResponse.ERROR:
        assert time.monotonic() - killed < 15, srv.output()
        time.sleep(0.2)
    print(f"idle worker lost: Status ERROR after {time.monotonic() - killed:.2f} s")
    assert srv.healthy()
    with pytest.raises(grpc.RpcError) as err:
        srv.stub.TokenizeString(tiny_requests()[0][1], timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "a rank died" in err.value.details()
    group["worker"] = Worker(hostfile)


def test_worker_load_error_is_reported_with_its_rank(group, trained_dir, tmp_path):
    """A worker that cannot find the model: LoadModel fails with the worker's own error and rank."""
    hostfile = write_hostfile(tmp_path)
    worker = Worker(hostfile, extra=["--model-path", str(tmp_path / "no-models-here")])
    try:
        with pytest.raises(grpc.RpcError) as err:
            load(group["srv"], trained_dir, [f"hostfile:{hostfile}"])
        assert err.value.code() == grpc.StatusCode.NOT_FOUND, err.value.details()
        assert (
            err.value.details().startswith("rank 1 (127.0.0.1:")
            and "not found" in err.value.details()
        )
        assert group["srv"].healthy()
    finally:
        worker.stop()


def test_rank0_tokenizer_takes_trust_remote_code_and_eos_token(group, trained_dir, tmp_path):
    """Rank 0's tokenizer gets the Options the single-process load gives it: a tokenizer with its
    own code needs trust_remote_code (INVALID_ARGUMENT without), eos_token stops the reply."""
    folder = custom_code_copy(trained_dir, tmp_path / "custom-code")
    srv, hostfile = group["srv"], f"hostfile:{group['hostfile']}"
    with pytest.raises(grpc.RpcError) as err:
        load(srv, folder, [hostfile])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert "trust_remote_code" in err.value.details()
    assert srv.healthy()
    eos, expected = eos_option(trained_dir)
    assert load(srv, folder, [hostfile, "trust_remote_code:true", eos]).success
    request = pb.PredictOptions(Prompt=tm.COMPLETION_PROMPT, Tokens=100)
    assert srv.stub.Predict(request, timeout=60).message.decode() == expected


# -- every architecture's layer split --------------------------------------------------------
ARCHS = {
    "llama": {},
    "qwen2": {"tie_word_embeddings": True},
    "qwen3": {},
    "qwen3_moe": {
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "norm_topk_prob": True,
    },
    "gemma3_text": {"sliding_window": 4, "sliding_window_pattern": 2, "query_pre_attn_scalar": 16},
    "gpt_oss": {
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "sliding_window": 4,
        "layer_types": ["sliding_attention", "full_attention"] * 2,
    },
    "phi3": {},
    "starcoder2": {"norm_epsilon": 1e-5},
    "lfm2": {
        "norm_eps": 1e-5,
        "conv_bias": False,
        "conv_L_cache": 3,
        "block_dim": 64,
        "block_multiple_of": 16,
        "block_ffn_dim_multiplier": 1.0,
        "block_auto_adjust_ff_dim": False,
        "full_attn_idxs": [1, 3],
    },
    "qwen3_next": {
        "linear_num_value_heads": 4,
        "linear_num_key_heads": 2,
        "linear_key_head_dim": 16,
        "linear_value_head_dim": 16,
        "linear_conv_kernel_dim": 4,
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "decoder_sparse_step": 1,
        "shared_expert_intermediate_size": 32,
        "mlp_only_layers": [],
        "moe_intermediate_size": 32,
        "partial_rotary_factor": 0.5,
        "full_attention_interval": 2,
    },
}
ARCH_BASE = dict(
    hidden_size=64,
    num_hidden_layers=4,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=256,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    max_position_embeddings=512,
    tie_word_embeddings=False,
)


def build_arch_models(root: Path) -> list:
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.utils import _get_classes

    dirs = []
    for name, extra in ARCHS.items():
        config = {**ARCH_BASE, "model_type": name, **extra}
        model_class, args_class = _get_classes(config)
        model = model_class(args_class.from_dict(config))
        mx.random.seed(0)
        params = {
            k: mx.random.normal(v.shape) * 0.2 if v.ndim > 1 else v
            for k, v in tree_flatten(model.parameters())
        }
        out = root / name
        out.mkdir(parents=True)
        mx.save_safetensors(str(out / "model.safetensors"), params)
        (out / "config.json").write_text(json.dumps(config))
        dirs.append(out)
    return dirs


def arch_rank_main(dirs):
    """Run in each of 2 rank processes: the pipeline shard's logits (rank 0) vs the whole model."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache
    from mlx_lm.utils import load_model

    from mlxbackend.distributed import shard as shards

    group = mx.distributed.init(backend="ring", strict=True)
    steps = [mx.array([[1, 5, 9, 33, 2, 7, 100, 4, 3, 8]])] + [
        mx.array([[t]]) for t in (11, 12, 13, 14, 15)
    ]
    for path in map(Path, dirs):
        s = shards.load(path, group, "pipeline")
        cache, got = s.new_cache(), []
        for tokens in steps:
            out = s.forward(tokens, cache)
            s.settle(cache, out)
            if group.rank() == 0:
                mx.eval(out)
                got.append(out[0, -1])
        if group.rank() == 0:
            whole, _ = load_model(path)
            ref_cache = make_prompt_cache(whole)
            want = [whole(tokens, cache=ref_cache)[0, -1] for tokens in steps]
            diff = max(mx.abs(a - b).max().item() for a, b in zip(got, want, strict=True))
            print(json.dumps({"arch": path.name, "diff": diff, "layers": s.describe()}), flush=True)


def test_pipeline_split_is_exact_for_many_architectures(tmp_path):
    """The generic layer split (no per-model code) reproduces the single-process logits bit for
    bit: sliding windows (gemma3, gpt_oss), MoE, tied heads, conv and linear-attention hybrids."""
    dirs = build_arch_models(tmp_path / "archs")
    hostfile = write_hostfile(tmp_path)
    env = {**os.environ, "MLX_HOSTFILE": str(hostfile), "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, __file__, "--arch-rank", *map(str, dirs)]
    procs = [
        subprocess.Popen(
            cmd,
            cwd=ROOT,
            env={**env, "MLX_RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in (1, 0)
    ]
    (out0, err0), (_, err1) = procs[1].communicate(timeout=240), procs[0].communicate(timeout=60)
    assert procs[1].returncode == 0, err0[-3000:] + err1[-3000:]
    results = {r["arch"]: r for r in map(json.loads, out0.splitlines())}
    assert sorted(results) == sorted(ARCHS)
    for name, r in results.items():
        assert r["diff"] == 0.0, (name, r)


# -- units -----------------------------------------------------------------------------------
def test_hostfile_formats_and_layer_split(tmp_path):
    from mlxbackend.distributed.settings import from_options, read_hostfile
    from mlxbackend.distributed.shard import layer_range, split_layers
    from mlxbackend.errors import InvalidInput

    plain, nested = tmp_path / "a.json", tmp_path / "b.json"
    plain.write_text('["10.0.0.1:5000", "10.0.0.2:5000"]')
    nested.write_text('[["10.0.0.1:5000", "10.0.0.1:5001"], ["10.0.0.2:5000", "10.0.0.2:5001"]]')
    assert read_hostfile(str(plain)) == [["10.0.0.1:5000"], ["10.0.0.2:5000"]]
    assert read_hostfile(str(nested))[1] == ["10.0.0.2:5000", "10.0.0.2:5001"]
    s = from_options(
        {"hostfile": str(plain), "distributed_timeout": 7, "distributed_split": "10,20"}
    )
    assert (s.size, s.backend, s.mode, s.timeout, s.split) == (2, "ring", "pipeline", 7.0, [10, 20])
    os.environ["MLX_DISTRIBUTED_HOSTFILE"], os.environ["MLX_DISTRIBUTED_BACKEND"] = (
        str(nested),
        "any",
    )
    try:
        assert from_options({}).backend == "any" and from_options({}).hostfile == str(nested)
    finally:
        del os.environ["MLX_DISTRIBUTED_HOSTFILE"], os.environ["MLX_DISTRIBUTED_BACKEND"]
    with pytest.raises(InvalidInput):
        from_options({"hostfile": str(plain), "distributed_timeout": 0})
    assert split_layers(30, 2) == [15, 15] and split_layers(7, 3) == [3, 2, 2]
    # rank 0 holds the last layers (it ends with the logits), rank n-1 the first (it embeds)
    assert [layer_range([3, 2, 2], r) for r in range(3)] == [(4, 7), (2, 4), (0, 2)]
    with pytest.raises(InvalidInput):
        split_layers(1, 2)


def test_localai_run_sh_flags():
    from mlxbackend.distributed.supervisor import localai_argv

    assert localai_argv(
        ["serve", "--backend", "ring", "--hostfile", "h.json", "--rank", "1", "--worker"]
    ) == ["worker", "--backend", "ring", "--hostfile", "h.json", "--rank", "1"]
    saved = {
        k: os.environ.pop(k, None) for k in ("MLX_DISTRIBUTED_HOSTFILE", "MLX_DISTRIBUTED_BACKEND")
    }
    try:
        assert localai_argv(
            ["serve", "--rank=0", "--hostfile", "h.json", "--addr", "127.0.0.1:1"]
        ) == ["serve", "--addr", "127.0.0.1:1"]
        assert os.environ["MLX_DISTRIBUTED_HOSTFILE"] == "h.json"
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None)
            if v is not None:
                os.environ[k] = v
    assert localai_argv(["serve", "--addr", "127.0.0.1:1"]) == ["serve", "--addr", "127.0.0.1:1"]


# -- helpers for the checks above ------------------------------------------------------------
def _strip_logprobs(out):
    def strip(item):
        if isinstance(item, tuple):
            return tuple(None if isinstance(x, dict) else x for x in item)
        if isinstance(item, list) and item and isinstance(item[0], tuple):
            return [strip(c) for c in item]
        return item

    return [strip(item) for item in out]


def _logprob_values(out):
    values = []

    def walk(x):
        if isinstance(x, dict):
            for entry in x.get("content", []):
                values.append(entry["logprob"])
                values.extend(t["logprob"] for t in entry.get("top_logprobs", []))
        elif isinstance(x, (list, tuple)):
            for y in x:
                walk(y)

    walk(out)
    return values


if __name__ == "__main__" and sys.argv[1:2] == ["--arch-rank"]:
    sys.path.insert(0, str(ROOT))
    arch_rank_main(sys.argv[2:])


# -- watchdog when a blocked MLX call keeps the GIL -----------------------------------------------
WATCHDOG_CHILD = """
import ctypes, sys, threading, time
from types import SimpleNamespace
from mlxbackend.distributed import rank, rank0
if sys.argv[1] == "rank0":
    model = SimpleNamespace(since=None, broken="")
    rank0.start_watchdog(model, SimpleNamespace(timeout=1.0, workers=lambda: "rank 1 at 127.0.0.1:9"))
else:
    model = rank.Rank.__new__(rank.Rank)
    model.since, model.timeout, model.loading, model.switch = None, 1.0, False, threading.Lock()
    model.channel = SimpleNamespace(rank=1)
    threading.Thread(target=model.watch, daemon=True).start()
time.sleep(0.7)
model.since = time.monotonic()
print("blocking", flush=True)
ctypes.PyDLL(None).sleep(30)  # a C call that keeps the GIL, like a collective inside .item()
print("survived", flush=True)
"""


@pytest.mark.parametrize("role", ["rank0", "worker"])
def test_watchdog_fires_while_the_gil_is_held(role):
    """The Python watchdog cannot run while a blocked call holds the GIL; faulthandler's C watchdog,
    re-armed by it, ends the process about a second after the timeout; rank 0 has announced the
    reason on stderr first."""
    from mlxbackend.distributed.rank0 import IF_SILENT, SILENT_HEADER

    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", WATCHDOG_CHILD, role],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    elapsed = time.monotonic() - started
    assert "blocking" in done.stdout and "survived" not in done.stdout, done.stdout + done.stderr
    assert done.returncode == 1 and elapsed < 20, (done.returncode, elapsed, done.stderr)
    assert SILENT_HEADER in done.stderr and "watch" in done.stderr  # faulthandler's stack dump
    if role == "rank0":
        assert (
            f"{IF_SILENT} distributed group broken: no answer from the other ranks for 1 s"
            in done.stderr
        )


def test_parent_reports_the_announced_reason_when_faulthandler_fires():
    """The parent turns faulthandler's report into the reason rank 0 announced (and passes the
    stack dump on to its own log)."""
    import asyncio
    from types import SimpleNamespace

    from mlxbackend.distributed.group import Child
    from mlxbackend.distributed.rank0 import IF_SILENT, PHASE

    async def read(lines):
        stream = asyncio.StreamReader()
        stream.feed_data("".join(f"{line}\n" for line in lines).encode())
        stream.feed_eof()
        child = SimpleNamespace(phase="", since=0.0, reason="", if_silent="")
        await Child._read(child, stream)
        return child

    said = "distributed group broken: no answer from the other ranks for 3 s (…)"
    child = asyncio.run(
        read(
            [
                f"{PHASE} ready",
                f"{IF_SILENT} {said}",
                "Timeout (0:00:04)!",
                "Thread 0x1 (most recent call first):",
            ]
        )
    )
    assert child.reason == said and child.phase == "ready"
    child = asyncio.run(read([f"{IF_SILENT} {said}", "some log line"]))
    assert child.reason == ""


def test_calls_on_a_closed_child_channel_fail_instead_of_hanging():
    """When the rank-0 child ends, _monitor closes its channel and grpc.aio raises CancelledError in
    the calls in flight. Forwarded requests and Status must turn that into UNAVAILABLE / ERROR with
    the child's reason (re-raised, it would leave the client waiting until its deadline), while a
    cancellation of our own task (the client went away) still cancels."""
    import asyncio
    from types import SimpleNamespace

    from mlxbackend.distributed import GroupBroken
    from mlxbackend.distributed.group import DistributedGroup
    from mlxbackend.proto import backend_pb2_grpc as pb_grpc

    class Slow(pb_grpc.BackendServicer):
        async def PredictStream(self, request, context):
            for _ in range(100):
                yield pb.Reply(message=b"x")
                await asyncio.sleep(0.1)

        async def Status(self, request, context):
            await asyncio.sleep(10)
            return pb.StatusResponse(state=pb.StatusResponse.READY)

    async def main():
        async def ended(timeout):
            return True

        def group_with_child():
            """A child that 'ends' after 0.3 s: _monitor's _broken forgets it and closes its channel."""
            channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
            group = DistributedGroup(None)
            child = group.child = SimpleNamespace(
                stub=pb_grpc.BackendStub(channel),
                reason="distributed group broken: gone",
                proc=SimpleNamespace(returncode=75),
                ended=ended,
                stop=lambda grace=0: asyncio.ensure_future(channel.close()),
            )
            asyncio.get_running_loop().call_later(0.3, group._broken, child, child.reason)
            return group

        server = grpc.aio.server()
        pb_grpc.add_BackendServicer_to_server(Slow(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            group = group_with_child()
            started = time.monotonic()
            with pytest.raises(GroupBroken, match="gone"):
                async for _ in group.stream("PredictStream", pb.PredictOptions()):
                    pass
            assert time.monotonic() - started < 3 and group.child is None and "gone" in group.error
            group = group_with_child()
            reply = await asyncio.wait_for(group.status(), 5)
            assert reply.state == pb.StatusResponse.ERROR and group.child is None

            group = group_with_child()

            async def consume():
                async for _ in group.stream("PredictStream", pb.PredictOptions()):
                    pass

            task = asyncio.ensure_future(consume())
            await asyncio.sleep(0.1)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        finally:
            await server.stop(0)

    asyncio.run(main())
