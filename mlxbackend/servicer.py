"""backend.Backend RPCs: proto messages ↔ plain values, nothing else.

Each method reads its request's fields by name into plain values, calls the model host
(host.py) or one of its engines, and builds the reply. Where a request field acts is found by
following these calls; errors are typed (errors.py) and mapped to status codes in server.py."""

import asyncio
import json

from mlxbackend.audio.engine import Options, Segment, Transcript
from mlxbackend.distributed.group import forwarded
from mlxbackend.errors import InvalidInput, Unsupported
from mlxbackend.host import LoadRequest, ModelHost
from mlxbackend.image.generate import ImageRequest
from mlxbackend.music import SongRequest
from mlxbackend.proto import backend_pb2 as pb
from mlxbackend.quantize import config as quantize_config
from mlxbackend.text.chat import ChatMessage, PromptSpec
from mlxbackend.text.generate import Finish, GenerationRequest
from mlxbackend.text.sampling import SamplingParams
from mlxbackend.train import config as train_config
from mlxbackend.train.checkpoints import list_checkpoints
from mlxbackend.train.export import export_model
from mlxbackend.vision.media import Media

# RPCs whose capability has not landed yet, and what would provide it.
PENDING = {
    "GenerateVideo": "video generation",
    "Detect": "object detection",
    "AudioEncode": "audio codec (served by LocalAI's opus backend)",
    "AudioDecode": "audio codec (served by LocalAI's opus backend)",
}


