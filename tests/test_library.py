"""The shipped workflow library: schemas that match their graphs and a real ComfyUI, whole-graph patching
(including the pruned Qwen-Edit variants), preflight against a real server, and RGBA kept end to end."""

from __future__ import annotations

import copy
import io
import json
import zipfile

import pytest
from PIL import Image

from core import preflight, service, workflows
from core.errors import InputError
from tests.support import ROOT, submit_rows, worker_env
from tests.support import run_cli as run

WF = ROOT / "workflows"
SHIPPED = sorted(p.stem for p in WF.glob("*.json"))


def original(name):
    return json.loads((WF / f"{name}.json").read_text(encoding="utf-8"))


def test_every_template_loads_with_a_title_and_declared_parameters():
    found, problems = workflows.list_workflows(WF)
    assert problems == []
    assert [w.name for w in found] == SHIPPED
    assert set(SHIPPED) >= {"qwen_image_t2i", "qwen_image_t2i_8step_fp8", "qwen_edit_i2i", "character_matting_rgba",
                            "sd15_txt2img", "sd15_img2img", "sdxl_txt2img", "sdxl_img2img", "flux_txt2img"}
    for wf in found:
        assert wf.declared and wf.title and wf.description, wf.name
        for p in wf.params.values():
            assert p.input_name in wf.graph[p.node_id]["inputs"], (wf.name, p.name)


def test_declared_inputs_exist_in_a_real_comfyui(comfy):
    info = preflight.object_info(comfy.url, refresh=True)
    for wf in workflows.list_workflows(WF)[0]:
        for p in wf.params.values():
            class_type = wf.graph[p.node_id]["class_type"]
            if class_type in wf.custom_nodes:
                assert class_type not in info  # custom nodes are not part of core ComfyUI
                continue
            assert preflight.input_spec(info, class_type, p.input_name) is not None, (wf.name, p.name, class_type)


def test_qwen_t2i_full_parameter_set():
    wf = workflows.load_workflow(WF / "qwen_image_t2i.json")
    values = {"prompt": "一只小猪", "negative_prompt": "模糊", "seed": 7, "steps": 8, "cfg": 1.5, "width": 1664,
              "height": 928, "batch_size": 2, "sampler_name": "euler", "scheduler": "simple", "unet": "u.safetensors",
              "clip": "c.safetensors", "vae": "v.safetensors", "lora": "l.safetensors", "lora_strength": 0.8}
    expected = original("qwen_image_t2i")
    expected["6"]["inputs"]["text"], expected["7"]["inputs"]["text"] = "一只小猪", "模糊"
    expected["3"]["inputs"].update(seed=7, steps=8, cfg=1.5, sampler_name="euler", scheduler="simple")
    expected["58"]["inputs"].update(width=1664, height=928, batch_size=2)
    expected["37"]["inputs"]["unet_name"] = "u.safetensors"
    expected["38"]["inputs"]["clip_name"] = "c.safetensors"
    expected["39"]["inputs"]["vae_name"] = "v.safetensors"
    expected["73"]["inputs"].update(lora_name="l.safetensors", strength_model=0.8)
    assert workflows.build_graph(wf, values)[1] == expected
    assert wf.presets["size"]["16:9"] == [1664, 928]


@pytest.mark.parametrize("images", [1, 2, 3])
def test_qwen_edit_prunes_unused_image_branches(images):
    wf = workflows.load_workflow(WF / "qwen_edit_i2i.json")
    values = {"prompt": "把这张图变成水彩画", "seed": 1, "image": "a.png"}
    if images >= 2:
        values["image2"] = "b.png"
    if images >= 3:
        values["image3"] = "c.png"
    expected = original("qwen_edit_i2i")
    expected["111"]["inputs"]["prompt"] = "把这张图变成水彩画"
    expected["3"]["inputs"]["seed"] = 1
    expected["78"]["inputs"]["image"] = "a.png"
    if images >= 2:
        expected["106"]["inputs"]["image"] = "b.png"
    else:
        for node in ("106", "115"):
            del expected[node]
        for node in ("110", "111"):
            del expected[node]["inputs"]["image2"]
    if images >= 3:
        expected["108"]["inputs"]["image"] = "c.png"
    else:
        for node in ("108", "116"):
            del expected[node]
        for node in ("110", "111"):
            del expected[node]["inputs"]["image3"]
    assert workflows.build_graph(wf, values)[1] == expected


