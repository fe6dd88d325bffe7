"""Per-token logprobs in OpenAI's `choices[].logprobs` JSON shape."""


class TokenText:
    """Token id → (text, raw bytes), cached per tokenizer."""

    def __init__(self, tokenizer):
        from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer, _byte_decoder

        self.tokenizer = tokenizer
        self.byte_level = isinstance(tokenizer.detokenizer, BPEStreamingDetokenizer)
        self.byte_decoder = _byte_decoder() if self.byte_level else None
        self.cache = {}

    def __call__(self, token: int):
        if token not in self.cache:
            if self.byte_level:
                piece = self.tokenizer.convert_ids_to_tokens(token) or ""
                raw = b"".join(
                    bytes([self.byte_decoder[c]]) if c in self.byte_decoder else c.encode()
                    for c in piece
                )
            else:
                raw = self.tokenizer.decode([token]).encode()
            self.cache[token] = (raw.decode("utf-8", "replace"), list(raw))
        return self.cache[token]


def entry(token_text: TokenText, token: int, logprobs, top_n: int) -> dict:
    """One OpenAI logprobs entry for a generated token; logprobs is the normalised row."""
    import mlx.core as mx

    text, raw = token_text(token)
    item = {"id": token, "token": text, "bytes": raw, "logprob": logprobs[token].item()}
    alts = []
    if top_n > 0:
        top_n = min(top_n, logprobs.shape[-1])
        idx = mx.argpartition(-logprobs, kth=top_n - 1)[:top_n]
        vals = logprobs[idx]
        for i, v in sorted(zip(idx.tolist(), vals.tolist(), strict=True), key=lambda x: -x[1]):
            t, b = token_text(i)
            alts.append({"id": i, "token": t, "bytes": b, "logprob": v})
    item["top_logprobs"] = alts
    return item