class Servicer:
    """One method per RPC. Unlisted RPCs answer UNIMPLEMENTED naming the capability."""

    def __init__(self, default_model: str = ""):
        self.host = ModelHost(default_model)

    def unimplemented(self, method: str):
        raise Unsupported(
            f"{method} is not implemented by this backend yet (missing capability: {PENDING[method]})"
        )

    async def Health(self, request, context):
        return pb.Reply(message=b"OK")

    async def LoadModel(self, request, context):
        message = await self.host.load(load_request(request))
        return pb.Result(success=True, message=message)

    async def Free(self, request, context):
        return pb.Result(success=True, message=await self.host.free())

    @forwarded
    async def Predict(self, request, context):
        done = await self.host.text.complete(*text_request(request))
        f = done.finish
        reply = pb.Reply(
            message=done.text.encode(),
            tokens=f.generated,
            prompt_tokens=f.prompt_tokens,
            timing_prompt_processing=f.prompt_ms,
            timing_token_generation=f.generation_ms,
            chat_deltas=[chat_delta(done.delta)],
        )
        if request.Logprobs > 0:
            reply.logprobs = logprobs_json(done.logprobs)
        return reply

    @forwarded
    async def PredictStream(self, request, context):
        logprobs = []
        async for event in self.host.text.stream(*text_request(request)):
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
        tokens = await self.host.text.tokenize(spec)
        return pb.TokenizationResponse(length=len(tokens), tokens=tokens)

    async def Status(self, request, context):
        if self.host.distributed.engaged:  # the rank-0 process's Status, forwarded
            return await self.host.distributed.status()
        status = self.host.status()
        return pb.StatusResponse(
            state=pb.StatusResponse.State.Value(status.state),
            memory=pb.MemoryUsageData(total=status.total, breakdown=status.memory),
        )

    @forwarded
    async def GetMetrics(self, request, context):
        m = self.host.text.last
        return pb.MetricsResponse(
            tokens_per_second=m.tokens_per_second,
            tokens_generated=m.tokens_generated,
            prompt_tokens_processed=m.prompt_tokens,
            prompt_json_for_slot=json.dumps(
                {"drafted_tokens": m.drafted, "accepted_tokens": m.accepted}
            ),
        )

    @forwarded
    async def ModelMetadata(self, request, context):
        meta = self.host.text.metadata()
        markers = pb.ToolFormatMarkers()
        if meta["think"]:
            markers.reasoning_start, markers.reasoning_end = meta["think"]
        if meta["tool"]:
            markers.section_start, markers.section_end = meta["tool"]
            if meta["tool_parser"] == "json_tools":
                markers.format_type, markers.name_field, markers.args_field = (
                    "json_native",
                    "name",
                    "arguments",
                )
        return pb.ModelMetadataResponse(
            supports_thinking=meta["supports_thinking"],
            rendered_template=meta["rendered_template"],
            tool_format=markers,
            media_marker=meta["media_marker"],
        )

    async def VAD(self, request, context):
        segments = await self.host.vad.detect(request.audio)
        return pb.VADResponse(segments=[pb.VADSegment(start=a, end=b) for a, b in segments])

    async def TTS(self, request, context):
        done = await self.host.tts.synthesize(
            request.text, request.voice, tts_language(request), request.dst
        )
        return pb.Result(
            success=True,
            message=(
                f"wrote {done.dst}: {done.seconds:.2f} s of speech, {done.sample_rate} Hz PCM16 "
                f"mono, voice {done.voice}, lang_code {done.lang_code}, {done.segments} segments"
            ),
        )

    async def TTSStream(self, request, context):
        """LocalAI's contract: a first Reply whose message is {"sample_rate": N} (LocalAI then
        writes the WAV header itself), then raw PCM16 little-endian mono in Reply.audio, one
        chunk per text segment."""
        speech = await self.host.tts.prepare(request.text, request.voice, tts_language(request))
        yield pb.Reply(message=json.dumps({"sample_rate": speech.sample_rate}).encode())
        async for pcm in self.host.tts.chunks(speech):
            yield pb.Reply(audio=pcm)

    async def SoundGeneration(self, request, context):
        done = await self.host.music.generate(sound_request(request))
        return pb.Result(
            success=True,
            message=(
                f"wrote {done.dst}: {done.seconds:.2f} s of music, {done.sample_rate} Hz PCM16 "
                f"{'stereo' if done.channels == 2 else 'mono'}, seed {done.seed}, "
                f"{done.steps} flow steps"
            ),
        )

    async def Embedding(self, request, context):
        vector, _ = await self.host.embed.embed(
            request.Embeddings or request.Prompt, request.EmbeddingTokens
        )
        return pb.EmbeddingResult(embeddings=vector.tolist())

    async def Rerank(self, request, context):
        done = await self.host.embed.rerank(request.query, list(request.documents), request.top_n)
        return pb.RerankResult(
            usage=pb.Usage(total_tokens=done.tokens, prompt_tokens=done.tokens),
            results=[
                pb.DocumentResult(index=r.index, text=r.text, relevance_score=r.score)
                for r in done.results
            ],
        )

    async def GenerateImage(self, request, context):
        done = await self.host.image.generate(
            ImageRequest(
                prompt=request.positive_prompt,
                negative_prompt=request.negative_prompt,
                width=request.width,
                height=request.height,
                steps=request.step,
                seed=request.seed,
                src=request.src,
                ref_images=tuple(request.ref_images),
                clip_skip=request.CLIPSkip,
                enable_parameters=request.EnableParameters,
            ),
            request.dst,
        )
        return pb.Result(
            success=True,
            message=(
                f"wrote {done.dst}: {done.width}x{done.height}, {done.steps} steps, seed {done.seed}, "
                f"{done.seconds_per_step:.3f} s/step"
            ),
        )

    async def StoresSet(self, request, context):
        store = await self.host.stores()
        keys, values = [list(k.Floats) for k in request.Keys], [v.Bytes for v in request.Values]
        await self.host.worker.run(store.set, keys, values)
        return pb.Result(
            success=True, message=f"{len(keys)} keys set; the store holds {len(store)}"
        )

    async def StoresDelete(self, request, context):
        store = await self.host.stores()
        deleted = await self.host.worker.run(store.delete, [list(k.Floats) for k in request.Keys])
        return pb.Result(
            success=True, message=f"{deleted} keys deleted; the store holds {len(store)}"
        )

    async def StoresGet(self, request, context):
        store = await self.host.stores()
        keys, values = await self.host.worker.run(store.get, [list(k.Floats) for k in request.Keys])
        return pb.StoresGetResult(
            Keys=store_keys(keys), Values=[pb.StoresValue(Bytes=v) for v in values]
        )

    async def StoresFind(self, request, context):
        store = await self.host.stores()
        keys, values, similarities = await self.host.worker.run(
            store.find, list(request.Key.Floats), request.TopK
        )
        return pb.StoresFindResult(
            Keys=store_keys(keys),
            Values=[pb.StoresValue(Bytes=v) for v in values],
            Similarities=similarities.tolist(),
        )

    async def AudioTranscription(self, request, context):
        done = await self.host.audio.transcribe(*transcript_request(request))
        return transcript_result(done)

    async def AudioTranscriptionStream(self, request, context):
        async for event in self.host.audio.events(*transcript_request(request)):
            if isinstance(event, Segment):
                yield pb.TranscriptStreamResponse(delta=event.text)
            elif isinstance(event, Transcript):
                yield pb.TranscriptStreamResponse(final_result=transcript_result(event))

    async def StartFineTune(self, request, context):
        job_id = await self.host.finetunes.start(fine_tune_config(request))
        return pb.FineTuneJobResult(
            job_id=job_id, success=True, message=f"fine-tuning job {job_id} started"
        )

    async def FineTuneProgress(self, request, context):
        require(request.job_id, "job_id")
        async for snapshot in self.host.finetunes.watch(request.job_id):
            yield pb.FineTuneProgressUpdate(**snapshot)

    async def StopFineTune(self, request, context):
        require(request.job_id, "job_id")
        message = self.host.finetunes.stop(request.job_id, request.save_checkpoint)
        return pb.Result(success=True, message=message)

    async def ListCheckpoints(self, request, context):
        require(request.output_dir, "output_dir")
        found = await asyncio.to_thread(list_checkpoints, request.output_dir)
        return pb.ListCheckpointsResponse(checkpoints=[pb.CheckpointInfo(**c) for c in found])

    async def ExportModel(self, request, context):
        def on_worker(fn, *args):
            return self.host.worker.call(fn, *args).result()

        message = await asyncio.to_thread(
            export_model,
            request.checkpoint_path,
            request.output_path,
            request.export_format,
            request.quantization_method,
            request.model,
            dict(request.extra_options),
            on_worker=on_worker,
        )
        return pb.Result(success=True, message=message)

    async def StartQuantization(self, request, context):
        job_id = await self.host.quantizations.start(quantization_config(request))
        return pb.QuantizationJobResult(
            job_id=job_id, success=True, message=f"quantization job {job_id} started"
        )

    async def QuantizationProgress(self, request, context):
        require(request.job_id, "job_id")
        async for snapshot in self.host.quantizations.watch(request.job_id):
            yield pb.QuantizationProgressUpdate(**snapshot)

    async def StopQuantization(self, request, context):
        require(request.job_id, "job_id")
        return pb.Result(success=True, message=self.host.quantizations.stop(request.job_id))