def test_qwen_edit_needs_its_first_image():
    wf = workflows.load_workflow(WF / "qwen_edit_i2i.json")
    with pytest.raises(InputError) as err:
        workflows.resolve_params(wf, {"prompt": "x"})
    assert [str(p) for p in err.value.problems] == ["parameter 'image': missing: this workflow requires it"]
    assert (err.value.problems[0].parameter, err.value.problems[0].code) == ("image", "required")


def test_matting_and_sd_and_flux_full_parameter_sets():
    cases = {
        "character_matting_rgba": ({"image": "girl.png", "model": "Portrait.safetensors"},
                                   {"28": {"image": "girl.png"}, "27": {"model": "Portrait.safetensors"}}),
        "sd15_img2img": ({"prompt": "p", "negative_prompt": "n", "seed": 3, "steps": 2, "cfg": 5.0, "denoise": 0.4,
                          "image": "in.png", "checkpoint": "m.safetensors", "sampler_name": "dpmpp_2m",
                          "scheduler": "karras"},
                         {"6": {"text": "p"}, "7": {"text": "n"}, "10": {"image": "in.png"},
                          "4": {"ckpt_name": "m.safetensors"},
                          "3": {"seed": 3, "steps": 2, "cfg": 5.0, "denoise": 0.4, "sampler_name": "dpmpp_2m",
                                "scheduler": "karras"}}),
        "sdxl_txt2img": ({"prompt": "p", "width": 1344, "height": 768, "batch_size": 2, "seed": 9},
                         {"6": {"text": "p"}, "5": {"width": 1344, "height": 768, "batch_size": 2}, "3": {"seed": 9}}),
        "flux_txt2img": ({"prompt": "p", "guidance": 2.5, "width": 768, "height": 1344, "seed": 5, "steps": 4},
                         {"6": {"text": "p"}, "26": {"guidance": 2.5}, "27": {"width": 768, "height": 1344},
                          "13": {"seed": 5, "steps": 4}}),
    }
    for name, (values, changes) in cases.items():
        wf = workflows.load_workflow(WF / f"{name}.json")
        expected = copy.deepcopy(original(name))
        for node_id, inputs in changes.items():
            expected[node_id]["inputs"].update(inputs)
        assert workflows.build_graph(wf, values)[1] == expected, name
    assert "35" not in original("character_matting_rgba")  # the seed's broken PreviewImage is dropped


def test_preflight_names_missing_models_and_custom_nodes(comfy):
    reports = {}
    for name in ("qwen_image_t2i", "character_matting_rgba", "flux_txt2img"):
        wf = workflows.load_workflow(WF / f"{name}.json")
        (reports[name],) = preflight.check_servers([comfy.url], wf, [wf.graph])
    assert reports["qwen_image_t2i"].problems == [
        "node 37 (UNETLoader) input 'unet_name': model file 'Qwen-Image_ComfyUI/qwen_image_bf16.safetensors' is "
        "missing on the server",
        "node 38 (CLIPLoader) input 'clip_name': model file 'qwen_2.5_vl_7b_fp8_scaled.safetensors' is missing on "
        "the server",
        "node 39 (VAELoader) input 'vae_name': model file 'qwen_image_vae.safetensors' is missing on the server",
        "node 73 (LoraLoaderModelOnly) input 'lora_name': model file "
        "'Qwen-Image-Lightning/Qwen-Image-Lightning-8steps-V1.0.safetensors' is missing on the server"]
    assert reports["character_matting_rgba"].problems == [
        "node 26 (RembgByBiRefNet): node type RembgByBiRefNet is not installed (custom node pack "
        "lldacing/ComfyUI_BiRefNet_ll)",
        "node 27 (LoadRembgByBiRefNetModel): node type LoadRembgByBiRefNetModel is not installed (custom node pack "
        "lldacing/ComfyUI_BiRefNet_ll)"]
    assert any("flux1-dev.safetensors" in p for p in reports["flux_txt2img"].problems)


