"""backend.Backend RPCs: validate, call a capability, map errors to status codes.

Capability code takes plain values; this is the only module that reads request messages."""

import asyncio
import json
import os

import grpc

from mlxbackend import BACKEND_NAME
from mlxbackend.distributed.group import DistributedGroup, forwarded
from mlxbackend.errors import BackendError, InvalidInput, Unsupported
from mlxbackend.proto import backend_pb2 as pb
from mlxbackend.worker import Worker

# RPCs whose capability has not landed yet, and what would provide it.
PENDING = {
    "GenerateVideo": "video generation",
    "TTS": "text-to-speech",
    "TTSStream": "text-to-speech",
    "SoundGeneration": "sound generation",
    "VAD": "voice activity detection",
    "Detect": "object detection",
    "AudioEncode": "audio codec (served by LocalAI's opus backend)",
    "AudioDecode": "audio codec (served by LocalAI's opus backend)",
}


def status_of(exc: BaseException) -> tuple:
    """(grpc.StatusCode, message) for an exception from capability code."""
    if isinstance(exc, BackendError):
        return getattr(grpc.StatusCode, exc.code), str(exc)
    text = str(exc).lower()
    if isinstance(exc, MemoryError) or any(k in text for k in ("out of memory", "unable to allocate", "[malloc")):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, f"out of memory: {exc}"
    return grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}"


