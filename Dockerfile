# MiniVault API, Ollama-only image: the embedded engine's packages stay out to keep it small.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Dependencies first, in their own layer: editing the code does not reinstall them.
COPY requirements.txt ./
RUN pip install -r requirements.txt

RUN useradd --create-home --uid 10001 minivault \
    && mkdir -p /app/logs \
    && chown minivault:minivault /app/logs
COPY app ./app

USER minivault
ENV MINIVAULT_BACKEND=ollama \
    OLLAMA_BASE_URL=http://ollama:11434 \
    MINIVAULT_LOG_PATH=/app/logs/log.jsonl
VOLUME ["/app/logs"]
EXPOSE 8000

# Slim images have no curl; the standard library can probe /health.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4).status == 200 else 1)"]

# The guarded protocol bounds request heads, slow clients and open connections (app/web/connections.py).
# MiniVault's interaction log already records every exchange, so uvicorn's access log is off
# (it costs about a tenth of a request's CPU); token frames are too small to gain from deflate.
CMD ["uvicorn", "app.main:app", "--host", "0.0.0.0", "--port", "8000", "--http", "app.web.connections:GuardedProtocol", "--no-access-log", "--ws-per-message-deflate", "false"]
