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
