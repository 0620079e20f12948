# ls-clickseg backend image. CPU by default; for CUDA:
#   docker build --build-arg TORCH_VARIANT=cu124 -t ls-clickseg:cuda .   (run with --gpus all -e DEVICE=cuda)
FROM python:3.11-slim

# PyTorch wheel index: "cpu", or a CUDA variant such as "cu124" / "cu126".
ARG TORCH_VARIANT=cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOST=0.0.0.0 \
    PORT=9090 \
    MODEL_DIR=/models

WORKDIR /app

# PyTorch first (the big, rarely changing layer), from the index of the chosen variant.
RUN pip install --index-url "https://download.pytorch.org/whl/${TORCH_VARIANT}" torch torchvision

COPY pyproject.toml README.md ./
COPY model ./model
COPY backend ./backend
RUN pip install . \
    && useradd --create-home --uid 1000 clickseg \
    && mkdir -p /models \
    && chown clickseg /models

USER clickseg
EXPOSE 9090
VOLUME ["/models"]

# Healthy = the app answers GET /health (200, or 401 with basic auth on), not just a TCP accept.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 CMD ["python", "-m", "backend.healthcheck"]

CMD ["gunicorn", "-c", "backend/gunicorn.conf.py", "backend.wsgi:app"]
