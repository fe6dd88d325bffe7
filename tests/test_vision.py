"""Vision-language models through gRPC (a real server started as LocalAI does) against mlx-vlm's
own generate on the same inputs: tiny random VLMs of several families built in their real
checkpoint layouts (tests/tiny_vlm.py)."""

import base64
import io
import json
from concurrent.futures import ThreadPoolExecutor

import grpc
import jsonschema
import numpy as np
import pytest

from mlxbackend.proto import backend_pb2 as pb
from tests.conftest import Server
from tests.tiny_vlm import FAMILIES

QUESTION = "What is in this picture?"
MAX_TOKENS = 10
VIDEO_FAMILIES = ("qwen2_5_vl",)
IMAGE_FAMILIES = [f for f in ("qwen2_5_vl", "gemma3", "smolvlm", "gemma4") if f in FAMILIES]


def png(seed: int, size=(40, 30)) -> bytes:
    from PIL import Image

    pixels = (np.random.RandomState(seed).rand(size[1], size[0], 3) * 255).astype("uint8")
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def mp4(frames: int = 8, fps: int = 4, size=(64, 48)) -> bytes:
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        stream = out.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        rng = np.random.RandomState(3)
        for _ in range(frames):
            pixels = (rng.rand(size[1], size[0], 3) * 255).astype("uint8")
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()


def request(question=QUESTION, images=(), videos=(), history=(), **kw) -> pb.PredictOptions:
    messages = [pb.Message(role=r, content=c) for r, c in history]
    messages.append(pb.Message(role="user", content=question))
    kw.setdefault("Tokens", MAX_TOKENS)
    kw.setdefault("Temperature", 0.0)
    return pb.PredictOptions(
        Messages=messages,
        UseTokenizerTemplate=True,
        Images=[b64(i) for i in images],
        Videos=[b64(v) for v in videos],
        **kw,
    )


class Reference:
    """mlx-vlm's own load + stream_generate on a checkpoint folder (in the test process)."""

    def __init__(self, folder):
        from mlx_vlm.utils import load

        self.model, self.processor = load(str(folder))

    def prompt(
        self, question: str, n_images: int = 0, n_videos: int = 0, n_audios=0, system: str = ""
    ) -> str:
        """The model's own chat template on HF content parts (media first, then the text)."""
        parts = [{"type": "video"}] * n_videos + [{"type": "image"}] * n_images
        parts += [{"type": "audio"}] * n_audios
        content = [*parts, {"type": "text", "text": question}]
        template = getattr(self.processor, "chat_template", None)
        messages = [{"role": "system", "content": system}] if system else []
        return self.processor.tokenizer.apply_chat_template(
            [*messages, {"role": "user", "content": content}], chat_template=template or None,
            add_generation_prompt=True, tokenize=False,
        )  # fmt: skip

    def generate(
        self, question=QUESTION, images=(), video=None, audio=None, max_tokens=MAX_TOKENS, system=""
    ):
        """(text, [logprob of each generated token]) greedily, stopping at EOS as we do."""
        from mlx_vlm.generate import stream_generate
        from PIL import Image

        pil = [Image.open(io.BytesIO(i)).convert("RGB") for i in images]
        kwargs = {}
        if video is not None:
            frames, meta = video
            kwargs = {"video": [frames], "video_metadata": [meta]}
        if audio is not None:
            kwargs["audio"] = [audio]
        prompt = self.prompt(
            question, len(pil), 1 if video is not None else 0, 1 if audio is not None else 0,
            system,
        )  # fmt: skip
        eos = set(self.processor.tokenizer.stopping_criteria.eos_token_ids)
        tokens, logprobs = [], []
        for r in stream_generate(
            self.model, self.processor, prompt, image=pil or None, max_tokens=max_tokens,
            temperature=0.0, **kwargs,
        ):  # fmt: skip
            if r.token in eos or len(tokens) == max_tokens:
                break
            tokens.append(r.token)
            logprobs.append(float(r.logprobs[r.token]))
        text = self.processor.tokenizer.decode(tokens, skip_special_tokens=False)
        return text, logprobs


