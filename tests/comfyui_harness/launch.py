"""Start the cached real ComfyUI (see install.sh) under the ComfyUI venv's Python.

Usage: launch.py COMFYUI_DIR [main.py args...]

PyPI's torchvision wheels are CUDA builds; beside the CPU torch, `import torchvision` fails with
"operator torchvision::nms does not exist". Declaring the two missing operator schemas before ComfyUI
imports torchvision lets it start (ComfyUI never calls them on our workflows).
"""

import os
import runpy
import sys

import torch

lib = torch.library.Library("torchvision", "DEF")
lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
lib.define("qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor")

comfy_dir = sys.argv[1]
os.chdir(comfy_dir)
sys.path.insert(0, comfy_dir)
sys.argv = [os.path.join(comfy_dir, "main.py"), *sys.argv[2:]]
runpy.run_path(sys.argv[0], run_name="__main__")
