"""Quantized SmolLM2-135M-Instruct still knows the capital of France: a quantization job over
gRPC (StartQuantization + QuantizationProgress) to q4_k_m GGUF, answered by llama.cpp, and to
mlx-q4, loaded back into the backend and answered by Predict. Both greedy.

The question is asked with a short system message. With no system message (the template then adds
SmolLM's default one) the float32 model's first answer token wins by only ~0.1 logit ("The" vs
"L"), and llama.cpp running even the bundled Q4_1 GGUF greedily answers "L'Étoile, …"; with
SYSTEM, float32, Q4_1 and q4_k_m in llama.cpp answer "The capital of France is Paris.". mlx-q4 is
the default recipe (quantize/recipe.py: Q4_K_M's layer bits, searched scales, group 32); the plain
min/max 4-bit at group 64 (`mlx-q4-plain`, +26 % perplexity on held-out prose) answers "Le Canard
Athos, …" even with SYSTEM (see scripts/quantize_report.py --ask)."""

import llama_cpp
import pytest

from mlxbackend.client import chat_request
from mlxbackend.proto import backend_pb2 as pb
from tests.conftest import Server

QUESTION = "What is the capital of France?"
SYSTEM = "Answer the question in one short sentence."
MESSAGES = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}]
TERMINAL = ("completed", "failed", "stopped")


@pytest.fixture(scope="module")
def qserver(tmp_path_factory):
    srv = Server(env={"MLXB_JOBS_DIR": str(tmp_path_factory.mktemp("jobs"))})
    yield srv
    srv.stop()


def quantize(srv, model, qtype, out, job_id, **options):
    """Run one job to its end; returns the final QuantizationProgressUpdate."""
    reply = srv.stub.StartQuantization(
        pb.QuantizationRequest(
            model=str(model),
            quantization_type=qtype,
            output_dir=str(out),
            job_id=job_id,
            extra_options=options,
        )
    )
    assert reply.success and reply.job_id == job_id, reply.message
    last = None
    for last in srv.stub.QuantizationProgress(
        pb.QuantizationProgressRequest(job_id=job_id), timeout=240
    ):
        if last.status in TERMINAL:
            break
    assert last is not None and last.status == "completed", (last, srv.output()[-3000:])
    return last


@pytest.mark.slow
def test_q4_k_m_gguf_answers_paris(qserver, smollm2_dir, tmp_path):
    final = quantize(qserver, smollm2_dir, "q4_k_m", tmp_path / "gguf", "smollm2-q4_k_m")
    gguf = tmp_path / "gguf" / f"{smollm2_dir.name}-q4_k_m.gguf"
    assert final.output_file == str(gguf) and gguf.read_bytes()[:4] == b"GGUF"
    assert final.extra_metrics["compression_ratio"] > 3  # float32 -> ~4.5-5 bits per weight
    llm = llama_cpp.Llama(model_path=final.output_file, n_ctx=512, n_threads=2, verbose=False)
    try:
        assert llm.metadata["general.file_type"] == "15"  # LLAMA_FTYPE_MOSTLY_Q4_K_M
        out = llm.create_chat_completion(
            messages=MESSAGES, max_tokens=32, temperature=0.0, top_k=1, seed=0
        )
        answer = out["choices"][0]["message"]["content"]
    finally:
        llm.close()
    assert "Paris" in answer, answer


@pytest.mark.slow
def test_mlx_q4_loads_and_answers_paris(qserver, smollm2_dir, tmp_path):
    final = quantize(qserver, smollm2_dir, "mlx-q4", tmp_path / "mlx", "smollm2-mlx-q4")
    folder = tmp_path / "mlx" / f"{smollm2_dir.name}-mlx-q4"
    assert final.output_file == str(folder) and (folder / "config.json").is_file()
    assert final.extra_metrics["compression_ratio"] > 3
    loaded = qserver.stub.LoadModel(pb.ModelOptions(Model=final.output_file, ContextSize=1024))
    assert loaded.success, loaded.message
    request = chat_request(QUESTION, max_tokens=32, temperature=0.0)
    del request.Messages[:]
    request.Messages.extend(pb.Message(**m) for m in MESSAGES)
    reply = qserver.stub.Predict(request, timeout=120)
    answer = reply.message.decode()
    assert "Paris" in answer, answer
