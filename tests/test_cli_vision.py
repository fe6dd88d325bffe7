"""`mlxbackend chat "question" --image FILE` against a running backend: a tiny random VLM answers,
a text-only model refuses the image naming itself, a missing file is a clear error."""

import subprocess

import pytest

from mlxbackend.proto import backend_pb2 as pb
from tests.conftest import Server, run_cli
from tests.tiny_vlm import FAMILIES

QUESTION = "What is in this picture?"


def write_png(path):
    from PIL import Image

    image = Image.new("RGB", (48, 32), "white")
    image.paste((255, 0, 0), (12, 8, 36, 24))
    image.save(path, "PNG")
    return path


def chat(addr: str, *args: str) -> subprocess.CompletedProcess:
    return run_cli("chat", "--addr", addr, "--max-tokens", "8", *args, timeout=180)


def served(folder) -> Server:
    srv = Server()
    reply = srv.stub.LoadModel(
        pb.ModelOptions(Model=folder.name, ModelPath=str(folder.parent)), timeout=120
    )
    assert reply.success, reply.message
    return srv


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    return write_png(tmp_path_factory.mktemp("img") / "red-square.png")


def test_chat_with_an_image_answers(tmp_path, image):
    folder = FAMILIES["qwen2_5_vl"](tmp_path / "m")
    srv = served(folder)
    try:
        out = chat(srv.addr, QUESTION, "--image", str(image), "--image", str(image), "-v")
        assert out.returncode == 0, out.stdout + out.stderr
        assert out.stdout.strip(), out.stderr
        assert "tokens" in out.stdout  # -v: token counts of the final chunk
        counters = dict(srv.stub.Status(pb.HealthMessage(), timeout=10).memory.breakdown)
        assert counters["media_prompts_encoded"] == 1  # the image really went in
        missing = chat(srv.addr, QUESTION, "--image", str(tmp_path / "nope.png"))
        assert missing.returncode == 1
        assert "--image" in missing.stderr and "nope.png" in missing.stderr
        assert "No such file" in missing.stderr
        assert srv.healthy()
    finally:
        srv.stop()


def test_chat_with_an_image_to_a_text_model_names_it(tiny_dir, image):
    srv = served(tiny_dir)
    try:
        out = chat(srv.addr, QUESTION, "--image", str(image))
        assert out.returncode == 1, out.stdout + out.stderr
        assert "INVALID_ARGUMENT" in out.stdout and tiny_dir.name in out.stdout, out.stdout
        assert "1 image" in out.stdout
    finally:
        srv.stop()