def our_logprobs(reply) -> list:
    return [entry["logprob"] for entry in json.loads(reply.logprobs)["content"]]


@pytest.fixture(scope="module", params=IMAGE_FAMILIES)
def vlm(request, tmp_path_factory):
    folder = FAMILIES[request.param](tmp_path_factory.mktemp("vlm") / f"tiny-{request.param}")
    srv = Server()
    reply = srv.stub.LoadModel(
        pb.ModelOptions(Model=folder.name, ModelPath=str(folder.parent), Options=["max_batch:16"]),
        timeout=120,
    )
    assert reply.success, reply.message
    assert "vision-language" in reply.message and "image" in reply.message, reply.message
    yield request.param, folder, srv, Reference(folder)
    srv.stop()


def test_greedy_equals_mlx_vlm(vlm):
    """Image prompt and text-only prompt: the same text and per-token logprobs as mlx-vlm."""
    family, _, srv, ref = vlm
    image = png(1)
    reply = srv.stub.Predict(request(images=[image], Logprobs=1), timeout=120)
    text, logprobs = ref.generate(images=[image])
    assert reply.message.decode() == text, family
    assert np.allclose(our_logprobs(reply), logprobs, atol=2e-3), (our_logprobs(reply), logprobs)
    plain = srv.stub.Predict(request("Tell me a story."), timeout=120)
    assert plain.message.decode() == ref.generate("Tell me a story.")[0]


def test_stream_equals_unary(vlm):
    _, _, srv, _ = vlm
    req = request(images=[png(2)])
    unary = srv.stub.Predict(req, timeout=120).message.decode()
    streamed = "".join(c.message.decode() for c in srv.stub.PredictStream(req, timeout=120))
    assert streamed == unary


def test_concurrent_mixed_batch_equals_solo(vlm):
    """8 requests at once, text-only and image prompts mixed in one continuous batch: each the
    same as when it runs alone."""
    _, _, srv, _ = vlm
    requests = [
        request(images=[png(10 + i % 3)], Tokens=8 + i) if i % 2 == 0 else
        request(f"Say something about the number {i}.", Tokens=8 + i)
        for i in range(8)
    ]  # fmt: skip
    solo = [srv.stub.Predict(r, timeout=120).message for r in requests]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda r: srv.stub.Predict(r, timeout=300).message, requests))
    assert together == solo


def test_seeded_sampling_reproducible(vlm):
    _, _, srv, _ = vlm
    req = request(images=[png(4)], Temperature=1.0, Seed=1234, Tokens=12)
    first = srv.stub.Predict(req, timeout=120).message
    assert srv.stub.Predict(req, timeout=120).message == first


def test_json_schema_output_is_valid(vlm):
    _, _, srv, _ = vlm
    schema = {
        "type": "object",
        "properties": {"color": {"enum": ["red", "green", "blue"]}, "count": {"enum": [1, 2, 3]}},
        "required": ["color", "count"],
        "additionalProperties": False,
    }
    # room for the whitespace llguidance allows between tokens (a random model loves it)
    req = request(images=[png(5)], Tokens=400, Metadata={"json_schema": json.dumps(schema)})
    jsonschema.validate(json.loads(srv.stub.Predict(req, timeout=120).message), schema)


def counters(srv) -> dict:
    return dict(srv.stub.Status(pb.HealthMessage(), timeout=10).memory.breakdown)