def require(value, name: str):
    if not value:
        raise InvalidInput(f"{name} is required")


def store_keys(keys) -> list:
    return [pb.StoresKey(Floats=row) for row in keys.tolist()]


def load_request(request) -> LoadRequest:
    """ModelOptions → LoadRequest. Fields not read here are not used by this backend (README,
    "LoadModel")."""
    adapters = []
    if request.LoraAdapter:
        adapters.append((request.LoraAdapter, request.LoraScale or 1.0))
    for i, path in enumerate(request.LoraAdapters):
        adapters.append((path, request.LoraScales[i] if i < len(request.LoraScales) else 1.0))
    return LoadRequest(
        model=request.Model,
        model_file=request.ModelFile,
        model_path=request.ModelPath,
        type=request.Type,
        options=list(request.Options),
        context_size=request.ContextSize,
        lora_adapters=adapters,
        draft_model=request.DraftModel,
        trust_remote_code=request.TrustRemoteCode,
        pipeline_type=request.PipelineType,
        scheduler=request.SchedulerType,
        cfg_scale=request.CFGScale,
        clip_skip=request.CLIPSkip,
        low_vram=request.LowVRAM,
        media_limits={
            "image": request.LimitImagePerPrompt,
            "video": request.LimitVideoPerPrompt,
            "audio": request.LimitAudioPerPrompt,
        },
        cache_type_k=request.CacheTypeKey,
        cache_type_v=request.CacheTypeValue,
        rope={
            "RopeFreqBase": request.RopeFreqBase,
            "RopeFreqScale": request.RopeFreqScale,
            "RopeScaling": request.RopeScaling,
            "YarnExtFactor": request.YarnExtFactor,
            "YarnAttnFactor": request.YarnAttnFactor,
            "YarnBetaFast": request.YarnBetaFast,
            "YarnBetaSlow": request.YarnBetaSlow,
        },
        grammar_triggers=[t.word for t in request.GrammarTriggers],
        raw=request,
    )


def fine_tune_config(request):
    """FineTuneRequest → train.config.FineTuneConfig (validated), every field by name."""

    return train_config.fine_tune_config(
        model=request.model,
        training_type=request.training_type,
        training_method=request.training_method,
        adapter_rank=request.adapter_rank,
        adapter_alpha=request.adapter_alpha,
        adapter_dropout=request.adapter_dropout,
        target_modules=list(request.target_modules),
        learning_rate=request.learning_rate,
        num_epochs=request.num_epochs,
        batch_size=request.batch_size,
        gradient_accumulation_steps=request.gradient_accumulation_steps,
        warmup_steps=request.warmup_steps,
        max_steps=request.max_steps,
        save_steps=request.save_steps,
        weight_decay=request.weight_decay,
        gradient_checkpointing=request.gradient_checkpointing,
        optimizer=request.optimizer,
        seed=request.seed,
        mixed_precision=request.mixed_precision,
        dataset_source=request.dataset_source,
        dataset_split=request.dataset_split,
        output_dir=request.output_dir,
        job_id=request.job_id,
        resume_from_checkpoint=request.resume_from_checkpoint,
        extra_options=dict(request.extra_options),
    )


