"""The DiffusionKit adapter in-process: tiny random SD3 / FLUX folders in the real checkpoint layout,
loaded from disk only, generated with progress, cancellation, img2img and guidance."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip(
    "diffusionkit", reason="DiffusionKit is installed by `make install` (--no-deps)"
)

from PIL import Image  # noqa: E402

from mlxbackend.errors import Cancelled, InvalidInput, NotFound, Unsupported  # noqa: E402
from mlxbackend.image import diffusion_dir  # noqa: E402
from mlxbackend.image.generate import ImageRequest, generate, plan_request, write_png  # noqa: E402
from mlxbackend.image.pipeline import LoadSettings, free_pipeline, load_pipeline  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from tests.tiny_diffusion import build_tiny_flux, build_tiny_sd3

    root = tmp_path_factory.mktemp("diffusion")
    return {
        "sd3": build_tiny_sd3(root / "sd3"),
        "sd3-t5": build_tiny_sd3(root / "sd3-t5", t5=True),
        "flux": build_tiny_flux(root / "flux"),
        "flux-dev": build_tiny_flux(root / "flux-dev", dev=True),
    }


@pytest.fixture(scope="module")
def pipes(folders):
    loaded = {name: load_pipeline(path, LoadSettings()) for name, path in folders.items()}
    yield loaded
    for pipe in loaded.values():
        free_pipeline(pipe)


def run(pipe, **fields):
    """(pixels, plan, [(done, total)]) for one request."""
    fields.setdefault("prompt", "a photo of a red cube")
    fields.setdefault("width", 64)
    fields.setdefault("height", 64)
    fields.setdefault("steps", 2)
    fields.setdefault("seed", 7)
    plan = plan_request(pipe, ImageRequest(**fields))
    steps = []
    image = generate(pipe, plan, on_step=lambda done, total, seconds: steps.append((done, total)))
    assert image.mode == "RGB" and image.size == (plan.width, plan.height)
    return np.asarray(image), plan, steps


# -- generation -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["sd3", "sd3-t5", "flux", "flux-dev"])
def test_sizes_png_and_seeds(pipes, name, tmp_path):
    pipe = pipes[name]
    assert pipe.use_t5 == (name != "sd3")
    a, plan, steps = run(pipe, width=96, height=64)
    assert a.shape == (64, 96, 3) and a.dtype == np.uint8 and a.std() > 0
    assert steps == [(1, 2), (2, 2)] and plan.seed == 7
    dst = tmp_path / "out.png"
    dst.write_bytes(b"")  # LocalAI pre-creates dst
    write_png(Image.fromarray(a), str(dst))
    with Image.open(dst) as img:
        assert img.format == "PNG" and img.size == (96, 64)
        assert np.array_equal(np.asarray(img), a)
    assert [p.name for p in tmp_path.iterdir()] == ["out.png"]
    b, _, _ = run(pipe, width=96, height=64)
    c, _, _ = run(pipe, width=96, height=64, seed=8)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    square, _, _ = run(pipe)
    assert square.shape == (64, 64, 3)


def test_random_seed_recorded(pipes):
    a, plan_a, _ = run(pipes["sd3"], seed=0)
    b, plan_b, _ = run(pipes["sd3"], seed=-1)
    assert plan_a.seed > 0 and plan_b.seed > 0 and plan_a.seed != plan_b.seed
    assert not np.array_equal(a, b)
    again, _, _ = run(pipes["sd3"], seed=plan_a.seed)
    assert np.array_equal(a, again)  # the recorded seed reproduces the image


def test_progress_and_cancel(pipes):
    pipe = pipes["flux"]
    reference, _, steps = run(pipe, steps=3)
    assert steps == [(1, 3), (2, 3), (3, 3)]
    plan = plan_request(pipe, ImageRequest(prompt="a cube", width=64, height=64, steps=3, seed=7))
    seen = []
    with pytest.raises(Cancelled):
        generate(
            pipe, plan, on_step=lambda d, t, s: seen.append(d), is_cancelled=lambda: len(seen) >= 1
        )
    assert seen == [1]  # stopped before the second step
    with pytest.raises(Cancelled):
        generate(pipe, plan, is_cancelled=lambda: True)
    after, _, _ = run(pipe, steps=3)
    assert np.array_equal(after, reference)  # the MMDiT's modulation weights were restored


def test_nested_generation_between_steps(pipes):
    """The engine serves other requests between steps: a whole run nested in on_step must leave
    the outer run intact."""
    pipe = pipes["sd3"]
    outer_alone, _, _ = run(pipe, steps=3, seed=4)
    inner_alone, _, _ = run(pipe, steps=2, seed=9, prompt="a dog")
    plan = plan_request(
        pipe, ImageRequest(prompt="a photo of a red cube", width=64, height=64, steps=3, seed=4)
    )
    inner = []

    def on_step(done, total, seconds):
        if done == 1:
            inner.append(run(pipe, steps=2, seed=9, prompt="a dog")[0])

    outer = np.asarray(generate(pipe, plan, on_step=on_step))
    assert np.array_equal(outer, outer_alone) and np.array_equal(inner[0], inner_alone)


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_matches_diffusionkit_sample_euler(pipes, name):
    """Our step loop (modulation detached, other work allowed between steps) gives exactly the
    latent of DiffusionKit's own sample_euler + CFGDenoiser on the same inputs."""
    import mlx.core as mx

    from mlxbackend.image.generate import encode_text, sample
    from tests.tiny_diffusion import diffusionkit_sample

    pipe = pipes[name]
    plan = plan_request(
        pipe, ImageRequest(prompt="a photo of a red cube", width=64, height=64, steps=3, seed=5)
    )
    cond, pooled = encode_text(pipe, plan)
    ours = sample(pipe, plan, cond, pooled)
    cfg = plan.cfg if name == "sd3" else 0.0
    theirs, _ = diffusionkit_sample(pipe, plan, cond, pooled, cfg)
    assert cfg == 0.0 or cfg > 1.0
    assert mx.array_equal(ours, theirs).item()


