#!/usr/bin/env bash
# The test suite's ComfyUI is the one scripts/setup.sh installs for the first run: one install script.
exec bash "$(cd "$(dirname "$0")/../.." && pwd)/scripts/install_comfyui.sh" "$@"
