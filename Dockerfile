# syntax=docker/dockerfile:1
# One image for the gateway and the simulated engines:
#   docker run -p 8000:8000 sbs-gateway                                   (gateway, embedded simulated engines)
#   docker run sbs-gateway serve --config /etc/gateway/gateway.yaml --host 0.0.0.0
#   docker run sbs-gateway mock-engine --flavor sglang --dp-size 8 --host 0.0.0.0 --port 30000
# The HEALTHCHECK probes GET /health on HEALTHCHECK_PORT (default 8000); set it to an engine's port there.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN python -m venv /opt/venv
WORKDIR /src
# Dependencies first, so that a code change does not reinstall them.
COPY pyproject.toml README.md LICENSE ./
RUN mkdir gateway && touch gateway/__init__.py \
    && /opt/venv/bin/pip install . \
    && /opt/venv/bin/pip uninstall -y sbs-gateway
COPY gateway ./gateway
RUN /opt/venv/bin/pip install --no-deps . && /opt/venv/bin/gateway --version
# The window allocators' numba kernels, compiled once here (about 9 s of CPU) rather than at every container start;
# a machine whose CPU differs compiles them again at its first start and keeps them in the same directory.
RUN NUMBA_CACHE_DIR=/opt/numba-cache /opt/venv/bin/python -c \
    "from gateway.scheduling import kernel; assert kernel.load() is not None, 'numba kernels did not compile'"

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="sbs-gateway" \
      org.opencontainers.image.description="OpenAI-compatible routing gateway with staggered batch scheduling over SGLang/vLLM DP ranks" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN useradd --system --uid 10001 --user-group --create-home --shell /usr/sbin/nologin gateway \
    && install -d -o 10001 -g 10001 /results
# /results: where `bench --output` and `simulate --output/--plot` write in docker-compose.yml (a named volume
# mounted there takes this ownership, so the non-root user can write to it).
COPY --from=build /opt/venv /opt/venv
COPY --from=build --chown=10001:10001 /opt/numba-cache /opt/numba-cache
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 HEALTHCHECK_PORT=8000 \
    NUMBA_CACHE_DIR=/opt/numba-cache
USER 10001:10001
WORKDIR /home/gateway
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ['HEALTHCHECK_PORT'] + '/health', timeout=2)"]
ENTRYPOINT ["gateway"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