def quantization_config(request):
    """QuantizationRequest → quantize.config.QuantConfig (validated), every field by name."""

    return quantize_config.quantization_config(
        model=request.model,
        quantization_type=request.quantization_type,
        output_dir=request.output_dir,
        job_id=request.job_id,
        extra_options=dict(request.extra_options),
    )


def text_request(request):
    """PredictOptions → (PromptSpec, GenerationRequest)."""
    spec = PromptSpec(
        prompt=request.Prompt,
        use_template=request.UseTokenizerTemplate,
        messages=[
            ChatMessage(
                m.role, m.content, m.name, m.tool_call_id, m.reasoning_content, m.tool_calls
            )
            for m in request.Messages
        ],
        tools=request.Tools,
        tool_choice=request.ToolChoice,
        metadata=dict(request.Metadata),
        media=Media(list(request.Images), list(request.Videos), list(request.Audios)),
    )
    sampling = SamplingParams(
        temperature=request.Temperature,
        top_k=request.TopK,
        top_p=request.TopP,
        min_p=request.MinP,
        repeat_penalty=request.Penalty,
        repeat_last_n=request.Repeat,
        frequency_penalty=request.FrequencyPenalty,
        presence_penalty=request.PresencePenalty,
        logit_bias=request.LogitBias,
        seed=request.Seed,
        ignore_eos=request.IgnoreEOS,
        typical_p=request.TypicalP,
        tail_free_z=request.TailFreeSamplingZ,
        mirostat=request.Mirostat,
        mirostat_tau=request.MirostatTAU,
        mirostat_eta=request.MirostatETA,
    )
    req = GenerationRequest(
        sampling=sampling,
        max_tokens=request.Tokens,
        stop=list(request.StopPrompts),
        logprobs=request.Logprobs,
        top_logprobs=max(request.TopLogprobs, 0),
        num_draft=request.NDraft,
        grammar=request.Grammar,
        json_schema=request.Metadata.get("json_schema", ""),
        negative_prompt=request.NegativePrompt,
        rope_freq=(request.RopeFreqBase, request.RopeFreqScale),
    )
    return spec, req


def sound_request(request) -> SongRequest:
    """SoundGenerationRequest → SongRequest (an optional field left unset stays None)."""

    def opt(name: str):
        return getattr(request, name) if request.HasField(name) else None

    return SongRequest(
        text=request.text,
        dst=request.dst,
        duration=opt("duration"),
        temperature=opt("temperature"),
        sample=opt("sample"),
        src=request.src,
        src_divisor=opt("src_divisor"),
        think=opt("think"),
        caption=request.caption,
        lyrics=opt("lyrics"),
        bpm=opt("bpm"),
        keyscale=request.keyscale,
        language=request.language,
        timesignature=request.timesignature,
        instrumental=opt("instrumental"),
    )


def tts_language(request) -> str:
    """TTSRequest.language (optional; LocalAI always sets it, maybe to "")."""
    return request.language if request.HasField("language") else ""


def transcript_request(request):
    """TranscriptRequest → AudioEngine arguments (dst, Options, diarize, granularities)."""

    opts = Options(
        language=request.language,
        translate=request.translate,
        prompt=request.prompt,
        temperature=request.temperature,
    )
    return (
        request.dst,
        opts,
        request.diarize,
        [g.strip().lower() for g in request.timestamp_granularities],
    )


def transcript_result(t) -> "pb.TranscriptResult":
    """Segment times in int64 nanoseconds, duration in float seconds (LocalAI's units)."""
    return pb.TranscriptResult(
        text=t.text,
        language=t.language,
        duration=t.duration,
        segments=[
            pb.TranscriptSegment(
                id=s.id,
                start=round(s.start * 1e9),
                end=round(s.end * 1e9),
                text=s.text,
                tokens=s.tokens,
                speaker=s.speaker,
            )
            for s in t.segments
        ],
    )


def chat_delta(delta) -> "pb.ChatDelta":
    return pb.ChatDelta(
        content=delta.content,
        reasoning_content=delta.reasoning,
        tool_calls=[
            pb.ToolCallDelta(index=c.index, id=c.id, name=c.name, arguments=c.arguments)
            for c in delta.tool_calls
        ],
    )


def logprobs_json(entries) -> bytes:
    return json.dumps({"content": entries}, ensure_ascii=False).encode()