def test_second_turn_reuses_the_image_prefix(vlm):
    """A second turn about the same image neither re-encodes it nor re-prefills the first turn:
    the server's counters and GetMetrics show it; a different image is encoded."""
    _, _, srv, _ = vlm
    image = png(6)
    first = srv.stub.Predict(request(images=[image]), timeout=120)
    before = counters(srv)
    history = [("user", QUESTION), ("assistant", first.message.decode())]
    # LocalAI sends all media again with the history; a marker keeps the image on the first turn
    history[0] = ("user", "<__media__>" + QUESTION)
    srv.stub.Predict(request("And the colors?", images=[image], history=history), timeout=120)
    after = counters(srv)
    assert after["media_prompts_from_cache"] == before["media_prompts_from_cache"] + 1
    assert after["media_prompts_encoded"] == before["media_prompts_encoded"]
    warm = srv.stub.GetMetrics(pb.MetricsRequest(), timeout=10).prompt_tokens_processed
    # the same second turn about another image: everything is computed
    srv.stub.Predict(request("And the colors?", images=[png(7)], history=history), timeout=120)
    cold = srv.stub.GetMetrics(pb.MetricsRequest(), timeout=10).prompt_tokens_processed
    assert counters(srv)["media_prompts_encoded"] == after["media_prompts_encoded"] + 1
    assert 0 < warm and cold - warm >= 20, (warm, cold)  # the first turn was not prefilled again


def test_same_image_new_conversation_skips_the_tower(vlm):
    """The vision-feature cache: the same image in a new conversation (another system prompt, so
    no prefix to reuse) runs no vision tower, and the answer is still mlx-vlm's."""
    _, _, srv, ref = vlm
    image = png(21)
    srv.stub.Predict(request(images=[image]), timeout=120)
    before = counters(srv)
    system = "You are a terse assistant."
    new = request("Describe the colors.", images=[image], history=[("system", system)], Logprobs=1)
    reply = srv.stub.Predict(new, timeout=120)
    after = counters(srv)
    assert after["vision_cache_hits"] == before["vision_cache_hits"] + 1, sorted(after.items())
    assert after["vision_tower_runs"] == before["vision_tower_runs"]
    assert 0 < after["vision_cache"] <= after["vision_cache_budget"]
    text, logprobs = ref.generate("Describe the colors.", images=[image], system=system)
    assert reply.message.decode() == text
    assert np.allclose(our_logprobs(reply), logprobs, atol=2e-3)


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    folder = FAMILIES["qwen2_5_vl"](tmp_path_factory.mktemp("vlm") / "tiny-qwen-limits")
    srv = Server()
    reply = srv.stub.LoadModel(
        pb.ModelOptions(
            Model=folder.name, ModelPath=str(folder.parent), LimitImagePerPrompt=2,
            LimitVideoPerPrompt=1,
        ),
        timeout=120,
    )  # fmt: skip
    assert reply.success, reply.message
    yield folder, srv
    srv.stop()


def test_video_equals_mlx_vlm(qwen):
    """A video (mp4 bytes, frames sampled with PyAV at Options video_fps) gives mlx-vlm's output
    on the same frames."""
    from mlxbackend.vision.media import load_video

    folder, srv = qwen
    video = mp4()
    reply = srv.stub.Predict(request("What happens?", videos=[video], Logprobs=1), timeout=120)
    sampled = load_video(b64(video), "video", 2.0, 32)
    meta = {"total_num_frames": sampled.total_frames, "fps": sampled.fps,
            "frames_indices": sampled.indices}  # fmt: skip
    text, logprobs = Reference(folder).generate(
        "What happens?", video=(sampled.frames.transpose(0, 3, 1, 2), meta)
    )
    assert reply.message.decode() == text
    assert np.allclose(our_logprobs(reply), logprobs, atol=2e-3)


def wav(seconds: float = 0.6, rate: int = 22050) -> bytes:
    """A WAV at another sample rate than the model's 16 kHz (the server resamples)."""
    import wave

    t = np.arange(int(seconds * rate)) / rate
    samples = (0.3 * np.sin(2 * np.pi * 330 * t) * 32767).astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(rate)
        w.writeframes(samples.tobytes())
    return buf.getvalue()


