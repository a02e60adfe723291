# mlx-loom on MLX's Linux CPU backend (mlx[cpu] + Debian OpenBLAS), for linux/amd64 and linux/arm64.
#   docker build -t mlx-loom .
#   docker buildx build --platform linux/arm64,linux/amd64 -t mlx-loom .
#   docker run -p 8000:8000 mlx-loom                      # options: MLX_LOOM_* env or appended flags
# Containers get no Metal, even on a Mac: for Metal speed run natively (`make serve` on macOS).
# The install steps are scripts/docker_install.sh; CI runs that same script into a fresh venv and
# serves a request from it (scripts/check_docker_install.sh), then builds this image and runs it as
# shipped until Docker's health status is healthy (scripts/check_docker_image.sh).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
FROM ${PYTHON_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/mlx-loom/bin:$PATH

COPY . /tmp/mlx-loom-src
RUN PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
        bash /tmp/mlx-loom-src/scripts/docker_install.sh /opt/mlx-loom \
    && rm -rf /tmp/mlx-loom-src /var/lib/apt/lists/* \
    && useradd --system --create-home --uid 10001 --user-group mlxloom

# Numeric, so orchestrators can verify runAsNonRoot (the user is mlxloom).
USER 10001:10001
WORKDIR /home/mlxloom

# Settings come from MLX_LOOM_<OPTION> variables (`docker run mlx-loom --help` lists them) or from
# flags appended to `docker run mlx-loom ...`. Change the port with MLX_LOOM_PORT so the health
# check follows it.
ENV MLX_LOOM_HOST=0.0.0.0 \
    MLX_LOOM_PORT=8000
EXPOSE 8000

# /health answers 503 while the model loads and 200 once it serves (slim images have no curl).
HEALTHCHECK --interval=30s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('MLX_LOOM_PORT', '8000'), timeout=4)"]

ENTRYPOINT ["mlx-loom", "serve"]
CMD []
