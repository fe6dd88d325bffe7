"""A seeded fuzzer for the 34 Backend RPCs, generated from proto/backend.proto's descriptors.

Every input is derived from (seed, rpc, index) alone, so any finding can be replayed with
`scripts/fuzz.py --seed S --only RPC:INDEX`. Inputs are of four kinds:

- random: a message built from the request descriptor (every field type, nested messages,
  repeated fields, maps, oneofs) with values from edge-case pools: empty / multi-MB / NUL /
  non-BMP strings, invalid UTF-8 bytes, negative and huge integers, NaN / inf floats, unknown
  enum values, and paths outside any model folder (/etc/passwd, ../.., /proc/self/mem, a FIFO,
  a directory, /dev/zero, /dev/full);
- mutated: a valid request for the RPC (see `bases`) with one to three fields replaced;
- raw: bytes that are not a valid message (random, bit-flipped, truncated, bad varints,
  lengths past the end);
- big: a message of ~45 MB (under LocalAI's 50 MB limit, limits.MAX_MESSAGE) or just over it.

`run_inputs` sends them to a real server process, with a deadline per call; streaming RPCs are
read to the end or cut after a random number of replies. After every input Health must answer OK
and the process must be alive; INTERNAL / UNKNOWN statuses are findings.

When the tests run as root, the server is started as `nobody` (setpriv) so that a path the
fuzzer invents can never overwrite a system file; outputs it means to write go to a sandbox.
"""

import os
import random
import shutil
import stat
import struct
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from google.protobuf import descriptor as d
from google.protobuf import message_factory

from mlxbackend.limits import MAX_MESSAGE
from mlxbackend.proto import backend_pb2 as pb

SERVICE = pb.DESCRIPTOR.services_by_name["Backend"]
RPCS = [m.name for m in SERVICE.methods]
STREAMING = {m.name for m in SERVICE.methods if m.server_streaming}
# Calls that change which model is loaded: the runner restores the state after them.
STATEFUL = {"LoadModel", "Free"}
# Fields whose value names a file or folder the backend reads or writes.
PATHY = (
    "path",
    "dir",
    "file",
    "dst",
    "src",
    "model",
    "dataset",
    "checkpoint",
    "adapter",
    "audio",
    "image",
    "video",
    "mmproj",
    "tokenizer",
    "source",
    "resume",
    "output",
)
OUTPUTS = ("output", "dst")  # fields the backend writes to (GenerateImage/TTS dst, job outputs)
# Option keys the backend reads (LoadModel Options "key:value", extra_options maps).
OPTION_KEYS = (
    "store_path",
    "hostfile",
    "group_size",
    "eos_token",
    "dtype",
    "threads",
    "max_kv_bytes",
    "cache_type_k",
    "cache_type_v",
    "kv_bits",
    "kv_group_size",
    "kv_rotate",
    "kv_window",
    "scheduler",
    "scheduler_type",
    "rerank_instruction",
    "prompt_cache",
    "prompt_cache_dir",
    "prompt_cache_bytes",
    "prompt_cache_entries",
    "prefill_chunk",
    "pre_tokenizer",
    "pooling",
    "perplexity_text",
    "overwrite",
    "normalize",
    "name",
    "model_path",
    "memory_check",
    "max_queue",
    "max_batch",
    "lr_schedule",
    "json_schema",
    "embedding_max_tokens",
    "distributed_split",
    "distributed_mode",
    "distributed_backend",
    "coordinator",
    "trust_remote_code",
    "mask_prompt",
    "max_seq_length",
    "eval_steps",
    "val_batches",
    "validation_split",
    "num_layers",
    "max_grad_norm",
    "beta",
    "text_feature",
    "prompt_feature",
    "completion_feature",
    "chat_feature",
    "momentum",
    "calibration_text",
    "method",
    "bits",
    "enable_thinking",
    "gpu",
    "use_safetensors",
    "max_cache_entries",
    "max_tokens",
    "temp",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "xtc_probability",
    "xtc_threshold",
    "typical_p",
    "mirostat",
    "mirostat_tau",
    "mirostat_eta",
    "pad_token",
    "bos_token",
)
INT_RANGES = {
    d.FieldDescriptor.CPPTYPE_INT32: (-(2**31), 2**31 - 1),
    d.FieldDescriptor.CPPTYPE_INT64: (-(2**63), 2**63 - 1),
    d.FieldDescriptor.CPPTYPE_UINT32: (0, 2**32 - 1),
    d.FieldDescriptor.CPPTYPE_UINT64: (0, 2**64 - 1),
}
INTS = (
    0,
    1,
    -1,
    2,
    3,
    7,
    8,
    64,
    255,
    256,
    1000,
    4096,
    65535,
    2**24,
    2**31 - 1,
    -(2**31),
    2**32 - 1,
    2**53,
    2**63 - 1,
    -(2**63),
    2**64 - 1,
)
FLOATS = (
    0.0,
    -0.0,
    1.0,
    -1.0,
    0.5,
    2.0,
    1e-45,
    1e-8,
    100.0,
    1e9,
    3.4e38,
    -3.4e38,
    float("nan"),
    float("inf"),
    float("-inf"),
)
BIG = 45 * 1024 * 1024  # a message near, but under, MAX_MESSAGE