@pytest.mark.skipif("gemma4" not in FAMILIES, reason="no audio family builder")
def test_audio_input_equals_mlx_vlm(tmp_path):
    """Audio in the prompt (Gemma 4's audio tower): a WAV decoded and resampled to 16 kHz by
    PyAV gives mlx-vlm's output on the same samples."""
    from mlxbackend.vision.media import load_audio

    folder = FAMILIES["gemma4"](tmp_path / "tiny-gemma4")
    srv = Server()
    try:
        reply = srv.stub.LoadModel(
            pb.ModelOptions(Model=folder.name, ModelPath=str(folder.parent)), timeout=120
        )
        assert reply.success and "audio" in reply.message, reply.message
        sound = wav()
        req = request("What do you hear?", Audios=[b64(sound)], Logprobs=1)
        reply = srv.stub.Predict(req, timeout=120)
        samples = load_audio(b64(sound), "audio")
        assert abs(len(samples) - 0.6 * 16000) <= 160
        text, logprobs = Reference(folder).generate("What do you hear?", audio=samples)
        assert reply.message.decode() == text
        assert np.allclose(our_logprobs(reply), logprobs, atol=2e-3)
    finally:
        srv.stop()


def test_model_metadata_reports_media_marker(qwen):
    _, srv = qwen
    meta = srv.stub.ModelMetadata(pb.ModelOptions(), timeout=10)
    assert meta.media_marker == "<__media__>"


def test_go_templated_prompt_with_marker(qwen):
    """A raw Prompt with LocalAI's marker: the image goes where the marker is."""
    folder, srv = qwen
    ref = Reference(folder)
    image = png(8)
    chat = ref.prompt(QUESTION, n_images=1)
    templated = chat.replace("<|vision_start|><|image_pad|><|vision_end|>", "<__media__>")
    assert "<__media__>" in templated
    raw = srv.stub.Predict(
        pb.PredictOptions(Prompt=templated, Images=[b64(image)], Tokens=MAX_TOKENS), timeout=120
    )
    assert raw.message.decode() == ref.generate(images=[image])[0]