def test_img2img(pipes, tmp_path):
    pipe = pipes["sd3"]
    src = tmp_path / "src.png"
    gradient = np.linspace(0, 255, 80 * 48 * 3).reshape(48, 80, 3).astype(np.uint8)
    Image.fromarray(gradient).save(src)
    half, plan, steps = run(
        pipe, src=str(src), width=0, height=0, steps=4, enable_parameters="strength:0.5"
    )
    assert half.shape == (48, 80, 3)  # the source size (multiples of 16) when width/height are 0
    assert plan.strength == 0.5 and steps == [(1, 2), (2, 2)]  # int(steps * strength)
    resized, _, steps = run(pipe, src=str(src), width=64, height=64, steps=4, strength=0.75)
    assert resized.shape == (64, 64, 3) and len(steps) == 3
    full, _, _ = run(
        pipe, src=str(src), width=64, height=64, steps=4, enable_parameters="strength:1.0"
    )
    weak, _, _ = run(
        pipe, src=str(src), width=64, height=64, steps=4, enable_parameters="strength=0.3"
    )
    assert not np.array_equal(full, weak)
    default = plan_request(pipe, ImageRequest(prompt="x", src=str(src)))
    assert default.strength == 0.75 and default.src.shape == (48, 80, 3)
    flux, _, steps = run(pipes["flux"], src=str(src), steps=4, enable_parameters="strength:0.5")
    assert flux.shape == (64, 64, 3) and len(steps) == 2


