"""The model host: owns the MLX worker and every engine, routes LoadModel by model kind, and
applies the one ownership rule below. The servicer calls it with plain values.

THE RULE (what may stay loaded together; what Free and LoadModel do to work in flight)
- One model slot. The process serves one model at a time, as LocalAI runs one backend process per
  model: a text LLM (with its draft model and LoRA adapters; it also serves decoder Embedding and
  Rerank), an encoder (Embedding, Rerank), a whisper model, a diffusion pipeline, a Silero VAD
  model, a TTS model, a music model, or a distributed group. LoadModel of any kind first empties the
  slot, then loads; if the load fails, the slot stays empty and the error says why.
- Emptying the slot (Free, or LoadModel) ends every request in flight on the model it held, at
  once: each ends with ABORTED and a message naming the cause; worker tasks stop at their next
  pause point, so the memory is returned before Free answers. Calls on a distributed group fail
  with UNAVAILABLE or ABORTED (whichever its rank-0 process answers first as it is stopped).
- Outside the slot: the vector store (data, opened by Options store_path or Type store, saved on
  every change; LoadModel and Free leave it open) and jobs (fine-tunes, quantizations: each loads
  its own model). LoadModel leaves jobs running. Free stops them, as LocalAI's stop is Free then
  SIGTERM: a fine-tune ends `stopped` with a checkpoint, a quantization ends `stopped` without
  partial output.
- Only the host sets or clears an engine's model; engines never write each other's state (the
  embed engine reads the text model through a function the host gives it)."""

import asyncio
import os
import sys
from dataclasses import dataclass, field

from mlxbackend import BACKEND_NAME, malloc
from mlxbackend.audio import whisper_dir
from mlxbackend.audio.engine import AudioEngine
from mlxbackend.distributed.group import DistributedGroup
from mlxbackend.embed import encoder_dir
from mlxbackend.embed.engine import EmbedEngine
from mlxbackend.image import diffusion_dir
from mlxbackend.image.engine import ImageEngine
from mlxbackend.image.pipeline import LoadSettings
from mlxbackend.music import music_source
from mlxbackend.music.engine import MusicEngine
from mlxbackend.options import parse_options
from mlxbackend.quantize.service import Quantizations
from mlxbackend.text import cpu_softmax
from mlxbackend.text.engine import TextEngine, usage_total
from mlxbackend.text.models import LoadSpec
from mlxbackend.train.service import FineTunes
from mlxbackend.tts import tts_source
from mlxbackend.tts.engine import TtsEngine
from mlxbackend.vad import vad_source
from mlxbackend.vad.engine import VadEngine
from mlxbackend.worker import Worker


@dataclass
class LoadRequest:
    """LoadModel's fields that the host and the engines act on (servicer.load_request)."""

    model: str = ""
    model_file: str = ""
    model_path: str = ""
    type: str = ""
    options: list = field(default_factory=list)  # LocalAI's "key:value" strings
    context_size: int = 0
    lora_adapters: list = field(default_factory=list)  # (path, scale)
    draft_model: str = ""
    trust_remote_code: bool = False
    pipeline_type: str = ""
    scheduler: str = ""
    cfg_scale: float = 0.0
    clip_skip: int = 0
    low_vram: bool = False
    media_limits: dict = field(default_factory=dict)  # image/video/audio → Limit*PerPrompt
    cache_type_k: str = ""  # LocalAI's cache_type_k / cache_type_v (text/kv_quant.py)
    cache_type_v: str = ""
    rope: dict = field(default_factory=dict)  # ModelOptions Rope*/Yarn* by field name
    grammar_triggers: list = field(default_factory=list)  # ModelOptions GrammarTriggers words
    raw: object = None  # the LoadModel message itself, forwarded as is to a distributed rank 0


@dataclass
class Status:
    state: str  # a StatusResponse.State name: UNINITIALIZED, BUSY, READY, ERROR
    memory: dict  # bytes by part, budgets and counters (text/engine.py memory())
    total: int  # bytes in use (the parts, not the budgets)


