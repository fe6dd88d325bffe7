"""Run llama.cpp's convert_hf_to_gguf.py unchanged, with one optional fallback.

Usage: ``python _hf_to_gguf_runner.py TOOLS_DIR [converter args…]`` (run as a script, not
imported; see ``converters.mlx_to_gguf``). The converter's own ``gguf-py`` (same llama.cpp
revision) is put first on ``sys.path`` exactly as the script itself does.

``MLXB_GGUF_PRE_TOKENIZER=<name>``: when the converter does not recognise a BPE tokenizer's
pre-tokenizer (it identifies them by hashing a test string, so any custom-trained vocabulary
fails), label it ``<name>`` (a llama.cpp pre-tokenizer name such as ``gpt-2``) instead of
failing. Recognised tokenizers are never changed.
"""

import os
import runpy
import sys


def main() -> None:
    tools = os.path.abspath(sys.argv[1])
    sys.path[0] = tools  # instead of this script's folder
    if "NO_LOCAL_GGUF" not in os.environ:
        sys.path.insert(1, os.path.join(tools, "gguf-py"))
    fallback = os.environ.get("MLXB_GGUF_PRE_TOKENIZER")
    if fallback:
        import conversion.base as base

        original = base.TextModel.get_vocab_base_pre

        def get_vocab_base_pre(self, tokenizer):
            try:
                return original(self, tokenizer)
            except NotImplementedError:
                base.logger.warning(f"using pre-tokenizer {fallback!r} (MLXB_GGUF_PRE_TOKENIZER)")
                return fallback

        base.TextModel.get_vocab_base_pre = get_vocab_base_pre
    script = os.path.join(tools, "convert_hf_to_gguf.py")
    sys.argv = [script, *sys.argv[2:]]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