def invalid(srv, req) -> str:
    with pytest.raises(grpc.RpcError) as err:
        srv.stub.Predict(req, timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert srv.healthy()
    return err.value.details()


def test_bad_media_are_invalid_argument(qwen):
    _, srv = qwen
    assert "base64" in invalid(srv, pb.PredictOptions(Prompt="x", Images=["not base64!!"]))
    assert "image" in invalid(srv, request(images=[b"hello, not an image"]))
    assert "video" in invalid(srv, request(videos=[b"\x00\x00\x00\x18ftypmp42 corrupt"]))
    assert "empty" in invalid(srv, pb.PredictOptions(Prompt="x", Videos=[""]))
    assert "audio" in invalid(srv, request(Audios=[b64(b"RIFF....WAVE")]))
    assert "limit of 2" in invalid(srv, request(images=[png(1), png(2), png(3)]))
    assert "limit of 1" in invalid(srv, request(videos=[mp4(2), mp4(2)]))
    assert "not both" in invalid(srv, request(images=[png(1)], videos=[mp4(2)]))
    data_uri = "data:image/png;base64," + b64(png(9))
    ok = srv.stub.Predict(
        pb.PredictOptions(
            Messages=[pb.Message(role="user", content=QUESTION)], UseTokenizerTemplate=True,
            Images=[data_uri], Tokens=4,
        ),
        timeout=120,
    )  # fmt: skip
    assert ok.message


def test_media_to_a_text_model_is_invalid_argument(tiny_dir):
    srv = Server()
    try:
        reply = srv.stub.LoadModel(
            pb.ModelOptions(Model=tiny_dir.name, ModelPath=str(tiny_dir.parent)), timeout=120
        )
        assert reply.success, reply.message
        details = invalid(srv, request(images=[png(1)]))
        assert tiny_dir.name in details and "1 image" in details
    finally:
        srv.stop()


def test_saved_prompt_cache_keeps_media_prefixes(tmp_path):
    """Options prompt_cache_dir: an image conversation's KV (with Qwen's position shift) is saved
    on Free and reused after the next LoadModel; the output is the same as computed afresh."""
    folder = FAMILIES["qwen2_5_vl"](tmp_path / "tiny-qwen-saved")
    load = pb.ModelOptions(
        Model=folder.name, ModelPath=str(folder.parent),
        Options=[f"prompt_cache_dir:{tmp_path / 'kv'}"],
    )  # fmt: skip
    image = png(12)
    srv = Server()
    try:
        assert srv.stub.LoadModel(load, timeout=120).success
        first = srv.stub.Predict(request(images=[image]), timeout=120).message.decode()
        history = [("user", "<__media__>" + QUESTION), ("assistant", first)]
        follow = request("And the colors?", images=[image], history=history, Logprobs=1)
        srv.stub.Free(pb.HealthMessage(), timeout=30)
        assert list((tmp_path / "kv").glob("*.safetensors"))
        assert srv.stub.LoadModel(load, timeout=120).success
        reused = srv.stub.Predict(follow, timeout=120)
        assert counters(srv)["media_prompts_from_cache"] == 1
        assert counters(srv)["media_prompts_encoded"] == 0
    finally:
        srv.stop()
    plain = Server()  # the same second turn computed from scratch, no saved cache
    try:
        assert plain.stub.LoadModel(
            pb.ModelOptions(Model=folder.name, ModelPath=str(folder.parent)), timeout=120
        ).success
        cold = plain.stub.Predict(follow, timeout=120)
        assert counters(plain)["media_prompts_encoded"] == 1
    finally:
        plain.stop()
    assert reused.message == cold.message
    assert np.allclose(our_logprobs(reused), our_logprobs(cold), atol=2e-3)


def test_long_media_prefill_lets_others_through_and_is_aborted_by_free(tmp_path):
    """A media prompt prefilled in many chunks (vision_prefill_chunk:1): a text request sent
    meanwhile finishes first, Health answers, and Free ends the media request with ABORTED."""
    import threading
    import time

    folder = FAMILIES["qwen2_5_vl"](tmp_path / "tiny-qwen-chunks")
    srv = Server()
    try:
        load = pb.ModelOptions(
            Model=folder.name, ModelPath=str(folder.parent), ContextSize=8192,
            Options=["vision_prefill_chunk:1"],
        )  # fmt: skip
        assert srv.stub.LoadModel(load, timeout=120).success
        long_question = "Tell me about it. " * 400
        outcome = {}

        def media_request():
            try:
                srv.stub.Predict(request(long_question, images=[png(30)], Tokens=4), timeout=300)
                outcome["media"] = "finished"
            except grpc.RpcError as e:
                outcome["media"] = e.code()
            outcome["media_done"] = time.monotonic()

        thread = threading.Thread(target=media_request)
        thread.start()
        deadline = time.monotonic() + 60
        while counters(srv)["media_prompts_encoded"] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)  # the tower has started: the prefill is under way
        assert srv.healthy()
        srv.stub.Predict(request("Hello there.", Tokens=8), timeout=120)
        text_done = time.monotonic()
        assert "media" not in outcome, "the text request waited for the whole media prefill"
        assert srv.stub.Free(pb.HealthMessage(), timeout=30).success
        thread.join(120)
        assert outcome["media"] == grpc.StatusCode.ABORTED
        assert outcome["media_done"] > text_done
        assert srv.healthy()
    finally:
        srv.stop()


