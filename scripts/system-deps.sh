#!/usr/bin/env bash
# Install what the farm needs from Debian's packages, only what is missing:
# ffmpeg (encode, stitch, probe) and docker-compose (the tests validate docker-compose.yml
# with `config`, which needs no Docker engine); chromium and chromium-driver (the web page's
# test drives headless Chromium through Selenium, issue #14).
set -euo pipefail
missing=()
command -v ffmpeg >/dev/null 2>&1 && command -v ffprobe >/dev/null 2>&1 || missing+=(ffmpeg)
docker compose version >/dev/null 2>&1 || command -v docker-compose >/dev/null 2>&1 \
  || missing+=(docker-compose)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v chromedriver >/dev/null 2>&1 || missing+=(chromium-driver)
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi
encoders=$(ffmpeg -hide_banner -encoders 2>/dev/null)
[[ "$encoders" == *libx264* ]] || { echo "ffmpeg lacks libx264" >&2; exit 1; }
