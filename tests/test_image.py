"""GenerateImage over gRPC with tiny random SD3 and FLUX DiffusionKit folders built by the tests."""

import concurrent.futures as cf
import hashlib
import json
import subprocess
import sys
import time

import grpc
import pytest

from mlxbackend.proto import backend_pb2 as pb
from tests.conftest import Server

pytest.importorskip(
    "diffusionkit", reason="DiffusionKit is installed by `make install` (--no-deps)"
)
from PIL import Image  # noqa: E402


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from tests.tiny_diffusion import build_tiny_flux, build_tiny_sd3

    root = tmp_path_factory.mktemp("diffusion")
    return {"sd3": build_tiny_sd3(root / "tiny-sd3"), "flux": build_tiny_flux(root / "tiny-flux")}


@pytest.fixture(scope="module")
def sd3_server(folders):
    srv = Server()
    reply = srv.stub.LoadModel(
        pb.ModelOptions(
            Model=folders["sd3"].name,
            ModelPath=str(folders["sd3"].parent),
            CFGScale=5.0,
        )
    )
    assert reply.success and "MLX image model loaded successfully" in reply.message, reply.message
    yield srv
    srv.stop()


def digest(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def generate(srv, dst, **fields):
    dst.write_bytes(b"")  # LocalAI pre-creates the file
    fields.setdefault("positive_prompt", "a red cube on a table")
    reply = srv.stub.GenerateImage(pb.GenerateImageRequest(dst=str(dst), **fields), timeout=300)
    assert reply.success, reply.message
    return reply


def test_png_size_and_seed_determinism(sd3_server, tmp_path):
    a, b, c = tmp_path / "a.png", tmp_path / "b.png", tmp_path / "c.png"
    reply = generate(sd3_server, a, width=64, height=96, step=2, seed=7)
    assert "seed 7" in reply.message and "2 steps" in reply.message
    with Image.open(a) as img:
        assert img.format == "PNG" and img.size == (64, 96)
    generate(sd3_server, b, width=64, height=96, step=2, seed=7)
    generate(sd3_server, c, width=64, height=96, step=2, seed=8)
    assert digest(a) == digest(b) != digest(c)
    assert not [
        p for p in tmp_path.iterdir() if ".tmp" in p.name
    ]  # atomic write left nothing behind


def test_random_seed_and_negative_prompt(sd3_server, tmp_path):
    one, two = tmp_path / "1.png", tmp_path / "2.png"
    r1 = generate(sd3_server, one, width=64, height=64, step=2, seed=0)
    r2 = generate(sd3_server, two, width=64, height=64, step=2, seed=-1)
    assert digest(one) != digest(two) and "seed" in r1.message and r1.message != r2.message
    plain, negative = tmp_path / "p.png", tmp_path / "n.png"
    generate(sd3_server, plain, width=64, height=64, step=2, seed=3)
    generate(
        sd3_server, negative, width=64, height=64, step=2, seed=3, negative_prompt="blurry, green"
    )
    assert digest(plain) != digest(negative)  # guidance (CFGScale 5) uses the negative prompt


def test_img2img(sd3_server, tmp_path):
    src = tmp_path / "src.png"
    Image.new("RGB", (80, 48), (200, 30, 30)).save(src)
    out, weak = tmp_path / "out.png", tmp_path / "weak.png"
    reply = generate(sd3_server, out, src=str(src), step=4, seed=5, EnableParameters="strength:1.0")
    with Image.open(out) as img:
        assert img.size == (
            80,
            48,
        )  # the source size (a multiple of 16) when width/height are unset
    generate(sd3_server, weak, src=str(src), step=4, seed=5, EnableParameters="strength:0.5")
    assert digest(out) != digest(weak)
    assert "4 steps" in reply.message


@pytest.mark.parametrize(
    "fields, code, words",
    [
        (dict(width=100, height=64), grpc.StatusCode.INVALID_ARGUMENT, "16"),
        (dict(width=64, height=64, positive_prompt=""), grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
        (dict(width=64 * 1024, height=64), grpc.StatusCode.INVALID_ARGUMENT, "width"),
        (dict(src="/nonexistent/src.png"), grpc.StatusCode.NOT_FOUND, "src"),
        (dict(ref_images=["/tmp/x.png"]), grpc.StatusCode.UNIMPLEMENTED, "reference"),
        (dict(dst="/nonexistent-dir/out.png"), grpc.StatusCode.INVALID_ARGUMENT, "nonexistent-dir"),
        (dict(dst=""), grpc.StatusCode.INVALID_ARGUMENT, "dst"),
        (dict(EnableParameters="strength:7"), grpc.StatusCode.INVALID_ARGUMENT, "strength"),
    ],
)
def test_bad_inputs(sd3_server, tmp_path, fields, code, words):
    request = dict(positive_prompt="a cube", dst=str(tmp_path / "x.png"), step=1, seed=1)
    request.update(fields)
    with pytest.raises(grpc.RpcError) as err:
        sd3_server.stub.GenerateImage(pb.GenerateImageRequest(**request), timeout=120)
    assert err.value.code() == code, err.value.details()
    assert words.lower() in err.value.details().lower()
    assert sd3_server.healthy()
    if request["dst"].startswith(str(tmp_path)):
        assert not (tmp_path / "x.png").exists()


def test_inpainting_src_refused(sd3_server, tmp_path):
    src = tmp_path / "inpaint.json"
    src.write_text(json.dumps({"image": "", "mask_image": ""}))
    with pytest.raises(grpc.RpcError) as err:
        generate(sd3_server, tmp_path / "o.png", src=str(src))
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED and "inpainting" in err.value.details()


def test_health_during_generation_and_cancel(sd3_server, tmp_path):
    """Health answers while an image is generated; a cancelled call stops at the next step."""
    dst = tmp_path / "long.png"
    dst.write_bytes(b"")
    call = sd3_server.stub.GenerateImage.future(
        pb.GenerateImageRequest(
            positive_prompt="a cube",
            dst=str(dst),
            width=64,
            height=64,
            step=400,
            seed=1,
        ),
        timeout=600,
    )
    time.sleep(1.0)
    started = time.monotonic()
    assert sd3_server.healthy() and time.monotonic() - started < 1.0
    call.cancel()
    time.sleep(0.5)
    reply = generate(sd3_server, tmp_path / "after.png", width=64, height=64, step=1, seed=1)
    assert reply.success  # the worker was free again: the cancelled run had stopped
    assert dst.read_bytes() == b""  # nothing written for the cancelled request


def test_flux_and_concurrent_requests(folders, tmp_path):
    srv = Server()
    try:
        reply = srv.stub.LoadModel(
            pb.ModelOptions(Model=str(folders["flux"]), PipelineType="FluxPipeline")
        )
        assert reply.success and "flux" in reply.message, reply.message
        outs = [tmp_path / f"{i}.png" for i in range(3)]
        for p in outs:
            p.write_bytes(b"")
        with cf.ThreadPoolExecutor(3) as pool:
            replies = list(
                pool.map(
                    lambda p: srv.stub.GenerateImage(
                        pb.GenerateImageRequest(
                            positive_prompt="a cube",
                            dst=str(p),
                            width=64,
                            height=64,
                            step=2,
                            seed=11,
                        ),
                        timeout=300,
                    ),
                    outs,
                )
            )
        assert all(r.success for r in replies)
        assert len({digest(p) for p in outs}) == 1  # same seed, same image, also when concurrent
        status = srv.stub.Status(pb.HealthMessage())
        assert status.state == pb.StatusResponse.READY
        assert srv.stub.Free(pb.HealthMessage()).success
        with pytest.raises(grpc.RpcError) as err:
            srv.stub.GenerateImage(pb.GenerateImageRequest(positive_prompt="x", dst=str(outs[0])))
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    finally:
        srv.stop()


def test_missing_weights(folders, tmp_path, server):
    import shutil

    broken = tmp_path / "broken-sd3"
    shutil.copytree(folders["sd3"], broken)
    for f in broken.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(grpc.RpcError) as err:
        server.stub.LoadModel(pb.ModelOptions(Model=str(broken), PipelineType="sd3"))
    assert err.value.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT)
    assert server.healthy()


def test_cli_image(folders, tmp_path):
    out = tmp_path / "cli.png"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "mlxbackend",
            "image",
            "a cube",
            "-o",
            str(out),
            "--model",
            str(folders["flux"]),
            "--steps",
            "2",
            "--seed",
            "3",
            "--width",
            "64",
            "--height",
            "64",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    with Image.open(out) as img:
        assert img.size == (64, 64)
    assert "wrote" in run.stderr