def test_sd3_guidance(pipes):
    pipe = pipes["sd3"]
    images = {}
    for cfg in (0, 1, 5):
        for negative in ("", "blurry, green"):
            pixels, plan, _ = run(
                pipe, negative_prompt=negative, enable_parameters=f"cfg_scale:{cfg}"
            )
            assert plan.cfg == cfg and plan.guided == (cfg > 1)
            images[cfg, negative] = pixels
    assert np.array_equal(images[0, ""], images[1, ""])  # cfg ≤ 1: no guidance, no crash
    assert np.array_equal(
        images[1, ""], images[1, "blurry, green"]
    )  # negative unused without guidance
    assert not np.array_equal(
        images[5, ""], images[5, "blurry, green"]
    )  # guidance uses the negative prompt
    assert not np.array_equal(images[5, ""], images[0, ""])
    assert pipe.default_cfg == 5.0 and plan_request(pipe, ImageRequest(prompt="x")).guided


def test_flux_ignores_negative_and_dev_embeds_guidance(pipes):
    flux = pipes["flux"]
    plain, _, _ = run(flux)
    negative, _, _ = run(flux, negative_prompt="blurry", enable_parameters="cfg_scale:7")
    assert np.array_equal(plain, negative)
    dev = pipes["flux-dev"]
    assert dev.guidance_in is not None and flux.guidance_in is None
    default, plan, _ = run(dev)
    assert plan.cfg == 3.5
    weak, _, _ = run(dev, enable_parameters="guidance_scale:1.0")
    assert not np.array_equal(default, weak)


def test_clip_skip(pipes):
    base, _, _ = run(pipes["sd3"])
    skipped, plan, _ = run(pipes["sd3"], clip_skip=1)
    assert plan.clip_skip == 1 and not np.array_equal(base, skipped)
    with pytest.raises(InvalidInput, match="clip_skip"):
        plan_request(pipes["sd3"], ImageRequest(prompt="x", clip_skip=5))


def test_non_ascii_prompt(pipes):
    pixels, _, _ = run(pipes["sd3-t5"], prompt="ein Würfel — 立方体 🎲")
    assert pixels.shape == (64, 64, 3)


@pytest.mark.parametrize("name", ["sd3-t5", "flux"])
def test_low_memory(folders, pipes, name):
    pipe = load_pipeline(folders[name], LoadSettings.from_options({"low_memory": True}))
    try:
        assert pipe.clip_l is None and pipe.t5 is None
        first, _, _ = run(pipe)
        assert pipe.clip_l is None and pipe.clip_g is None and pipe.t5 is None
        second, _, _ = run(pipe)
        assert np.array_equal(first, second)
        resident, _, _ = run(pipes[name])
        assert np.array_equal(first, resident)
    finally:
        free_pipeline(pipe)
    assert pipe.mmdit is None and pipe.vae_decoder is None


# -- bad requests ---------------------------------------------------------------------------------
def test_request_errors(pipes, tmp_path):
    pipe = pipes["sd3"]

    def plan(**fields):
        fields.setdefault("prompt", "a cube")
        return plan_request(pipe, ImageRequest(**fields))

    assert (plan(width=0, height=0).width, plan().height) == (64, 64)  # 0 = the model's default
    for fields, error, words in [
        (dict(prompt="  "), InvalidInput, "prompt"),
        (dict(width=100), InvalidInput, "96 or 112"),
        (dict(height=8), InvalidInput, "multiple of 16"),
        (dict(width=256), InvalidInput, "maximum of 128"),
        (dict(width=-16), InvalidInput, "width"),
        (dict(steps=-1), InvalidInput, "steps"),
        (dict(steps=1001), InvalidInput, "steps"),
        (dict(src=str(tmp_path / "missing.png")), NotFound, "missing.png"),
        (dict(ref_images=("a.png",)), Unsupported, "reference images"),
        (dict(strength=1.5), InvalidInput, "strength"),
        (dict(enable_parameters="strength:0"), InvalidInput, "strength"),
        (dict(enable_parameters="strength:abc"), InvalidInput, "strength"),
        (dict(enable_parameters="strenght:0.5"), InvalidInput, "unknown parameter"),
        (dict(enable_parameters="cfg_scale:-1"), InvalidInput, "cfg_scale"),
        (dict(enable_parameters="shift:0"), InvalidInput, "shift"),
    ]:
        with pytest.raises(error, match=words):
            plan(**fields)
    assert plan(enable_parameters="negative_prompt,num_inference_steps, shift:2").shift == 2.0
    inpaint = tmp_path / "inpaint.json"
    inpaint.write_text(json.dumps({"image": "a.png", "mask_image": "m.png"}))
    with pytest.raises(Unsupported, match="inpainting is not supported"):
        plan(src=str(inpaint))
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"not an image at all")
    with pytest.raises(InvalidInput, match="not a readable image"):
        plan(src=str(garbage))


