"""The engine end to end against a real ComfyUI on loopback (model-free workflows and a random-weight SD1.5)."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image

from core import service
from core.errors import InputError
from core.models import TaskStatus
from tests.support import submit_csv, submit_rows, wait_until


def pixels_of(path):
    with Image.open(path) as im:
        return im.size, im.mode, im.getpixel((0, 0)), dict(im.text)


def test_fifty_row_csv_with_count_two_gives_a_hundred_pngs(settings, store, scheduler):
    lines = ["1.color,1.width,1.height,count"]
    rows = []
    for i in range(50):
        color, width, height = (i * 5 << 16) | (255 - i) << 8 | (i * 3), 16 + i, 24 + (i % 7)
        lines.append(f"{color},{width},{height},2")
        rows.append((color, width, height))
    result = submit_csv(settings, store, "\n".join(lines).encode(), "jobs.csv", "empty_image")
    assert len(result.task_ids) == 100
    assert service.wait_for_tasks(store, result.task_ids, timeout=120) == {"succeeded": 100}

    pngs = sorted((settings.output_dir / f"batch-{result.batch_ids[0]:05d}").glob("*.png"))
    assert len(pngs) == 100
    for task_id in result.task_ids:
        task = store.get_task(task_id)
        color, width, height = rows[task["row_number"] - 2]
        (image,) = store.images_for_task(task_id)
        size, mode, pixel, text = pixels_of(settings.output_dir / image["path"])
        assert (size, mode, pixel) == ((width, height), "RGB", ((color >> 16) & 255, (color >> 8) & 255, color & 255))
        assert json.loads(text["prompt"])["1"]["inputs"]["color"] == color  # ComfyUI's metadata chunk kept
        assert (image["width"], image["height"]) == (width, height)
        assert task["attempts"] == 1 and task["server"] == settings.comfyui_urls[0]


def test_sd15_through_discovery_and_same_seed_same_pixels(settings, store, scheduler):
    csv = ("prompt,seed,steps,width,height\n"
           "a red fox in the snow,1234,2,64,64\n"
           "一只小猪在花园里,99,2,64,96\n"
           "a red fox in the snow,1234,2,64,64\n").encode()
    result = submit_csv(settings, store, csv, "sd.csv", "sd15_txt2img")
    assert service.wait_for_tasks(store, result.task_ids, timeout=300) == {"succeeded": 3}
    decoded, comfy_names = [], []
    for task_id in result.task_ids:
        (image,) = store.images_for_task(task_id)
        comfy_names.append(image["filename"])
        with Image.open(settings.output_dir / image["path"]) as im:
            decoded.append((im.size, im.tobytes()))
    assert [size for size, _ in decoded] == [(64, 64), (64, 96), (64, 64)]
    # The pig prompt in between evicts ComfyUI's cache, so the third job really ran again (a new file) ...
    assert len(set(comfy_names)) == 3
    assert decoded[0][1] == decoded[2][1]  # ... and the same seed gave the same pixels
    assert len(set(decoded[0][1])) > 50  # real (noisy) output, not a blank image
    task = store.get_task(result.task_ids[1])
    assert task["seed"] == 99 and task["prompt"] == "一只小猪在花园里"
    assert task["graph"]["6"]["inputs"]["text"] == "一只小猪在花园里"
    assert (task["graph"]["3"]["inputs"]["seed"], task["graph"]["3"]["inputs"]["steps"]) == (99, 2)
    assert (task["progress_value"], task["progress_max"]) == (2, 2)  # real per-step progress from the sampler


def test_random_seed_is_resolved_and_stored(settings, store):
    result = submit_rows(settings, store, "sd15_txt2img", [{"prompt": "x", "steps": "2"}], count=3)
    seeds = [store.get_task(t)["seed"] for t in result.task_ids]
    assert all(isinstance(s, int) for s in seeds) and len(set(seeds)) == 3
    assert [store.get_task(t)["graph"]["3"]["inputs"]["seed"] for t in result.task_ids] == seeds


def test_http_400_fails_at_once_with_node_and_input_named(settings, store, scheduler):
    # Preflight catches missing models and bad values; a link between wrong types only ComfyUI sees.
    result = submit_rows(settings, store, "mismatched_link", [{"2.filename_prefix": "x"}])
    assert service.wait_for_tasks(store, result.task_ids, timeout=60) == {"failed": 1}
    task = store.get_task(result.task_ids[0])
    assert task["attempts"] == 1
    assert task["error"] == ("ComfyUI rejected the prompt: node 2 (SaveImage) input 'images': Return type mismatch "
                             "between linked nodes: images, received_type(LATENT) mismatch input_type(IMAGE)")
    assert [e["status"] for e in store.events(task_id=task["id"])] == ["queued", "submitted", "failed"]


def test_missing_checkpoint_is_refused_before_enqueue(settings, store):
    with pytest.raises(InputError) as err:
        submit_rows(settings, store, "sd15_txt2img", [{"prompt": "x", "checkpoint": "missing.ckpt"}])
    assert [str(p) for p in err.value.problems] == ["parameter 'checkpoint' (4.ckpt_name): 'missing.ckpt' is not "
                                                    "one of random_sd15.safetensors"]
    assert store.counts() == {}


def test_execution_error_is_retried_then_fails_with_comfyui_message(settings, store, scheduler):
    result = submit_rows(settings, store, "empty_image", [{"2.filename_prefix": "../escape"}])
    assert service.wait_for_tasks(store, result.task_ids, timeout=60) == {"failed": 1}
    task = store.get_task(result.task_ids[0])
    assert task["attempts"] == settings.max_attempts == 3
    assert task["error"].startswith("ComfyUI failed while running node 2 (SaveImage): Exception: **** ERROR: "
                                    "Saving image outside the output folder is not allowed.")
    statuses = [e["status"] for e in store.events(task_id=task["id"])]
    assert statuses == ["queued", "submitted", "running", "queued", "submitted", "running", "queued", "submitted",
                        "running", "failed"]


def test_cancel_in_our_queue_pending_on_comfyui_and_running(settings, store, scheduler_factory):
    settings = settings.with_overrides(in_flight=2)
    slow = {"1.width": "1536", "1.height": "1536"}
    result = submit_rows(settings, store, "slow_blur",
                                 [{**slow, "1.color": str(c)} for c in range(4)])
    running, pending, queued, last = result.task_ids
    scheduler_factory(settings)
    wait_until(lambda: store.get_task(running)["status"] == "running", 60, message="first task running")
    wait_until(lambda: store.get_task(pending)["status"] == "submitted", 10, message="second task on ComfyUI")
    assert store.get_task(queued)["status"] == "queued"
    assert service.cancel(store, [queued]) == {"cancelled": [queued], "cancelling": []}
    assert service.cancel(store, [pending, running]) == {"cancelled": [], "cancelling": [pending, running]}
    service.wait_for_tasks(store, [running, pending, queued], timeout=60)
    assert [store.get_task(t)["status"] for t in (running, pending, queued)] == ["cancelled"] * 3
    assert store.images_for_task(running) == [] and store.images_for_task(pending) == []
    assert service.wait_for_tasks(store, [last], timeout=60) == {"succeeded": 1}


def test_input_image_is_uploaded_once_and_inverted(settings, store, scheduler, tmp_path):
    img = Image.new("RGB", (32, 16), (255, 0, 0))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    (tmp_path / "red square.png").write_bytes(buf.getvalue())
    # Five rows, more than the in-flight window: the later ones are claimed on the event thread as earlier ones
    # finish and handed to the dispatch thread, which uploads (once) before it posts.
    csv = b"image,3.filename_prefix\n" + "".join(f"red square.png,{c}\n" for c in "abcde").encode()
    result = submit_csv(settings, store, csv, "in.csv", "invert", image_dir=tmp_path)
    assert service.wait_for_tasks(store, result.task_ids, timeout=60) == {"succeeded": 5}
    for task_id in result.task_ids:
        (image,) = store.images_for_task(task_id)
        with Image.open(settings.output_dir / image["path"]) as out:
            assert out.size == (32, 16) and out.getpixel((0, 0)) == (0, 255, 255)
    assert store.db.execute("SELECT COUNT(*) FROM uploads").fetchone()[0] == 1
    assert store.get_task(result.task_ids[0])["graph"]["1"]["inputs"]["image"] == "red square.png"


def test_status_events_are_timestamped_in_order(settings, store, scheduler):
    result = submit_rows(settings, store, "empty_image", [{"1.color": "1"}])
    service.wait_for_tasks(store, result.task_ids, timeout=30)
    events = store.events(task_id=result.task_ids[0])
    assert [e["status"] for e in events] == ["queued", "submitted", "running", "succeeded"]
    assert all(a["at"] <= b["at"] for a, b in zip(events, events[1:], strict=False))
    task = store.get_task(result.task_ids[0])
    assert task["created_at"] <= task["submitted_at"] <= task["started_at"] <= task["finished_at"]
    assert TaskStatus(task["status"]).is_final


def test_the_scheduler_publishes_server_health_for_the_pages(settings, store, scheduler_factory):
    down = "http://127.0.0.1:9"
    settings = settings.with_overrides(comfyui_urls=(*settings.comfyui_urls, down))
    scheduler_factory(settings)
    wait_until(lambda: all(s["health"] for s in store.servers()), 20, message="health published")
    up, gone = service.server_health(settings, store, timeout=0.001)  # fresh snapshots: no probing
    assert (up["url"], up["up"], up["version"], up["device"]) == (settings.comfyui_urls[0], True, "0.3.75", "cpu")
    assert (gone["url"], gone["up"]) == (down, False)
    assert gone["error"].startswith("ComfyUI at http://127.0.0.1:9 is unreachable")