class Servicer:
    """One method per RPC. Unlisted RPCs answer UNIMPLEMENTED naming the capability."""

    def __init__(self, default_model: str = ""):
        from mlxbackend.audio.engine import AudioEngine
        from mlxbackend.embed.engine import EmbedEngine
        from mlxbackend.image.engine import ImageEngine
        from mlxbackend.quantize.service import Quantizations
        from mlxbackend.text.engine import TextEngine  # light: mlx is imported lazily inside
        from mlxbackend.train.service import FineTunes

        self.worker = Worker()
        self.audio = AudioEngine(self.worker)
        self.text = TextEngine(self.worker)
        self.embed = EmbedEngine(self.worker, self.text)
        self.image = ImageEngine(self.worker)
        self.store = None  # store.VectorStore, opened at the first Stores call or by LoadModel
        self.finetunes = FineTunes(self.worker)
        self.quantizations = Quantizations(self.worker)
        self.default_model = default_model
        self.loading = False
        self.distributed = DistributedGroup(self)  # mx.distributed groups (distributed/group.py)

    def unimplemented(self, method: str):
        raise Unsupported(f"{method} is not implemented by this backend yet (missing capability: {PENDING[method]})")

    async def Health(self, request, context):
        return pb.Reply(message=b"OK")

    async def LoadModel(self, request, context):
        from mlxbackend.options import parse_options
        from mlxbackend.text.models import LoadSpec

        options = parse_options(request.Options)
        if options.get("store_path") or request.Type.strip().lower() == "store":
            await self.open_store(options.get("store_path", ""), request.ModelPath)
            if request.Type.strip().lower() == "store":
                where = self.store.path or "memory only (set Options store_path to persist)"
                return pb.Result(success=True, message=f"MLX vector store ready: {len(self.store)} keys, {where}")
        if is_job_process(request):
            return pb.Result(success=True, message="MLX backend ready (job process, no model loaded)")
        from mlxbackend.audio import whisper_dir
        from mlxbackend.embed import encoder_dir

        whisper = whisper_dir(request.Model, request.ModelFile, request.ModelPath, request.Type)
        if whisper is not None:
            wm = await self.audio.load(whisper)
            return pb.Result(success=True, message=f"MLX whisper model loaded successfully: {wm.path}")
        from mlxbackend.image import diffusion_dir

        diffusion = diffusion_dir(request.Model, request.ModelFile, request.ModelPath, request.PipelineType)
        if diffusion is not None:
            from mlxbackend.image.pipeline import LoadSettings

            settings = LoadSettings.from_options(
                options, pipeline_type=request.PipelineType, scheduler=request.SchedulerType,
                cfg_scale=request.CFGScale, clip_skip=request.CLIPSkip, low_memory=request.LowVRAM,
            )
            pipe = await self.image.load(diffusion, settings)
            return pb.Result(success=True, message=f"MLX image model loaded successfully: {pipe.family} {pipe.path}")
        encoder = await asyncio.to_thread(encoder_dir, request.Model, request.ModelFile, request.ModelPath)
        if encoder is not None:
            await self.text.free()
            enc = await self.embed.load_encoder(encoder, options)
            return pb.Result(success=True, message=f"MLX embedding model loaded successfully: {enc.path}")
        if self.distributed.wanted(options):  # Options hostfile / MLX_DISTRIBUTED_HOSTFILE
            return await self.distributed.load(request, options)
        await self.distributed.free()
        adapters = []
        if request.LoraAdapter:
            adapters.append((request.LoraAdapter, request.LoraScale or 1.0))
        for i, path in enumerate(request.LoraAdapters):
            scale = request.LoraScales[i] if i < len(request.LoraScales) else 1.0
            adapters.append((path, scale))
        spec = LoadSpec(
            model=request.Model, model_file=request.ModelFile, model_path=request.ModelPath,
            context_size=request.ContextSize, lora_adapters=adapters, draft_model=request.DraftModel,
            trust_remote_code=request.TrustRemoteCode, options=options,
        )
        self.embed.configure(options)
        self.loading = True
        try:
            await self.embed.free()
            tm = await self.text.load(spec)
        finally:
            self.loading = False
        return pb.Result(success=True, message=f"MLX model loaded successfully: {tm.path}")

    async def Free(self, request, context):
        await self.distributed.free()
        await self.finetunes.stop_all()  # LocalAI's stop: Free, then SIGTERM (a checkpoint is kept)
        await self.quantizations.stop_all(timeout=5)  # no partial output is kept
        await self.text.free()
        await self.audio.free()
        await self.embed.free()
        await self.image.free()
        return pb.Result(success=True, message="model freed")

    @forwarded
    async def Predict(self, request, context):
        done = await self.text.complete(*text_request(request))
        f = done.finish
        reply = pb.Reply(
            message=done.text.encode(), tokens=f.generated, prompt_tokens=f.prompt_tokens,
            timing_prompt_processing=f.prompt_ms, timing_token_generation=f.generation_ms,
            chat_deltas=[chat_delta(done.delta)],
        )
        if request.Logprobs > 0:
            reply.logprobs = logprobs_json(done.logprobs)
        return reply

    @forwarded
    async def PredictStream(self, request, context):
        from mlxbackend.text.generate import Finish

        logprobs = []
        async for event in self.text.stream(*text_request(request)):
            chunk = event.chunk if isinstance(event, Finish) else event
            logprobs.extend(chunk.logprobs)
            reply = pb.Reply(message=chunk.text.encode())
            if chunk.delta:
                reply.chat_deltas.append(chat_delta(chunk.delta))
            if isinstance(event, Finish):
                reply.tokens = event.generated
                reply.prompt_tokens = event.prompt_tokens
                reply.timing_prompt_processing = event.prompt_ms
                reply.timing_token_generation = event.generation_ms
                if request.Logprobs > 0:
                    reply.logprobs = logprobs_json(logprobs)
            yield reply

    @forwarded
    async def TokenizeString(self, request, context):
        spec, _ = text_request(request)
        tokens = await self.text.tokenize(spec)
        return pb.TokenizationResponse(length=len(tokens), tokens=tokens)

    async def Status(self, request, context):
        if self.distributed.engaged:
            return await self.distributed.status()
        if any(m is not None for m in (self.text.current, self.audio.current, self.embed.encoder, self.image.current)):
            state = pb.StatusResponse.BUSY if self.worker.busy() else pb.StatusResponse.READY
        else:
            state = pb.StatusResponse.BUSY if self.loading else pb.StatusResponse.UNINITIALIZED
        breakdown = self.text.memory() if self.text.current is not None else self.embed.memory()
        return pb.StatusResponse(
            state=state, memory=pb.MemoryUsageData(total=sum(breakdown.values()), breakdown=breakdown)
        )

    @forwarded
    async def GetMetrics(self, request, context):
        m = self.text.last
        return pb.MetricsResponse(
            tokens_per_second=m.tokens_per_second, tokens_generated=m.tokens_generated,
            prompt_tokens_processed=m.prompt_tokens,
        )

    @forwarded
    async def ModelMetadata(self, request, context):
        meta = self.text.metadata()
        markers = pb.ToolFormatMarkers()
        if meta["think"]:
            markers.reasoning_start, markers.reasoning_end = meta["think"]
        if meta["tool"]:
            markers.section_start, markers.section_end = meta["tool"]
            if meta["tool_parser"] == "json_tools":
                markers.format_type, markers.name_field, markers.args_field = "json_native", "name", "arguments"
        return pb.ModelMetadataResponse(
            supports_thinking=meta["supports_thinking"], rendered_template=meta["rendered_template"],
            tool_format=markers,
        )

    async def Embedding(self, request, context):
        vector, _ = await self.embed.embed(request.Embeddings or request.Prompt, request.EmbeddingTokens)
        return pb.EmbeddingResult(embeddings=vector.tolist())

    async def Rerank(self, request, context):
        done = await self.embed.rerank(request.query, list(request.documents), request.top_n)
        return pb.RerankResult(
            usage=pb.Usage(total_tokens=done.tokens, prompt_tokens=done.tokens),
            results=[pb.DocumentResult(index=r.index, text=r.text, relevance_score=r.score) for r in done.results],
        )

    async def GenerateImage(self, request, context):
        from mlxbackend.image.generate import ImageRequest

        done = await self.image.generate(ImageRequest(
            prompt=request.positive_prompt, negative_prompt=request.negative_prompt, width=request.width,
            height=request.height, steps=request.step, seed=request.seed, src=request.src,
            ref_images=tuple(request.ref_images), clip_skip=request.CLIPSkip,
            enable_parameters=request.EnableParameters,
        ), request.dst)
        return pb.Result(success=True, message=(
            f"wrote {done.dst}: {done.width}x{done.height}, {done.steps} steps, seed {done.seed}, "
            f"{done.seconds_per_step:.3f} s/step"
        ))

    async def open_store(self, path: str = "", model_path: str = ""):
        """Open the vector store at Options store_path (relative to ModelPath); memory-only without one."""
        from mlxbackend.store import VectorStore

        if path and not os.path.isabs(path) and model_path:
            path = os.path.join(model_path, path)
        self.store = await self.worker.run(VectorStore.open, path or None)
        return self.store

    async def stores(self):
        return self.store if self.store is not None else await self.open_store()

    async def StoresSet(self, request, context):
        store = await self.stores()
        keys, values = [list(k.Floats) for k in request.Keys], [v.Bytes for v in request.Values]
        await self.worker.run(store.set, keys, values)
        return pb.Result(success=True, message=f"{len(keys)} keys set; the store holds {len(store)}")

    async def StoresDelete(self, request, context):
        store = await self.stores()
        deleted = await self.worker.run(store.delete, [list(k.Floats) for k in request.Keys])
        return pb.Result(success=True, message=f"{deleted} keys deleted; the store holds {len(store)}")

    async def StoresGet(self, request, context):
        store = await self.stores()
        keys, values = await self.worker.run(store.get, [list(k.Floats) for k in request.Keys])
        return pb.StoresGetResult(Keys=store_keys(keys), Values=[pb.StoresValue(Bytes=v) for v in values])

    async def StoresFind(self, request, context):
        store = await self.stores()
        keys, values, similarities = await self.worker.run(store.find, list(request.Key.Floats), request.TopK)
        return pb.StoresFindResult(
            Keys=store_keys(keys), Values=[pb.StoresValue(Bytes=v) for v in values],
            Similarities=similarities.tolist(),
        )

    async def AudioTranscription(self, request, context):
        done = await self.audio.transcribe(*transcript_request(request))
        return transcript_result(done)

    async def AudioTranscriptionStream(self, request, context):
        from mlxbackend.audio.engine import Segment, Transcript

        async for event in self.audio.events(*transcript_request(request)):
            if isinstance(event, Segment):
                yield pb.TranscriptStreamResponse(delta=event.text)
            elif isinstance(event, Transcript):
                yield pb.TranscriptStreamResponse(final_result=transcript_result(event))

    async def StartFineTune(self, request, context):
        from mlxbackend.train.config import fine_tune_config

        fields = {f.name: getattr(request, f.name) for f in request.DESCRIPTOR.fields}
        job_id = await self.finetunes.start(fine_tune_config(**fields))
        return pb.FineTuneJobResult(job_id=job_id, success=True, message=f"fine-tuning job {job_id} started")

    async def FineTuneProgress(self, request, context):
        require(request.job_id, "job_id")
        async for snapshot in self.finetunes.watch(request.job_id):
            yield pb.FineTuneProgressUpdate(**snapshot)

    async def StopFineTune(self, request, context):
        require(request.job_id, "job_id")
        message = self.finetunes.stop(request.job_id, request.save_checkpoint)
        return pb.Result(success=True, message=message)

    async def ListCheckpoints(self, request, context):
        from mlxbackend.train.checkpoints import list_checkpoints

        require(request.output_dir, "output_dir")
        found = await asyncio.to_thread(list_checkpoints, request.output_dir)
        return pb.ListCheckpointsResponse(checkpoints=[pb.CheckpointInfo(**c) for c in found])

    async def ExportModel(self, request, context):
        from mlxbackend.train.export import export_model

        def on_worker(fn, *args):
            return self.worker.call(fn, *args).result()

        message = await asyncio.to_thread(
            export_model, request.checkpoint_path, request.output_path, request.export_format,
            request.quantization_method, request.model, dict(request.extra_options), on_worker=on_worker,
        )
        return pb.Result(success=True, message=message)

    async def StartQuantization(self, request, context):
        from mlxbackend.quantize.config import quantization_config

        fields = {f.name: getattr(request, f.name) for f in request.DESCRIPTOR.fields}
        job_id = await self.quantizations.start(quantization_config(**fields))
        return pb.QuantizationJobResult(job_id=job_id, success=True, message=f"quantization job {job_id} started")

    async def QuantizationProgress(self, request, context):
        require(request.job_id, "job_id")
        async for snapshot in self.quantizations.watch(request.job_id):
            yield pb.QuantizationProgressUpdate(**snapshot)

    async def StopQuantization(self, request, context):
        require(request.job_id, "job_id")
        return pb.Result(success=True, message=self.quantizations.stop(request.job_id))