class ModelHost:
    def __init__(self, default_model: str = ""):
        self.default_model = default_model
        self.worker = Worker()
        self.text = TextEngine(self.worker, why_absent=self.why_no_text)
        self.embed = EmbedEngine(self.worker, decoder=lambda: self.text.current)
        self.audio = AudioEngine(self.worker)
        self.image = ImageEngine(self.worker)
        self.vad = VadEngine(self.worker, why_absent=self.why_no_vad)
        self.tts = TtsEngine(self.worker, why_absent=self.why_no_tts)
        self.music = MusicEngine(self.worker, why_absent=self.why_no_music)
        self.finetunes = FineTunes(self.worker)
        self.quantizations = Quantizations(self.worker)
        self.distributed = DistributedGroup(self)
        self.store = None  # store.VectorStore, opened at the first Stores call or by LoadModel
        self.kind = ""  # what the slot holds: text, encoder, whisper, image, vad, tts, music, distributed ("" = empty)
        self.name = ""  # its path, for messages
        self.loading = ""  # the kind being loaded
        self.lock = asyncio.Lock()  # LoadModel and Free one at a time
        self.malloc_mmap = 0  # glibc's mmap threshold set for the loaded kind (malloc.py), or 0

    # -- LoadModel ----------------------------------------------------------------------------
    async def load(self, req: LoadRequest) -> str:
        """Load what `req` names into the slot (emptying it first); the LoadModel message."""
        options = parse_options(req.options)
        async with self.lock:
            if options.get("store_path") or req.type.strip().lower() == "store":
                await self.open_store(str(options.get("store_path", "")), req.model_path)
                if req.type.strip().lower() == "store":
                    where = self.store.path or "memory only (set Options store_path to persist)"
                    return f"MLX vector store ready: {len(self.store)} keys, {where}"
            if is_job_process(req):
                return "MLX backend ready (job process, no model loaded)"
            kind, where = await asyncio.to_thread(model_kind, req, options, self.distributed)
            await self._empty(f"replaced by LoadModel of {req.model or req.model_file or where}")
            self.malloc_mmap = malloc.apply(kind)  # glibc thresholds for this kind (Linux)
            self.loading = kind
            try:
                message = await self._load(kind, where, req, options)
            finally:
                self.loading = ""
            self.kind, self.name = kind, str(where)
            return message

    async def _load(self, kind: str, where, req: LoadRequest, options: dict) -> str:
        if kind == "whisper":
            wm = await self.audio.load(where, options, req.model_path)
            extra = " with a diarization model" if self.audio.diarizer is not None else ""
            return f"MLX whisper model loaded successfully: {wm.path}{extra}"
        if kind == "image":
            settings = LoadSettings.from_options(
                options,
                pipeline_type=req.pipeline_type,
                scheduler=req.scheduler,
                cfg_scale=req.cfg_scale,
                clip_skip=req.clip_skip,
                low_memory=req.low_vram,
            )
            pipe = await self.image.load(where, settings)
            return f"MLX image model loaded successfully: {pipe.family} {pipe.path}"
        if kind == "vad":
            vm = await self.vad.load(where, options)
            return f"MLX voice activity detection model loaded successfully: Silero VAD {vm.path}"
        if kind == "tts":
            tm = await self.tts.load(where, options)
            return f"MLX text-to-speech model loaded successfully: {tm.describe()}"
        if kind == "music":
            mm = await self.music.load(where, options)
            return f"MLX music model loaded successfully: {mm.describe()}"
        if kind == "encoder":
            enc = await self.embed.load_encoder(where, options)
            return f"MLX embedding model loaded successfully: {enc.path}"
        if kind == "distributed":
            reply = await self.distributed.load(req.raw, options)
            return reply.message

        spec = LoadSpec(
            model=req.model,
            model_file=req.model_file,
            model_path=req.model_path,
            context_size=req.context_size,
            lora_adapters=list(req.lora_adapters),
            draft_model=req.draft_model,
            trust_remote_code=req.trust_remote_code,
            options=options,
            type_hint=req.type,
            media_limits=dict(req.media_limits),
            cache_type_k=req.cache_type_k,
            cache_type_v=req.cache_type_v,
            rope=dict(req.rope),
            grammar_triggers=list(req.grammar_triggers),
        )
        self.embed.configure(options)
        tm = await self.text.load(spec)
        if tm.vision is not None:
            return (
                f"MLX vision-language model loaded successfully: {tm.path} "
                f"({tm.vision.model_type}, accepts {', '.join(tm.vision.accepts) or 'text only'})"
            )
        facts = [f"context {tm.context_size} tokens"]
        if tm.kv is not None and tm.kv.quantized:
            facts.append(f"KV cache {tm.kv.label()}")
        if tm.max_kv_size:
            facts.append(f"rotating KV cache of {tm.max_kv_size} tokens")
        if cpu_softmax.enabled(tm.model):
            facts.append("attention softmax in NumPy (cpu_softmax)")
        if tm.draft_model is not None or tm.spec.lookup:
            facts.append(
                "speculative decoding with the DraftModel"
                if tm.draft_model is not None
                else "prompt-lookup speculative decoding"
            )
        if tm.warmed:
            facts.append(f"{tm.warmed.prompts} warm prompts, {tm.warmed.tokens} tokens prefilled")
        if tm.ssd is not None and tm.ssd.off:
            facts.append(f"SSD prompt cache off: {tm.ssd.why}")
        elif tm.ssd is not None:
            facts.append(
                f"SSD prompt cache {len(tm.ssd.files)} blocks, {tm.ssd.nbytes / 2**20:.0f} of "
                f"{tm.ssd.budget / 2**20:.0f} MiB"
            )
        return f"MLX model loaded successfully: {tm.path} ({'; '.join(facts)})"

    # -- Free ---------------------------------------------------------------------------------
    async def free(self) -> str:
        """LocalAI's Free (before every unload, 5 s): stop jobs, empty the slot."""
        async with self.lock:
            await (
                self.finetunes.stop_all()
            )  # LocalAI's stop: Free, then SIGTERM (a checkpoint is kept)
            await self.quantizations.stop_all(timeout=5)  # no partial output is kept
            await self._empty("the model was freed (Free)")
        return "model freed"

    async def shutdown(self):
        """SIGTERM (LocalAI waits 15 s, then SIGKILL): jobs stop (a fine-tune keeps a checkpoint),
        the prompt cache is saved, the worker ends its tasks and stops."""
        await self.finetunes.stop_all(timeout=6)
        await self.quantizations.stop_all(timeout=4)
        try:
            await asyncio.wait_for(self.text.persist(), timeout=8)
        except Exception as exc:  # never block the exit LocalAI waits for
            print(f"mlxbackend: prompt cache not saved: {exc}", file=sys.stderr, flush=True)
        self.worker.stop()

    async def _empty(self, reason: str):
        """End the work in flight on the slot's model and drop it (every engine: a failed load
        may have left parts behind)."""
        await self.distributed.free()
        await self.text.free(reason)
        await self.embed.free(reason)
        await self.audio.free(reason)
        await self.image.free(reason)
        await self.vad.free(reason)
        await self.tts.free(reason)
        await self.music.free(reason)
        self.kind = self.name = ""

    def why_no_text(self) -> str:
        """NotLoaded's message for text RPCs when the slot holds another kind of model."""
        if self.kind == "encoder":
            return (
                f"the loaded model {os.path.basename(self.name)} is an encoder: it serves Embedding and "
                "Rerank, not text generation (load an LLM for that)"
            )
        if self.kind in ("whisper", "image", "vad", "tts", "music"):
            return f"the loaded model {os.path.basename(self.name)} is a {self.kind} model, not a text LLM"
        return ""

    def why_no_vad(self) -> str:
        """NotLoaded's message for VAD when the slot holds another kind of model."""
        if self.kind:
            return (
                f"the loaded model {os.path.basename(self.name)} is a {self.kind} model; VAD needs "
                "a Silero VAD model (LoadModel of silero_vad_16k.safetensors, or Type vad)"
            )
        return ""

    def why_no_tts(self) -> str:
        """NotLoaded's message for TTS when the slot holds another kind of model."""
        if self.kind:
            return (
                f"the loaded model {os.path.basename(self.name)} is a {self.kind} model; TTS needs "
                "a TTS model (LoadModel of a Kokoro or Soprano folder, or Type tts)"
            )
        return ""

    def why_no_music(self) -> str:
        """NotLoaded's message for SoundGeneration when the slot holds another kind of model."""
        if self.kind:
            return (
                f"the loaded model {os.path.basename(self.name)} is a {self.kind} model; "
                "SoundGeneration needs a music model (LoadModel of a MiniMax Music 3 folder, or "
                "Type music)"
            )
        return ""

    # -- Status ---------------------------------------------------------------------------------
    def status(self) -> Status:
        """Not for a distributed group (its Status is the rank-0 process's, see servicer)."""
        if self.kind:
            state = "BUSY" if self.worker.busy() else "READY"
        else:
            state = "BUSY" if self.loading else "UNINITIALIZED"
        memory = self.text.memory() if self.text.current is not None else self.embed.memory()
        if self.malloc_mmap:
            memory["malloc_mmap_threshold"] = self.malloc_mmap
        return Status(state, memory, usage_total(memory))

    # -- the vector store ------------------------------------------------------------------------
    async def open_store(self, path: str = "", model_path: str = ""):
        """Open the vector store at Options store_path (relative to ModelPath); memory-only without one."""
        from mlxbackend.store import VectorStore

        if path and not os.path.isabs(path) and model_path:
            path = os.path.join(model_path, path)
        self.store = await self.worker.run(VectorStore.open, path or None)
        return self.store

    async def stores(self):
        return self.store if self.store is not None else await self.open_store()