def test_sd15_passes_preflight_and_server_choices_fill_the_form(settings, store):
    wf, urls = service.workflow_for_servers(settings, store, "sd15_txt2img")
    assert wf.params["checkpoint"].choices == ("random_sd15.safetensors",)
    assert "euler" in wf.params["sampler_name"].choices and "karras" in wf.params["scheduler"].choices
    (report,) = preflight.check_servers(urls, wf, [wf.graph])
    assert (report.reachable, report.problems) == (True, [])


def test_a_batch_no_server_can_run_is_refused_before_anything_is_enqueued(settings, store):
    with pytest.raises(InputError) as err:
        submit_rows(settings, store, "qwen_image_t2i", [{"prompt": "一只小猪"}] * 3)
    assert str(err.value).startswith("no ComfyUI server can run workflow 'qwen_image_t2i'; nothing was enqueued")
    assert str(err.value.problems[0]).startswith(f"{settings.comfyui_urls[0]}: node 37 (UNETLoader)")
    assert err.value.problems[0].server == settings.comfyui_urls[0]
    assert store.counts() == {}


def test_batch_is_routed_only_to_servers_that_can_run_it(settings, store):
    down = "http://127.0.0.1:9"
    two = settings.with_overrides(comfyui_urls=(*settings.comfyui_urls, down))
    result = submit_rows(two, store, "empty_image", [{"color": 1}])
    assert result.servers is None  # every answering server can: no restriction
    assert [(r.url, r.reachable) for r in result.reports] == [(settings.comfyui_urls[0], True), (down, False)]


def test_sd15_text_and_image_to_image_from_the_cli(settings, store, tmp_path):
    Image.new("RGB", (64, 48), (200, 30, 30)).save(tmp_path / "photo.png")
    (tmp_path / "i2i.csv").write_text("image,prompt,steps,denoise,seed\nphoto.png,watercolour,2,0.5,11\n")
    env = {**worker_env(settings), "WORK": str(tmp_path)}
    t2i = run(env, "submit", "--workflow", "sd15_txt2img", "--prompt", "一只小猪", "--param", "steps=2",
              "--param", "width=64", "--param", "height=96", "--param", "seed=5")
    i2i = run(env, "submit", "i2i.csv", "--workflow", "sd15_img2img")
    assert (t2i.returncode, t2i.stdout, i2i.returncode, i2i.stdout) == (0, "1\n", 0, "2\n"), t2i.stderr + i2i.stderr
    worker = run(env, "worker", "--until-idle", "--quiet", timeout=300)
    assert worker.returncode == 0, worker.stderr
    assert store.counts() == {"succeeded": 2}
    (made,) = store.images_for_batch(1)
    (redrawn,) = store.images_for_batch(2)
    assert (made["width"], made["height"], redrawn["width"], redrawn["height"]) == (64, 96, 64, 48)
    assert store.get_task(2)["graph"]["10"]["inputs"]["image"] == "photo.png"
    assert store.get_task(1)["seed"] == 5


def test_rgba_output_stays_rgba_on_disk_and_in_the_zip(settings, store, scheduler, tmp_path):
    rgba = Image.new("RGBA", (40, 30), (0, 128, 255, 255))
    for x in range(20):
        for y in range(30):
            rgba.putpixel((x, y), (0, 128, 255, 0))  # left half transparent
    buf = io.BytesIO()
    rgba.save(buf, "PNG")
    result = submit_rows(settings, store, "rgba_cutout", [{"1.image": "cut.png"}],
                                 images={"cut.png": buf.getvalue()})
    assert service.wait_for_tasks(store, result.task_ids, timeout=60) == {"succeeded": 1}
    (image,) = store.images_for_task(result.task_ids[0])
    on_disk = (settings.output_dir / image["path"]).read_bytes()
    with Image.open(io.BytesIO(on_disk)) as im:
        assert im.mode == "RGBA" and image["mode"] == "RGBA"
        assert im.getpixel((5, 5))[3] != im.getpixel((35, 5))[3]  # transparency survived
    with zipfile.ZipFile(io.BytesIO(service.zip_bytes(settings, [image]))) as zf:
        assert zf.read(image["path"]) == on_disk
