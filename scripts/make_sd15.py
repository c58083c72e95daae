"""Write a small random-weight checkpoint that a real ComfyUI loads and runs as Stable Diffusion 1.5.

Usage (under the ComfyUI venv's Python):
    make_sd15.py COMFYUI_DIR OUTPUT_PATH.safetensors

The keys and shapes come from ComfyUI's own model classes, built on the `meta` device (no memory, no
init), so the file always matches what the installed ComfyUI expects; nothing from ComfyUI is copied
here. Every tensor is then filled from one seeded generator and stored as float16, so the file is
byte-for-byte deterministic. ComfyUI never initialises weights itself, so no key may be left out.

- UNet: one level (channel_mult [1], one res block, transformer depth 1), model_channels 320,
  context_dim 768, non-linear proj_in: ComfyUI's detection still matches it to SD15.
- Text encoder: full CLIP-L (ComfyUI's sd1_clip_config.json), `text_model.*` keys as in real SD1.5 files.
- VAE: the standard SD AutoencoderKL (ComfyUI fixes its width, and the 8x downscale needs 4 levels).

The images it makes are coloured noise, which is all the tests need. Takes 7-18 s (CPU), writes ~444 MiB.
"""

import json
import os
import sys

import torch

# PyPI's torchvision is a CUDA build: declare its two missing op schemas before ComfyUI imports it.
_tv = torch.library.Library("torchvision", "DEF")
_tv.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
_tv.define("qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor")

SEED = 1234
UNET = {
    "image_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 320,
    "num_res_blocks": [1],
    "channel_mult": [1],
    "transformer_depth": [1],
    "transformer_depth_output": [1, 1],
    "transformer_depth_middle": 1,
    "context_dim": 768,
    "num_heads": 8,
    "num_head_channels": -1,
    "use_spatial_transformer": True,
    "use_linear_in_transformer": False,
    "legacy": False,
    "use_checkpoint": False,
}
VAE = {
    "double_z": True,
    "z_channels": 4,
    "resolution": 256,
    "in_channels": 3,
    "out_ch": 3,
    "ch": 128,
    "ch_mult": [1, 2, 4, 4],
    "num_res_blocks": 2,
    "attn_resolutions": [],
    "dropout": 0.0,
}


def meta_state_dict(comfy_dir):
    """Return {key: meta tensor} for the whole checkpoint, in the SD1.5 layout."""
    sys.path.insert(0, comfy_dir)
    from comfy.cli_args import args

    args.cpu = True  # before comfy.model_management is imported: this torch has no CUDA
    import comfy.clip_model
    import comfy.ops
    from comfy.ldm.models.autoencoder import AutoencoderKL
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    ops = comfy.ops.disable_weight_init
    parts = {}
    with torch.device("meta"):
        parts["model.diffusion_model."] = UNetModel(**UNET, operations=ops)
        with open(os.path.join(comfy_dir, "comfy", "sd1_clip_config.json")) as f:
            clip = comfy.clip_model.CLIPTextModel(json.load(f), torch.float32, "meta", ops)
        parts["cond_stage_model.transformer.text_model."] = clip.text_model
        parts["first_stage_model."] = AutoencoderKL(ddconfig=VAE, embed_dim=4)
    return {p + k: v for p, m in parts.items() for k, v in m.state_dict().items()}


def check_detected_as_sd15(sd):
    """Fail early if ComfyUI's own detection would not call this SD15."""
    import comfy.model_detection
    import comfy.supported_models

    config = comfy.model_detection.model_config_from_unet(sd, "model.diffusion_model.")
    if type(config) is not comfy.supported_models.SD15:
        sys.exit(f"ComfyUI detects {type(config).__name__}, not SD15")


def fill(sd):
    """Seeded random values: 1-D weights (norms) are 1, other weights N(0, 1/fan_in), biases N(0, 0.02)."""
    gen = torch.Generator().manual_seed(SEED)
    out = {}
    for key in sorted(sd):
        shape = sd[key].shape
        if key.endswith(".weight") and len(shape) == 1:
            t = torch.ones(shape)
        else:
            std = (shape[1:].numel() ** -0.5) if len(shape) > 1 else 0.02
            t = torch.randn(shape, generator=gen) * std
        out[key] = t.to(torch.float16).contiguous()
    return out


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    comfy_dir, out_path = os.path.abspath(sys.argv[1]), sys.argv[2]
    from safetensors.torch import save_file

    sd = meta_state_dict(comfy_dir)
    check_detected_as_sd15(sd)
    tmp = f"{out_path}.tmp{os.getpid()}"
    try:
        save_file(fill(sd), tmp)
        os.chmod(tmp, 0o644)  # safetensors creates it owner-only
        os.replace(tmp, out_path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


if __name__ == "__main__":
    main()