def test_write_png_errors(tmp_path):
    image = Image.new("RGB", (16, 16), (1, 2, 3))
    with pytest.raises(InvalidInput, match="no-such-folder"):
        write_png(image, str(tmp_path / "no-such-folder" / "x.png"))
    (tmp_path / "a-file").write_text("")
    with pytest.raises(InvalidInput, match="a-file"):
        write_png(image, str(tmp_path / "a-file" / "x.png"))
    (tmp_path / "a-dir").mkdir()
    with pytest.raises(InvalidInput, match="a-dir"):
        write_png(image, str(tmp_path / "a-dir"))
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "a-dir",
        "a-file",
    ]  # no temporary files left


# -- loading --------------------------------------------------------------------------------------
def test_load_errors(folders, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(folders["sd3"], broken)
    (broken / "clip_g" / "model.fp16.safetensors").unlink()
    (broken / "tokenizer_l" / "merges.txt").unlink()
    with pytest.raises(NotFound, match="is missing") as err:
        load_pipeline(broken, LoadSettings())
    assert "clip_g/model.fp16.safetensors" in str(err.value) and "tokenizer_l/merges.txt" in str(
        err.value
    )
    with pytest.raises(NotFound, match="t5/t5xxl.safetensors"):
        load_pipeline(folders["sd3"], LoadSettings(t5=True))
    (broken / "sd3_medium.safetensors").unlink()
    with pytest.raises(NotFound, match="sd3_medium.safetensors"):
        load_pipeline(broken, LoadSettings())

    wrong = tmp_path / "wrong-config"
    shutil.copytree(folders["flux"], wrong)
    manifest = json.loads((wrong / "diffusionkit.json").read_text())
    manifest["mmdit"]["depth_unified"] = 2
    (wrong / "diffusionkit.json").write_text(json.dumps(manifest))
    with pytest.raises(
        InvalidInput, match="flux-schnell.safetensors does not hold flux MMDiT weights"
    ):
        load_pipeline(wrong, LoadSettings())
    (wrong / "ae.safetensors").write_bytes(b"\0" * 64)
    manifest["mmdit"]["depth_unified"] = 1
    (wrong / "diffusionkit.json").write_text(json.dumps(manifest))
    with pytest.raises(InvalidInput, match="ae.safetensors"):
        load_pipeline(wrong, LoadSettings())

    with pytest.raises(InvalidInput, match="pipeline type 'FluxPipeline'"):
        load_pipeline(folders["sd3"], LoadSettings(pipeline_type="FluxPipeline"))
    with pytest.raises(InvalidInput, match="not supported"):
        load_pipeline(folders["sd3"], LoadSettings(pipeline_type="StableDiffusionXLPipeline"))
    with pytest.raises(NotFound):
        load_pipeline(tmp_path / "nowhere", LoadSettings())


def test_settings_from_options():
    s = LoadSettings.from_options(
        {
            "scheduler": "FlowMatchEulerDiscreteScheduler",
            "cfg_scale": 4,
            "low_memory": "true",
            "dtype": "bf16",
            "shift": 2.5,
            "t5": False,
            "steps": 8,
            "strength": 0.6,
            "store_path": "ignored",
        },
        pipeline_type="sd3",
        cfg_scale=0.0,
        clip_skip=0,
        low_memory=False,
    )
    assert (
        s.scheduler,
        s.cfg_scale,
        s.low_memory,
        s.dtype,
        s.shift,
        s.t5,
        s.steps,
        s.strength,
    ) == ("FlowMatchEulerDiscreteScheduler", 4.0, True, "bf16", 2.5, False, 8, 0.6)
    assert (
        LoadSettings.from_options({"cfg_scale": 4}, cfg_scale=6.0).cfg_scale == 6.0
    )  # set fields win
    for scheduler in ("", "euler", "K_EULER", "flow_match_euler"):
        LoadSettings.from_options({}, scheduler=scheduler)
    for options, fields_, words in [
        ({}, dict(scheduler="DPMSolverMultistepScheduler"), "flow_match_euler"),
        ({"cfg_scale": "high"}, {}, "cfg_scale"),
        ({"low_memory": "maybe"}, {}, "low_memory"),
        ({"dtype": "int8"}, {}, "dtype"),
        ({"steps": 2.5}, {}, "steps"),
        ({"strength": 2}, {}, "strength"),
        ({}, dict(pipeline_type="KandinskyPipeline"), "KandinskyPipeline"),
    ]:
        with pytest.raises(InvalidInput, match=words):
            LoadSettings.from_options(options, **fields_)


def test_settings_reach_the_pipeline(folders):
    options = {"t5": False, "steps": 3, "strength": 0.5, "cfg_scale": 1}
    pipe = load_pipeline(folders["sd3-t5"], LoadSettings.from_options(options))
    try:
        assert not pipe.use_t5 and pipe.t5 is None and pipe.default_steps == 3
        plan = plan_request(pipe, ImageRequest(prompt="x"))
        assert plan.steps == 3 and not plan.guided
    finally:
        free_pipeline(pipe)


def test_diffusion_dir(folders, tmp_path):
    sd3 = folders["sd3"]
    assert diffusion_dir(sd3.name, model_path=str(sd3.parent)) == sd3
    assert diffusion_dir(str(sd3)) == sd3
    assert diffusion_dir("ignored", model_file=str(sd3 / "sd3_medium.safetensors")) == sd3
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "config.json").write_text("{}")
    assert diffusion_dir(str(plain)) is None
    assert (
        diffusion_dir(str(plain), pipeline_type="StableDiffusion3Pipeline") == plain
    )  # load names what is missing
    assert diffusion_dir("some/hub-id") is None and diffusion_dir(str(tmp_path / "absent")) is None