def require(value, name: str):
    if not value:
        raise InvalidInput(f"{name} is required")


def store_keys(keys) -> list:
    return [pb.StoresKey(Floats=row) for row in keys.tolist()]


def is_job_process(request) -> bool:
    """Fine-tune/quantize job processes load the backend's own name with nothing else set."""
    return bool(request.Model) and not (request.ModelFile or request.ModelPath) and (
        request.Model == BACKEND_NAME or ("/" not in request.Model and not os.path.exists(request.Model))
    )


def text_request(request):
    """PredictOptions → (PromptSpec, GenerationRequest)."""
    from mlxbackend.text.chat import ChatMessage, PromptSpec
    from mlxbackend.text.generate import GenerationRequest
    from mlxbackend.text.sampling import SamplingParams

    spec = PromptSpec(
        prompt=request.Prompt, use_template=request.UseTokenizerTemplate,
        messages=[
            ChatMessage(m.role, m.content, m.name, m.tool_call_id, m.reasoning_content, m.tool_calls)
            for m in request.Messages
        ],
        tools=request.Tools, tool_choice=request.ToolChoice, metadata=dict(request.Metadata),
    )
    sampling = SamplingParams(
        temperature=request.Temperature, top_k=request.TopK, top_p=request.TopP, min_p=request.MinP,
        repeat_penalty=request.Penalty, repeat_last_n=request.Repeat,
        frequency_penalty=request.FrequencyPenalty, presence_penalty=request.PresencePenalty,
        logit_bias=request.LogitBias, seed=request.Seed, ignore_eos=request.IgnoreEOS,
    )
    req = GenerationRequest(
        sampling=sampling, max_tokens=request.Tokens, stop=list(request.StopPrompts),
        logprobs=request.Logprobs, top_logprobs=max(request.TopLogprobs, 0), num_draft=request.NDraft,
        grammar=request.Grammar, json_schema=request.Metadata.get("json_schema", ""),
    )
    return spec, req


