# sidecar: slim Python, Debian's redis-server for `redis.url: embedded`, non-root user.
# The first stage compiles the request path to C (setup.py, sidecar/native.py) into a wheel, so
# the image itself carries no compiler.
FROM python:3.11-slim AS build
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py mypyc.ini README.md ./
COPY sidecar ./sidecar
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM python:3.11-slim

RUN apt-get update \
    && apt-get install -y --no-install-recommends redis-server \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels

COPY config.yaml ./config.yaml
COPY policies ./policies
RUN useradd --system --uid 10001 --home-dir /app sidecar \
    && mkdir -p /app/.sidecar && chown sidecar /app/.sidecar

USER sidecar
EXPOSE 8080 9901
# The admin listener stays on loopback inside the container; the probe runs inside it too.
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9901/healthz', timeout=2)"]
ENTRYPOINT ["sidecar"]
CMD ["run", "-c", "/app/config.yaml"]