# -- isolation ------------------------------------------------------------------------------------
def test_no_hub_calls(folders, monkeypatch):
    import huggingface_hub

    from mlxbackend.image.compat import import_diffusionkit

    dk = import_diffusionkit()

    def refuse(*args, **kwargs):
        raise AssertionError(f"hub access: {args} {kwargs}")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", refuse)
    monkeypatch.setattr(dk.model_io, "hf_hub_download", refuse)
    for name in ("sd3-t5", "flux"):
        pipe = load_pipeline(folders[name], LoadSettings())
        run(pipe, src="", steps=1)
        free_pipeline(pipe)


def test_no_torch_or_coremltools(folders):
    code = f"""
import sys
sys.path.insert(0, {str(ROOT)!r})
from mlxbackend.image.compat import import_diffusionkit
import_diffusionkit()
from mlxbackend.image.pipeline import LoadSettings, load_pipeline
from mlxbackend.image.generate import ImageRequest, generate, plan_request
for folder in {[str(folders["sd3-t5"]), str(folders["flux"])]!r}:
    pipe = load_pipeline(folder, LoadSettings())
    generate(pipe, plan_request(pipe, ImageRequest(prompt="a cube", width=64, height=64, steps=1, seed=1)))
stubs = ("argmaxtools.utils", "argmaxtools.test_utils", "diffusionkit.utils", "beartype")
print(sorted(m for m in ("torch", "coremltools", "transformers", *stubs) if m in sys.modules))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout
