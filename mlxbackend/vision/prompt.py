"""Place a request's media in its prompt and expand them into model inputs.

Where: LocalAI sends `Messages` without media placeholders (all media flattened in
`Images`/`Videos`/`Audios`) or a Go-templated `Prompt` with markers. A marker in a message or
prompt (`<__media__>`, the `media_marker` ModelMetadata reports, or LocalAI's default `[img-N]`,
`[vid-N]`, `[audio-N]`) places the next item there; items without a marker go to the last user
message (to the start of a raw prompt), as LocalAI's own MLX VLM backend and mlx-vlm do.
Messages carry media as HF content parts ({"type": "image"} …) rendered by the model's own chat
template; a raw prompt gets the text the template would write for each item.

Then the model's processor (mlx-vlm) expands each item into its tokens and pixel/feature inputs.
For the prefix cache, the tokens of each item are replaced in the cache key by ids derived from
the item's bytes, so a cached prefix is reused only for the same media."""

import hashlib
import re
from dataclasses import dataclass, field, replace

from mlxbackend.errors import InvalidInput
from mlxbackend.text import chat
from mlxbackend.vision import media as media_io

MARKER = "<__media__>"
_MARKERS = re.compile(r"<__media__>|\[(img|vid|audio)-\d+\]")
_KIND = {"img": "image", "vid": "video", "audio": "audio"}
_LIST = {"image": "images", "video": "videos", "audio": "audios"}
# mlx-vlm 0.7.10's get_input_embeddings of these families embeds a prompt's images or its videos,
# never both: such a prompt is refused instead of losing its video
IMAGES_OR_VIDEOS = ("qwen2_vl", "qwen2_5_vl")


@dataclass
class Decoded:
    """A request's media decoded, and the order the prompt refers to them."""

    images: list = field(default_factory=list)
    videos: list = field(default_factory=list)  # media.Video
    audios: list = field(default_factory=list)
    digests: dict = field(default_factory=dict)  # (kind, index) → sha256 of the item as sent
    order: list = field(default_factory=list)  # (kind, index) in prompt order
    raw: bool = False  # a raw Prompt (no chat template): the BOS is ours to write


@dataclass
class MediaInputs:
    """A media prompt ready for prefill (vision/prefill.py)."""

    inputs: dict  # processor outputs besides input_ids: pixel_values, grids, masks, features
    key_tokens: list  # the prompt tokens with media tokens replaced by content-derived ids
    media_end: int  # index after the last media token (a cached prefix past it skips the tower)
    items: int


def decode(parts, media: media_io.Media, options: dict, model_name: str) -> Decoded:
    """Decode every item (thread): limits, kinds the model accepts, bad data → INVALID_ARGUMENT."""
    media_io.check_limits(media, parts.limits)
    for kind in ("image", "video", "audio"):
        if getattr(media, _LIST[kind]) and kind not in parts.accepts:
            raise InvalidInput(f"model {model_name} takes no {kind} input")
    if media.images and media.videos and parts.model_type in IMAGES_OR_VIDEOS:
        raise InvalidInput(
            f"model {model_name} ({parts.model_type}) takes images or videos in one prompt, "
            "not both: send them in separate requests"
        )
    max_pixels = int(options.get("max_pixels", 0) or 0)
    fps = float(options.get("video_fps", media_io.DEFAULT_VIDEO_FPS))
    max_frames = int(options.get("video_max_frames", media_io.DEFAULT_VIDEO_MAX_FRAMES))
    out = Decoded()
    for i, item in enumerate(media.images):
        out.images.append(media_io.load_image(item, f"Images[{i}]", max_pixels))
    for i, item in enumerate(media.videos):
        out.videos.append(media_io.load_video(item, f"Videos[{i}]", fps, max_frames, max_pixels))
    for i, item in enumerate(media.audios):
        out.audios.append(media_io.load_audio(item, f"Audios[{i}]"))
    for kind in ("image", "video", "audio"):
        for i, item in enumerate(getattr(media, _LIST[kind])):
            out.digests[(kind, i)] = hashlib.sha256(item.encode()).digest()
    return out


def render(tokenizer, parts, spec: chat.PromptSpec, decoded: Decoded, defaults: dict):
    """The prompt text with every item placed (thread); fills decoded.order."""
    counts = {k: len(getattr(decoded, _LIST[k])) for k in _LIST}
    taken = {k: 0 for k in _LIST}

    def take(kind: str | None):
        kinds = [kind] if kind else ["image", "video", "audio"]
        for k in kinds:
            if taken[k] < counts[k]:
                taken[k] += 1
                return k, taken[k] - 1
        return None

    if spec.prompt or not (spec.use_template and spec.messages):
        text, order = _place_in_text(spec.prompt, parts.placeholders, take)
        leftovers = _leftovers(counts, taken)
        head = "".join(parts.placeholders[k] for k, _ in leftovers)
        decoded.order, decoded.raw = leftovers + order, True
        return chat.render(tokenizer, replace(spec, prompt=head + text))
    content, order = {}, []
    last_user = max(
        (i for i, m in enumerate(spec.messages) if m.role.strip().lower() == "user"), default=-1
    )
    if last_user < 0:
        raise InvalidInput("media need a user message to go with")
    placed = {}
    for i, message in enumerate(spec.messages):
        if _MARKERS.search(message.content or ""):
            placed[i] = _split_parts(message.content, take)
    leftovers = _leftovers(counts, taken)
    if leftovers:
        rest = placed.get(last_user) or _text_parts(spec.messages[last_user].content)
        placed[last_user] = [({"type": k}, (k, n)) for k, n in leftovers] + rest
    for i in sorted(placed):
        content[i] = [p for p, _ in placed[i]]
        order.extend(ref for _, ref in placed[i] if ref is not None)
    decoded.order = order
    return chat.render(tokenizer, spec, defaults, content)


def _leftovers(counts: dict, taken: dict) -> list:
    return [(k, n) for k in ("video", "image", "audio") for n in range(taken[k], counts[k])]


def _text_parts(text: str) -> list:
    return [({"type": "text", "text": text}, None)] if text else []


def _split_parts(text: str, take) -> list:
    """A message's text split at its markers into HF content parts, (part, (kind, n)) pairs."""
    out, pos = [], 0
    for m in _MARKERS.finditer(text):
        out.extend(_text_parts(text[pos : m.start()]))
        ref = take(_KIND.get(m.group(1)) if m.group(1) else None)
        if ref is not None:
            out.append(({"type": ref[0]}, ref))
        pos = m.end()
    out.extend(_text_parts(text[pos:]))
    return out


def _place_in_text(text: str, placeholders: dict, take) -> tuple:
    order = []

    def sub(m):
        ref = take(_KIND.get(m.group(1)) if m.group(1) else None)
        if ref is None:
            return ""
        order.append(ref)
        return placeholders[ref[0]]

    return _MARKERS.sub(sub, text), order


def _with_bos(tokenizer, text: str) -> str:
    """A raw prompt tokenized without special tokens: write the BOS the tokenizer would add."""
    bos = getattr(tokenizer, "bos_token", None)
    if bos and not text.startswith(bos):
        ids = tokenizer.encode("a")
        if ids and ids[0] == tokenizer.bos_token_id:
            return bos + text
    return text


def expand(parts, prompt: chat.Prompt, decoded: Decoded) -> chat.Prompt:
    """Run the processor (worker thread): placeholders → media tokens, pixels → arrays."""
    from mlx_vlm.utils import prepare_inputs, should_add_special_tokens

    processor, config = parts.processor, parts.vlm.config
    add_special = should_add_special_tokens(config.model_type, processor)
    text = prompt.text + prompt.assistant_prefix
    if decoded.raw and not add_special:
        text = _with_bos(processor.tokenizer, text)
    images = [decoded.images[n] for k, n in decoded.order if k == "image"]
    videos = [decoded.videos[n] for k, n in decoded.order if k == "video"]
    audios = [decoded.audios[n] for k, n in decoded.order if k == "audio"]
    kwargs = {}
    if videos:
        kwargs["video_metadata"] = [
            {"total_num_frames": v.total_frames, "fps": v.fps, "frames_indices": v.indices}
            for v in videos
        ]
    try:
        inputs = prepare_inputs(
            processor,
            images=images or None,
            videos=[v.frames.transpose(0, 3, 1, 2) for v in videos] or None,
            audio=audios or None,
            prompts=text,
            image_token_index=getattr(config, "image_token_index", None),
            add_special_tokens=add_special,
            **kwargs,
        )
    except (ValueError, TypeError, IndexError) as exc:
        raise InvalidInput(f"the model's processor refused these media: {exc}") from None
    tokens = inputs.pop("input_ids")[0].tolist()
    key, end = _key_tokens(tokens, parts.token_ids, decoded)
    if end == len(tokens):
        raise InvalidInput("the prompt ends with a media item: add text after it")
    media = MediaInputs(inputs, key, end, len(decoded.order))
    return replace(prompt, tokens=tokens, media=media)


def _key_tokens(tokens: list, ids: dict, decoded: Decoded) -> tuple:
    """(cache key, index after the last media token). Each run of media tokens gets ids derived
    from the items up to it (one run per item), or from all items when runs and items differ
    (processors that split an image into tiles)."""
    media_ids = set(ids.values())
    runs, start = [], None
    for i, t in enumerate(tokens + [None]):
        if t in media_ids and start is None:
            start = i
        elif t not in media_ids and start is not None:
            runs.append((start, i))
            start = None
    digests = [decoded.digests[ref] for ref in decoded.order]
    key = list(tokens)
    chain = hashlib.sha256()
    for r, (a, b) in enumerate(runs):
        if len(runs) == len(digests):
            chain.update(digests[r])
        elif r == 0:
            for d in digests:
                chain.update(d)
        pseudo = -1 - int.from_bytes(chain.digest()[:4], "little") % (2**31 - 1)
        for i in range(a, b):
            key[i] = pseudo
    return key, (runs[-1][1] if runs else 0)