@dataclass
class Sandbox:
    """Files the fuzzer points paths at; `out` is the only place the server may write."""

    root: Path
    out: Path
    fifo: Path
    folder: Path
    garbage: Path
    empty: Path
    models: dict = field(default_factory=dict)  # state name -> model folder (valid requests)
    extras: dict = field(default_factory=dict)  # name -> file (a wav, a dataset)

    def reading(self) -> list:
        """Paths outside any model folder, or not files at all, for fields the backend reads."""
        return [
            "/etc/passwd",
            "/etc/shadow",
            "/proc/self/mem",
            "/proc/self/environ",
            "/dev/zero",
            "/dev/urandom",
            "/dev/null",
            "/",
            "..",
            "../..",
            "../../../../../../etc/passwd",
            "~",
            "~root/.ssh/id_rsa",
            "$HOME",
            "C:\\Windows\\win.ini",
            "file:///etc/passwd",
            "http://127.0.0.1:1/model",
            "org/does-not-exist",
            "./",
            "nul\x00byte",
            str(self.fifo),
            str(self.folder),
            str(self.garbage),
            str(self.empty),
            str(self.folder / ".." / ".." / "etc" / "passwd"),
            str(self.root / "missing"),
            *[str(p) for p in self.models.values()],
            *[str(p) for p in self.extras.values()],
            *[str(p / "config.json") for p in self.models.values()],
        ]

    def writing(self) -> list:
        """Output paths: all inside the sandbox, or special files that cannot be written."""
        return [
            str(self.out / "x"),
            str(self.out / "a" / "b" / "c.png"),
            str(self.out / "fifo-out"),
            str(self.fifo),
            str(self.folder),
            str(self.garbage),
            "/dev/full",
            "/dev/null",
            str(self.out / "x.gguf"),
            str(self.out / ("n" * 300)),
            str(self.out / "."),
            "/proc/self/status",
            "/etc/passwd",
            "/",
            "",
            "relative/out",
        ]


def make_sandbox(root: Path) -> Sandbox:
    root.mkdir(parents=True, exist_ok=True)
    out = root / "out"
    out.mkdir(exist_ok=True)
    fifo = root / "fifo"
    if not fifo.exists():
        os.mkfifo(fifo)
    folder = root / "folder"
    (folder / "sub").mkdir(parents=True, exist_ok=True)
    garbage = root / "garbage.bin"
    garbage.write_bytes(random.Random(0).randbytes(4096))
    empty = root / "empty"
    empty.write_bytes(b"")
    for p in (root, folder, folder / "sub"):
        p.chmod(0o755)
    for p in (out, fifo):
        p.chmod(0o777)
    for p in (garbage, empty):
        p.chmod(0o644)
    return Sandbox(root=root, out=out, fifo=fifo, folder=folder, garbage=garbage, empty=empty)


def message_class(desc):
    return message_factory.GetMessageClass(desc)


def request_class(rpc: str):
    return message_class(SERVICE.methods_by_name[rpc].input_type)


def is_repeated(f) -> bool:
    rep = getattr(f, "is_repeated", None)
    return rep if rep is not None else f.label == d.FieldDescriptor.LABEL_REPEATED


def is_map(f) -> bool:
    return f.type == d.FieldDescriptor.TYPE_MESSAGE and f.message_type.GetOptions().map_entry