def transcript_request(request):
    """TranscriptRequest → AudioEngine arguments (dst, Options, diarize, granularities)."""
    from mlxbackend.audio.engine import Options

    opts = Options(
        language=request.language, translate=request.translate, prompt=request.prompt,
        temperature=request.temperature,
    )
    return request.dst, opts, request.diarize, [g.strip().lower() for g in request.timestamp_granularities]


def transcript_result(t) -> "pb.TranscriptResult":
    """Segment times in int64 nanoseconds, duration in float seconds (LocalAI's units)."""
    return pb.TranscriptResult(
        text=t.text, language=t.language, duration=t.duration,
        segments=[
            pb.TranscriptSegment(id=s.id, start=round(s.start * 1e9), end=round(s.end * 1e9), text=s.text, tokens=s.tokens)
            for s in t.segments
        ],
    )


def chat_delta(delta) -> "pb.ChatDelta":
    return pb.ChatDelta(
        content=delta.content, reasoning_content=delta.reasoning,
        tool_calls=[
            pb.ToolCallDelta(index=c.index, id=c.id, name=c.name, arguments=c.arguments)
            for c in delta.tool_calls
        ],
    )


def logprobs_json(entries) -> bytes:
    return json.dumps({"content": entries}, ensure_ascii=False).encode()

