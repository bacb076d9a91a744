# sidecar: slim Python, Debian's redis-server for `redis.url: embedded`, non-root user.
FROM python:3.11-slim

RUN apt-get update \
    && apt-get install -y --no-install-recommends redis-server \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY pyproject.toml README.md ./
COPY sidecar ./sidecar
RUN pip install --no-cache-dir .

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
