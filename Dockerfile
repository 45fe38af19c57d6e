# One image for every farm service; docker-compose.yml picks the command.
FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends ffmpeg \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml README.md ./
COPY farm farm
COPY scheduler scheduler
COPY workers workers
COPY migrations migrations
# The CUDA build of torch 2.13 for GPU nodes comes from the image's pip index settings.
RUN pip install --no-cache-dir torch==2.13.0 && pip install --no-cache-dir .
ENV FARM_HOME=/data
# Ray kept quiet wherever it starts, also where KubeRay runs `ray start` itself (deploy/k8s):
# no usage stats, and the bootstrap file whose absence makes Ray probe a cloud metadata address.
ENV RAY_USAGE_STATS_ENABLED=0 RAY_USAGE_STATS_REPORT_URL=http://127.0.0.1:9/ RAY_AUTH_MODE=token
RUN printf 'provider: {type: local}\n' > /root/ray_bootstrap_config.yaml