def is_job_process(req: LoadRequest) -> bool:
    """Fine-tune/quantize job processes load the backend's own name with nothing else set."""
    return (
        bool(req.model)
        and not (req.model_file or req.model_path)
        and (req.model == BACKEND_NAME or ("/" not in req.model and not os.path.exists(req.model)))
    )


def model_kind(req: LoadRequest, options: dict, group: DistributedGroup) -> tuple:
    """(kind, where) for a LoadModel request, from its Type, Options and the files (a thread)."""

    whisper = whisper_dir(req.model, req.model_file, req.model_path, req.type)
    if whisper is not None:
        return "whisper", whisper
    vad = vad_source(req.model, req.model_file, req.model_path, req.type)
    if vad is not None:
        return "vad", vad
    tts = tts_source(req.model, req.model_file, req.model_path, req.type)
    if tts is not None:
        return "tts", tts
    music = music_source(req.model, req.model_file, req.model_path, req.type)
    if music is not None:
        return "music", music
    diffusion = diffusion_dir(req.model, req.model_file, req.model_path, req.pipeline_type)
    if diffusion is not None:
        return "image", diffusion
    encoder = encoder_dir(req.model, req.model_file, req.model_path)
    if encoder is not None:
        return "encoder", encoder
    if group.wanted(options):  # Options hostfile / MLX_DISTRIBUTED_HOSTFILE
        return "distributed", req.model
    return "text", req.model or req.model_file
