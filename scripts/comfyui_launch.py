"""Start a ComfyUI folder's main.py under the Python running this file (its own venv's Python).

Usage: comfyui_launch.py COMFYUI_DIR [main.py args...]

Used by ComfyBatch's local backends (core/backends.py) and by the test harness. Exactly one repair, and only
when it is needed: PyPI's torchvision wheels are CUDA builds, and beside a CPU torch `import torchvision`
fails with "operator torchvision::nms does not exist" (ComfyUI needs torchvision to import). Then the two
missing operator schemas are declared and torchvision imported again (ComfyUI never calls them on our
workflows). A healthy torchvision is left alone.
"""

import os
import runpy
import sys


def repair_torchvision():
    try:
        import torchvision  # noqa: F401
        return None
    except ModuleNotFoundError:
        return None  # ComfyUI itself will say what is missing
    except RuntimeError as exc:
        if "torchvision::nms" not in str(exc):
            raise
    import torch

    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor")
    import torchvision  # noqa: F401,F811

    return lib  # keep the library object alive: dropping it unregisters the schemas


_LIB = repair_torchvision()
comfy_dir = os.path.abspath(sys.argv[1])
os.chdir(comfy_dir)
sys.path.insert(0, comfy_dir)
sys.argv = [os.path.join(comfy_dir, "main.py"), *sys.argv[2:]]
runpy.run_path(sys.argv[0], run_name="__main__")