def test_hf_id_from_the_local_cache(tmp_path):
    """An mlx-community-style id resolves from the local Hugging Face cache (offline), as text
    models do, and serves an image request."""
    commit = "0" * 40
    repo = tmp_path / "hub" / "models--mlx-community--tiny-qwen-vl"
    FAMILIES["qwen2_5_vl"](repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    srv = Server(env={"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"})
    try:
        reply = srv.stub.LoadModel(pb.ModelOptions(Model="mlx-community/tiny-qwen-vl"), timeout=120)
        assert reply.success and "vision-language" in reply.message, reply.message
        assert srv.stub.Predict(request(images=[png(3)], Tokens=4), timeout=120).message
    finally:
        srv.stop()


def test_prompt_time_includes_the_media_prefill(tmp_path):
    """Reply.timing_prompt_processing of a media request counts the vision tower and the prefill
    (done before the request joins the batch), not only the batch's last prompt token."""
    import time

    folder = FAMILIES["qwen2_5_vl"](tmp_path / "tiny-qwen-timing")
    srv = Server()
    try:
        load = pb.ModelOptions(
            Model=folder.name, ModelPath=str(folder.parent), ContextSize=8192,
            Options=["vision_prefill_chunk:4"],
        )  # fmt: skip
        assert srv.stub.LoadModel(load, timeout=120).success
        start = time.monotonic()
        reply = srv.stub.Predict(
            request("Tell me about it. " * 200, images=[png(31)], Tokens=2), timeout=300
        )
        wall_ms = 1000 * (time.monotonic() - start)
        assert reply.timing_prompt_processing >= 0.5 * wall_ms, (
            reply.timing_prompt_processing,
            wall_ms,
        )
    finally:
        srv.stop()


def test_rerank_on_a_vision_model(qwen):
    """Rerank with a VLM loaded (the decoder-LLM reranker path: a whole prompt, no cache): the
    fuzzer's finding was INTERNAL (TypeError) from the per-row position shift."""
    _, srv = qwen
    done = srv.stub.Rerank(
        pb.RerankRequest(query="cats", documents=["a cat", "a car"], top_n=1), timeout=120
    )
    assert len(done.results) == 1 and 0 <= done.results[0].relevance_score <= 1


def test_stop_strings_cut_a_media_reply(vlm):
    """A stop string cuts a media request's reply exactly before it, as for text."""
    _, _, srv, _ = vlm
    image = png(40)
    full = srv.stub.Predict(request(images=[image], Tokens=16), timeout=120).message.decode()
    # a stop string first seen after some visible text: the reply is exactly what precedes it
    ks = [
        k for k in range(1, len(full) - 2) if full.find(full[k : k + 3]) == k and full[:k].strip()
    ]
    if not ks:
        pytest.skip(f"this random model's reply has no usable stop string: {full!r}")
    k = ks[0]
    cut = srv.stub.Predict(
        request(images=[image], Tokens=16, StopPrompts=[full[k : k + 3]]), timeout=120
    )
    assert cut.message.decode() == full[:k], (full, full[k : k + 3])


def test_kv_reservation_refuses_what_cannot_fit(qwen):
    """A media request whose KV cannot fit the budget (Options max_kv_bytes) is
    RESOURCE_EXHAUSTED on its own, and the server stays up."""
    folder, _ = qwen
    small = Server()
    try:
        assert small.stub.LoadModel(
            pb.ModelOptions(
                Model=folder.name, ModelPath=str(folder.parent), Options=["max_kv_bytes:4096"]
            ),
            timeout=120,
        ).success
        with pytest.raises(grpc.RpcError) as err:
            small.stub.Predict(request(images=[png(41)], Tokens=64), timeout=120)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.value.details()
        assert small.healthy()
    finally:
        small.stop()


def test_max_pixels_downscales_images_and_frames():
    """Options max_pixels: images and video frames over the budget are scaled down, aspect kept;
    smaller ones are left alone."""
    from mlxbackend.vision.media import load_image, load_video

    image = load_image(b64(png(50, size=(400, 100))), "image", max_pixels=10_000)
    assert image.width * image.height <= 10_000 and image.size == (200, 50)
    assert load_image(b64(png(50, size=(40, 30))), "image", max_pixels=10_000).size == (40, 30)
    video = load_video(b64(mp4(size=(64, 48))), "video", 2.0, 32, max_pixels=768)
    assert video.frames.shape[1:3] == (24, 32)