class Gen:
    """Values and messages from one random.Random; `big` allows multi-MB strings."""

    def __init__(self, rng: random.Random, box: Sandbox, job_ids=(), big: bool = True):
        self.rng, self.box, self.job_ids, self.big = rng, box, list(job_ids), big
        self.budget = 8 * 1024 * 1024 if big else 256 * 1024  # bytes of huge values per message

    def chance(self, p: float) -> bool:
        return self.rng.random() < p

    def huge(self, unit: str = "x") -> str:
        n = self.rng.choice((64 * 1024, 512 * 1024, 2 * 1024 * 1024, 6 * 1024 * 1024))
        n = min(n, self.budget)
        self.budget -= n
        return unit * max(n // len(unit), 0)

    def text(self, name: str = "") -> str:
        rng, lname = self.rng, name.lower()
        if "job_id" in lname and self.job_ids and self.chance(0.5):
            return rng.choice(self.job_ids)
        if any(k in lname for k in PATHY) and self.chance(0.6):
            pool = self.box.writing() if any(k in lname for k in OUTPUTS) else self.box.reading()
            return rng.choice(pool)
        r = rng.random()
        if r < 0.03 and self.budget > 0:
            return self.huge(rng.choice(("x", "é", "🙂", "the ", "\x00")))
        if r < 0.35:
            return rng.choice(
                (
                    "",
                    " ",
                    "a",
                    "hello world",
                    "\x00",
                    "a\x00b",
                    "é漢字🙂\u202e",
                    "\ufeff",
                    "-1",
                    "0",
                    "NaN",
                    "1e999",
                    "true",
                    "null",
                    "{}",
                    "[]",
                    '{"type":"object"}',
                    '{"type": 5}',
                    "[{",
                    "%s%n%x",
                    "\n" * 200,
                    "a" * 5000,
                    "<|im_start|>",
                    "<think>",
                    "\r\n\t",
                    "root ::= x",
                    "root ::= root",
                    "lora",
                    "full",
                    "dpo",
                    "q4_k_m",
                    "q8_0",
                    "f16",
                    "mxfp4",
                    "merged_16bit",
                    "gguf",
                    "sgd",
                    "bf16",
                    "cosine",
                    "word",
                    "segment",
                    "euler",
                    "flux",
                    "sd3",
                    "StableDiffusion3Pipeline",
                    "store",
                    "whisper",
                )
            )
        if r < 0.55:
            return rng.choice(self.box.reading() + self.box.writing())
        if r < 0.65:
            return f"{rng.choice(OPTION_KEYS)}:{self.text()[:200] if self.chance(0.5) else rng.choice(('', '1', '-1', '0.5', 'true', 'nan', '99999999999'))}"
        n = rng.choice((1, 5, 30, 300))
        return "".join(
            chr(
                rng.choice(
                    (rng.randint(32, 126), rng.randint(0xA0, 0xD7FF), rng.randint(0xE000, 0x10FFFF))
                )
            )
            for _ in range(n)
        )

    def blob(self) -> bytes:
        rng, r = self.rng, self.rng.random()
        if r < 0.03 and self.budget > 0:
            return self.huge().encode()
        if r < 0.5:
            return rng.choice(
                (
                    b"",
                    b"\xff",
                    b"\xc3\x28",
                    b"\xed\xa0\x80",
                    b"\xf8\x88\x80\x80\x80",
                    b"\x00" * 64,
                    b"RIFF\xff\xff\xff\xffWAVEfmt ",
                    b"\x89PNG\r\n\x1a\n",
                    b"\x1f\x8b\x08\x00",
                    "é漢字🙂".encode(),
                    b"OK",
                )
            )
        return rng.randbytes(rng.choice((1, 16, 300, 5000)))

    def integer(self, cpp: int) -> int:
        lo, hi = INT_RANGES[cpp]
        v = self.rng.choice(INTS) if self.chance(0.7) else self.rng.randint(-1000, 100000)
        return min(max(v, lo), hi)

    def number(self, cpp: int) -> float:
        v = self.rng.choice(FLOATS) if self.chance(0.7) else self.rng.uniform(-1e6, 1e6)
        if cpp == d.FieldDescriptor.CPPTYPE_DOUBLE and self.chance(0.2):
            v = self.rng.choice((1e308, -1e308, 5e-324))
        return v

    def scalar(self, f):
        cpp = f.cpp_type
        if cpp == d.FieldDescriptor.CPPTYPE_STRING:
            return self.blob() if f.type == d.FieldDescriptor.TYPE_BYTES else self.text(f.name)
        if cpp in INT_RANGES:
            return self.integer(cpp)
        if cpp in (d.FieldDescriptor.CPPTYPE_FLOAT, d.FieldDescriptor.CPPTYPE_DOUBLE):
            return self.number(cpp)
        if cpp == d.FieldDescriptor.CPPTYPE_BOOL:
            return self.chance(0.5)
        if cpp == d.FieldDescriptor.CPPTYPE_ENUM:  # proto3 enums are open: unknown values too
            known = [v.number for v in f.enum_type.values]
            return (
                self.rng.choice(known) if self.chance(0.7) else self.rng.choice((-1, 99, 2**31 - 1))
            )
        raise TypeError(f"no scalar for {f.full_name}")

    def count(self) -> int:
        r = self.rng.random()
        if r < 0.05:
            return self.rng.choice((1000, 10000)) if self.big else 200
        return self.rng.choice((0, 1, 1, 2, 3, 8))

    def set_field(self, msg, f, depth: int):
        """Replace msg.<f> with a random value (any kind of field)."""
        msg.ClearField(f.name)
        target = getattr(msg, f.name)
        if is_map(f):
            key_f, val_f = (
                f.message_type.fields_by_name["key"],
                f.message_type.fields_by_name["value"],
            )
            for _ in range(self.count()):
                key = (
                    self.scalar(key_f)
                    if not (key_f.cpp_type == d.FieldDescriptor.CPPTYPE_STRING and self.chance(0.6))
                    else self.rng.choice(OPTION_KEYS)
                )
                if val_f.cpp_type == d.FieldDescriptor.CPPTYPE_MESSAGE:
                    target[key].CopyFrom(self.message(val_f.message_type, depth + 1))
                else:
                    target[key] = self.scalar(val_f)
        elif is_repeated(f):
            n = self.count()
            if f.cpp_type == d.FieldDescriptor.CPPTYPE_MESSAGE:
                for _ in range(min(n, 200)):
                    target.add().CopyFrom(self.message(f.message_type, depth + 1))
            elif n >= 1000 and f.cpp_type != d.FieldDescriptor.CPPTYPE_STRING:
                v = self.scalar(f)
                target.extend([v] * n)
            else:
                target.extend(self.scalar(f) for _ in range(n))
        elif f.cpp_type == d.FieldDescriptor.CPPTYPE_MESSAGE:
            getattr(msg, f.name).CopyFrom(self.message(f.message_type, depth + 1))
        else:
            setattr(msg, f.name, self.scalar(f))

    def message(self, desc, depth: int = 0, p: float = 0.35):
        """A message of type desc with each field set with probability p (one per oneof)."""
        msg = message_class(desc)()
        if depth > 4:
            return msg
        for f in desc.fields:
            if self.chance(p):
                self.set_field(msg, f, depth)
        return msg

    def mutate(self, base):
        """base with one to three fields replaced or cleared."""
        msg = type(base)()
        msg.CopyFrom(base)
        fields = list(msg.DESCRIPTOR.fields)
        if not fields:
            return msg
        for f in self.rng.sample(fields, min(len(fields), self.rng.choice((1, 1, 2, 3)))):
            if self.chance(0.15):
                msg.ClearField(f.name)
            else:
                self.set_field(msg, f, 1)
        return msg

    def raw(self, base: bytes) -> bytes:
        """Bytes that are (mostly) not a valid message."""
        rng, r = self.rng, self.rng.random()
        if r < 0.2:
            return rng.randbytes(rng.choice((1, 7, 64, 1024, 65536)))
        if r < 0.4 and base:
            b = bytearray(base)
            for _ in range(rng.choice((1, 2, 8))):
                b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
            return bytes(b)
        if r < 0.5 and base:
            return base[: rng.randrange(len(base))]
        if r < 0.6:
            return b"\x08" + b"\xff" * 11  # varint too long
        if r < 0.7:
            return b"\x0a" + b"\xff\xff\xff\xff\x0f" + b"abc"  # length past the end
        if r < 0.8:
            return (
                base + bytes([rng.choice((0x07, 0x0F, 0x00))]) + rng.randbytes(5)
            )  # bad wire type / tag 0
        if r < 0.9:
            tag = rng.randint(1, 536870911)
            return (
                base + encode_varint(tag << 3 | 2) + encode_varint(3) + b"\xff\xfe\x00"
            )  # unknown field
        return b"\x0a\x00" * rng.choice((1, 1000, 200000))  # a field repeated many times


def encode_varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def big_message(rpc: str, base, over: bool = False) -> bytes:
    """base with its first string/bytes field (or an unknown field) grown to ~45 MB, or past MAX_MESSAGE."""
    msg = type(base)()
    msg.CopyFrom(base)
    size = MAX_MESSAGE + 1024 if over else BIG
    for f in msg.DESCRIPTOR.fields:
        if f.cpp_type == d.FieldDescriptor.CPPTYPE_STRING and not is_repeated(f) and not is_map(f):
            setattr(
                msg,
                f.name,
                b"\x00" * size
                if f.type == d.FieldDescriptor.TYPE_BYTES
                else "hello " * (size // 6),
            )
            return msg.SerializeToString()
        if f.cpp_type == d.FieldDescriptor.CPPTYPE_STRING and is_repeated(f) and not is_map(f):
            item = b"\x00" * 1000 if f.type == d.FieldDescriptor.TYPE_BYTES else "word " * 200
            getattr(msg, f.name).extend([item] * (size // 1000))
            return msg.SerializeToString()
    return (
        msg.SerializeToString()
        + encode_varint(1000 << 3 | 2)
        + encode_varint(size)
        + b"\x00" * size
    )


# a 2×2 RGB PNG, base64 (the VLM state's image)
TINY_PNG = "iVBORw0KGgoAAAANSUhEUgAAAAIAAAACCAIAAAD91JpzAAAAFklEQVR4nGP4z8DAwMDAxMDAwMDAAAANHQEDasKb6QAAAABJRU5ErkJggg=="


def bases(box: Sandbox) -> dict:
    """One valid request per RPC (built against the sandbox's models), the seeds of mutation."""
    text = box.models.get("text", box.root / "no-text-model")
    out = box.out
    wav = box.extras.get("wav", box.garbage)
    data = box.extras.get("dataset", box.garbage)
    return {
        "Health": pb.HealthMessage(),
        "Free": pb.HealthMessage(),
        "Status": pb.HealthMessage(),
        "Predict": pb.PredictOptions(Prompt="hello", Tokens=4, Temperature=0.7, Seed=1),
        "PredictStream": pb.PredictOptions(
            Messages=[pb.Message(role="user", content="hi")],
            UseTokenizerTemplate=True,
            Tokens=4,
            Logprobs=1,
        ),
        "TokenizeString": pb.PredictOptions(Prompt="hello world"),
        "Embedding": pb.PredictOptions(Embeddings="hello world"),
        "LoadModel": pb.ModelOptions(Model=text.name, ModelPath=str(text.parent), ContextSize=512),
        "ModelMetadata": pb.ModelOptions(Model=text.name, ModelPath=str(text.parent)),
        "GetMetrics": pb.MetricsRequest(),
        "GenerateImage": pb.GenerateImageRequest(
            positive_prompt="a red square",
            width=64,
            height=64,
            step=2,
            seed=1,
            dst=str(out / "img.png"),
        ),
        "GenerateVideo": pb.GenerateVideoRequest(prompt="a cat", dst=str(out / "v.mp4")),
        "AudioTranscription": pb.TranscriptRequest(dst=str(wav), language="en"),
        "AudioTranscriptionStream": pb.TranscriptRequest(dst=str(wav)),
        "TTS": pb.TTSRequest(text="hello", dst=str(out / "tts.wav")),
        "TTSStream": pb.TTSRequest(text="hello"),
        "SoundGeneration": pb.SoundGenerationRequest(text="rain", dst=str(out / "s.wav")),
        "Detect": pb.DetectOptions(src=str(box.garbage)),
        "StoresSet": pb.StoresSetOptions(
            Keys=[pb.StoresKey(Floats=[1.0, 0.0]), pb.StoresKey(Floats=[0.0, 1.0])],
            Values=[pb.StoresValue(Bytes=b"a"), pb.StoresValue(Bytes=b"b")],
        ),
        "StoresDelete": pb.StoresDeleteOptions(Keys=[pb.StoresKey(Floats=[1.0, 0.0])]),
        "StoresGet": pb.StoresGetOptions(Keys=[pb.StoresKey(Floats=[0.0, 1.0])]),
        "StoresFind": pb.StoresFindOptions(Key=pb.StoresKey(Floats=[1.0, 0.0]), TopK=2),
        "Rerank": pb.RerankRequest(query="cats", documents=["a cat", "a car"], top_n=1),
        "VAD": pb.VADRequest(audio=[0.0, 0.1, -0.1]),
        "AudioEncode": pb.AudioEncodeRequest(),
        "AudioDecode": pb.AudioDecodeRequest(),
        "StartFineTune": pb.FineTuneRequest(
            model=str(text),
            dataset_source=str(data),
            output_dir=str(out / "ft"),
            max_steps=1,
            batch_size=1,
            adapter_rank=2,
        ),
        "FineTuneProgress": pb.FineTuneProgressRequest(job_id="job-1"),
        "StopFineTune": pb.FineTuneStopRequest(job_id="job-1", save_checkpoint=True),
        "ListCheckpoints": pb.ListCheckpointsRequest(output_dir=str(out / "ft")),
        "ExportModel": pb.ExportModelRequest(
            checkpoint_path=str(out / "ft"),
            output_path=str(out / "export"),
            export_format="lora",
            model=str(text),
        ),
        "StartQuantization": pb.QuantizationRequest(
            model=str(text), quantization_type="q8_0", output_dir=str(out / "q")
        ),
        "QuantizationProgress": pb.QuantizationProgressRequest(job_id="q-1"),
        "StopQuantization": pb.QuantizationStopRequest(job_id="q-1"),
    }


@dataclass
class Input:
    rpc: str
    index: int
    kind: str  # random | mutated | raw | big | over
    payload: bytes
    cut: int | None  # streaming: cancel after this many replies (None: read to the end)
    summary: str


def make_input(
    seed: int, rpc: str, index: int, box: Sandbox, base, job_ids=(), big: bool = True
) -> Input:
    """The index-th input for rpc under seed (deterministic)."""
    rng = random.Random(f"{seed}:{rpc}:{index}")
    gen = Gen(rng, box, job_ids, big=big)
    r = rng.random()
    if big and r < 0.01:
        kind, payload, summary = "big", big_message(rpc, base), "~45 MB message"
    elif big and r < 0.015:
        kind, payload, summary = (
            "over",
            big_message(rpc, base, over=True),
            "message over MAX_MESSAGE",
        )
    elif r < 0.15:
        kind = "raw"
        payload = gen.raw(base.SerializeToString())
        summary = f"raw {len(payload)} bytes: {payload[:40]!r}"
    else:
        msg = gen.mutate(base) if r < 0.6 else gen.message(base.DESCRIPTOR)
        kind = "mutated" if r < 0.6 else "random"
        payload = msg.SerializeToString()
        summary = short(msg)
    cut = rng.choice((None, None, 0, 1, 2)) if rpc in STREAMING else None
    return Input(rpc, index, kind, payload, cut, summary)


def short(msg, limit: int = 600) -> str:
    """A one-line, length-capped description of msg (huge values shown by their size)."""
    parts = []
    for f, v in msg.ListFields():
        if isinstance(v, (str, bytes)) and len(v) > 80:
            v = f"<{type(v).__name__} len={len(v)} {v[:30]!r}…>"
        else:
            v = repr(
                v
                if not hasattr(v, "__len__") or isinstance(v, (str, bytes)) or len(v) < 12
                else f"<{len(v)} items>"
            )
            v = v if len(v) < 160 else v[:160] + "…"
        parts.append(f"{f.name}={v}")
    text = f"{type(msg).__name__}({', '.join(parts)})"
    return text if len(text) < limit else text[:limit] + "…"


@dataclass
class Finding:
    input: Input
    code: str
    message: str
    state: str


@dataclass
class Report:
    tried: Counter = field(default_factory=Counter)  # rpc -> inputs sent
    codes: dict = field(default_factory=lambda: defaultdict(Counter))  # rpc -> code -> count
    findings: list = field(default_factory=list)
    seconds: float = 0.0

    def total(self) -> int:
        return sum(self.tried.values())

    def table(self) -> str:
        lines = [f"{'rpc':26} {'inputs':>6}  statuses"]
        for rpc in RPCS:
            codes = ", ".join(f"{c} {n}" for c, n in self.codes[rpc].most_common())
            lines.append(f"{rpc:26} {self.tried[rpc]:6}  {codes}")
        lines.append(
            f"{'total':26} {self.total():6}  in {self.seconds:.0f} s, {len(self.findings)} findings"
        )
        return "\n".join(lines)


BAD_CODES = {"INTERNAL", "UNKNOWN", "DATA_LOSS"}


def call(channel, inp: Input, timeout: float) -> tuple[str, str, bytes]:
    """(status code name, details, the unary reply) for one raw input."""
    path = f"/{SERVICE.full_name}/{inp.rpc}"
    try:
        if inp.rpc in STREAMING:
            stream = channel.unary_stream(path)(inp.payload, timeout=timeout)
            n = 0
            for _ in stream:
                if inp.cut is not None and n >= inp.cut:
                    stream.cancel()
                    return "CUT", "", b""
                n += 1
            return "OK", "", b""
        return "OK", "", channel.unary_unary(path)(inp.payload, timeout=timeout)
    except grpc.RpcError as exc:
        return exc.code().name, exc.details() or "", b""


def open_channel(addr: str):
    limit = MAX_MESSAGE + 16 * 1024 * 1024  # so that over-limit messages reach the server
    return grpc.insecure_channel(
        addr,
        options=[
            ("grpc.max_send_message_length", limit),
            ("grpc.max_receive_message_length", limit),
        ],
    )


def healthy(channel, timeout: float = 10) -> bool:
    try:
        reply = channel.unary_unary(f"/{SERVICE.full_name}/Health")(b"", timeout=timeout)
        return pb.Reply.FromString(reply).message == b"OK"
    except grpc.RpcError:
        return False


def worker_wait(channel, timeout: float = 120) -> float | None:
    """Seconds until a call that needs the MLX worker (StoresGet: any status but a deadline will
    do) is answered; None if it is not answered within timeout."""
    t0 = time.time()
    try:
        channel.unary_unary(f"/{SERVICE.full_name}/StoresGet")(b"", timeout=timeout)
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
            return None
    return time.time() - t0


CANCEL_GRACE = 30.0  # seconds the worker may stay busy after a call's deadline


def run_inputs(
    server,
    channel,
    inputs,
    report: Report,
    state: str,
    restore=None,
    timeout: float = 30,
    job_ids=None,
    log=print,
) -> None:
    """Send each input; after each: process alive, Health OK; worker alive after timeouts.
    Jobs a fuzzed Start* call starts are stopped at once (their ids feed `job_ids`)."""
    start = time.time()
    for inp in inputs:
        t0 = time.time()
        code, message, reply = call(channel, inp, timeout)
        if code == "OK" and inp.rpc in ("StartFineTune", "StartQuantization"):
            job = stop_job(channel, inp.rpc, reply)
            if job_ids is not None:
                job_ids.append(job)
        report.tried[inp.rpc] += 1
        report.codes[inp.rpc][code] += 1
        problems = []
        if code in BAD_CODES:
            problems.append((code, message))
        if server.proc.poll() is not None:
            problems.append(("CRASH", f"server exited with {server.proc.returncode}"))
        elif not healthy(channel):
            problems.append(("HEALTH", "Health did not answer OK within 10 s"))
        elif code == "DEADLINE_EXCEEDED":
            busy = worker_wait(channel)
            if busy is None:
                problems.append(
                    (
                        "HANG",
                        f"the worker is still busy 120 s after the call's {timeout:.0f} s deadline",
                    )
                )
            elif busy > CANCEL_GRACE:
                problems.append(
                    (
                        "SLOW_CANCEL",
                        f"the worker stayed busy {busy:.0f} s after the call's deadline",
                    )
                )
        for c, m in problems:
            report.findings.append(Finding(inp, c, m, state))
            log(
                f"FINDING [{state}] {inp.rpc}#{inp.index} ({inp.kind}) -> {c}: {m[:500]}\n    input: {inp.summary}"
            )
        if problems and problems[-1][0] in ("CRASH", "HEALTH"):
            raise RuntimeError(f"server lost after {inp.rpc}#{inp.index}: {problems[-1][1]}")
        if restore is not None and inp.rpc in STATEFUL:
            restore()
        if time.time() - t0 > 20:
            log(
                f"slow: {inp.rpc}#{inp.index} ({inp.kind}) {code} in {time.time() - t0:.0f} s: {inp.summary[:200]}"
            )
    report.seconds += time.time() - start


def as_nobody(cmd: list) -> list:
    """When run as root: the server process runs as nobody, so invented paths cannot damage the
    system. It keeps CAP_DAC_READ_SEARCH (read anything, write nothing it does not own): the venv
    may live under a private home."""
    if os.geteuid() != 0:
        return cmd
    caps = ["--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search"]
    # setpriv aborts with OpenBLAS preloaded (its threads vs setresuid); run.sh preloads it again
    return [
        "env",
        "-u",
        "LD_PRELOAD",
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        *caps,
        *cmd,
    ]


def can_drop_root() -> bool:
    return os.geteuid() != 0 or shutil.which("setpriv") is not None


def server_env(box: Sandbox) -> dict:
    home = box.root / "home"
    (home / "tmp").mkdir(parents=True, exist_ok=True)
    for p in (home, home / "tmp"):
        p.chmod(0o777)
    return {
        "HOME": str(home),
        "TMPDIR": str(home / "tmp"),
        "XDG_CACHE_HOME": str(home / ".cache"),
        "HF_HOME": str(home / ".cache" / "hf"),
        "HF_HUB_OFFLINE": "1",
        "MLXB_MODELS_DIR": str(box.out),
    }


def in_dir(folder: Path):
    """A conftest.Server parent_cmd: start in folder (relative paths land in the sandbox), as nobody."""

    def wrap(cmd):
        return as_nobody(["sh", "-c", 'cd "$0" && exec "$@"', str(folder), *cmd])

    return wrap


def write_wav(path: Path, seconds: float = 1.0, rate: int = 16000) -> Path:
    """A short 16-bit mono tone (for valid transcription requests)."""
    import math

    n = int(seconds * rate)
    frames = b"".join(
        struct.pack("<h", int(8000 * math.sin(2 * math.pi * 440 * i / rate))) for i in range(n)
    )
    header = (
        b"RIFF"
        + struct.pack("<I", 36 + len(frames))
        + b"WAVEfmt "
        + struct.pack("<IHHIIHH", 16, 1, 1, rate, rate * 2, 2, 16)
        + b"data"
        + struct.pack("<I", len(frames))
    )
    path.write_bytes(header + frames)
    path.chmod(0o644)
    return path


def write_dataset(path: Path) -> Path:
    path.write_text('{"text": "hello world"}\n{"text": "the cat sat"}\n')
    path.chmod(0o644)
    return path


def open_tree(folder: Path) -> None:
    """Make a model folder readable by the unprivileged server."""
    for p in [folder, *folder.rglob("*")]:
        p.chmod(p.stat().st_mode | stat.S_IROTH | (stat.S_IXOTH if p.is_dir() else 0))


def stop_job(channel, rpc: str, reply_bytes: bytes) -> str:
    """Stop the job a fuzzed Start* call started, so that jobs do not pile up; its id."""
    cls = pb.FineTuneJobResult if rpc == "StartFineTune" else pb.QuantizationJobResult
    job = cls.FromString(reply_bytes).job_id
    stop = "StopFineTune" if rpc == "StartFineTune" else "StopQuantization"
    req = (
        pb.FineTuneStopRequest(job_id=job)
        if stop == "StopFineTune"
        else pb.QuantizationStopRequest(job_id=job)
    )
    try:
        channel.unary_unary(f"/{SERVICE.full_name}/{stop}")(req.SerializeToString(), timeout=30)
    except grpc.RpcError:
        pass
    return job


STATES = ("none", "text", "encoder", "whisper", "sd3", "vlm", "vad", "music")


def build_models(box: Sandbox, states) -> None:
    """The tiny models each state loads (random weights, real checkpoint layouts), readable by nobody."""
    models = box.root / "models"
    models.mkdir(exist_ok=True)
    models.chmod(0o755)
    from tests.tiny_model import build_tiny_model

    box.models["text"] = build_tiny_model(models / "tiny-random", trained=False)
    if "encoder" in states:
        from tests.tiny_encoder import build_tiny_bert

        box.models["encoder"] = build_tiny_bert(
            models / "tiny-bert", st=dict(pooling="mean", normalize=True)
        )
    if "whisper" in states:
        from tests.tiny_whisper import build_tiny_whisper

        box.models["whisper"] = build_tiny_whisper(models / "whisper-tiny-random")
    if "sd3" in states:
        from tests.tiny_diffusion import build_tiny_sd3

        box.models["sd3"] = build_tiny_sd3(models / "tiny-sd3")
    if "vlm" in states:
        from tests.tiny_vlm import build_qwen25_vl

        box.models["vlm"] = build_qwen25_vl(models / "tiny-qwen-vl")
    if "vad" in states:
        import shutil

        import silero_vad

        data = Path(silero_vad.__file__).parent / "data"
        (models / "silero").mkdir(exist_ok=True)
        shutil.copy(data / "silero_vad.onnx", models / "silero" / "silero_vad.onnx")
        box.models["vad"] = models / "silero"
    if "music" in states:
        from tests.tiny_music import build_tiny_music

        box.models["music"] = build_tiny_music(models / "tiny-music")
    box.extras["wav"] = write_wav(box.root / "tone.wav")
    box.extras["dataset"] = write_dataset(box.root / "train.jsonl")
    open_tree(models)


def load_request(box: Sandbox, state: str):
    folder = box.models.get(state)
    if folder is None:
        return None
    return pb.ModelOptions(Model=folder.name, ModelPath=str(folder.parent), ContextSize=512)


def plan(
    seed: int, state: str, per_rpc: int, box: Sandbox, job_ids: list, big: bool, only=None, extra=()
):
    """Inputs in round-robin order over the RPCs (LoadModel / Free spread through the run)."""
    base = bases(box)
    if state in box.models and state != "text":  # mutate a load of this state's model
        base["LoadModel"] = load_request(box, state)
        base["ModelMetadata"] = load_request(box, state)
    if state == "vlm":  # media in the prompt: images (and a video field to mutate into)
        for rpc in ("Predict", "PredictStream"):
            base[rpc] = pb.PredictOptions()
            base[rpc].CopyFrom(bases(box)[rpc])
            base[rpc].Images.append(TINY_PNG)
            base[rpc].Videos.append("")
    rpcs = [only[0]] if only else RPCS
    indices = [only[1]] if only else range(per_rpc)
    for i in indices:
        for rpc in rpcs:
            yield make_input(f"{seed}:{state}", rpc, i, box, base[rpc], job_ids, big=big)
    for rpc, over in () if only else extra:  # chosen ~45 MB / over-limit messages
        payload = big_message(rpc, base[rpc], over=over)
        yield Input(
            rpc, -1, "over" if over else "big", payload, None, f"{len(payload)} byte {rpc} message"
        )


def fuzz(
    root: Path,
    seed: int,
    per_rpc: int,
    states=("none", "text"),
    big: bool = True,
    timeout: float = 30,
    only=None,
    extra=(),
    log=print,
) -> Report:
    """Fuzz a fresh server per state; returns the report (findings are not raised). extra:
    (rpc, over) pairs sent once per state as a ~45 MB message (over: past MAX_MESSAGE)."""
    from tests.conftest import Server

    box = make_sandbox(Path(root))
    build_models(box, states)
    report, job_ids = Report(), []
    for state in states:
        srv = Server(env=server_env(box), parent_cmd=in_dir(box.out))
        channel = open_channel(srv.addr)
        request = load_request(box, state)

        def restore(channel=channel, request=request):
            channel.unary_unary(f"/{SERVICE.full_name}/Free")(b"", timeout=60)
            if request is not None:
                reply = pb.Result.FromString(
                    channel.unary_unary(f"/{SERVICE.full_name}/LoadModel")(
                        request.SerializeToString(), timeout=120
                    )
                )
                assert reply.success, reply.message

        try:
            restore()
            t0, n0 = time.time(), report.total()
            run_inputs(
                srv,
                channel,
                plan(seed, state, per_rpc, box, job_ids, big, only, extra),
                report,
                state,
                restore=restore,
                timeout=timeout,
                job_ids=job_ids,
                log=log,
            )
            log(f"state {state}: {report.total() - n0} inputs in {time.time() - t0:.0f} s")
        finally:
            channel.close()
            srv.stop()
    return report
