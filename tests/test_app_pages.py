"""Every page through Streamlit's AppTest: inputs, validation messages and submit paths.

The seam: pages read their settings from the environment (a fresh database and folders under tmp_path) and never
start a scheduler (only app.py's lifespan does, and AppTest does not run it), so work stays queued unless a test
starts a scheduler itself.
"""

from __future__ import annotations

import io
import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import streamlit as st
from PIL import Image
from streamlit.testing.v1 import AppTest

import ui
from core import service
from core.config import Settings
from core.scheduler import Scheduler
from core.store import Store
from tests.comfyui_harness.server import free_port
from tests.support import finish_next_task, make_settings, submit_rows

MAIN = "../ui_main.py"  # relative to this file, as AppTest wants
ENV = {"comfyui_urls": "COMFYUI_URL", "db_path": "COMFYBATCH_DB", "output_dir": "COMFYBATCH_OUTPUT_DIR",
       "workflows_dir": "COMFYBATCH_WORKFLOWS_DIR", "log_dir": "COMFYBATCH_LOG_DIR"}


@pytest.fixture(autouse=True)
def fresh_streamlit_caches():
    st.cache_data.clear()
    st.cache_resource.clear()
    yield
    ui.close_stores()
    st.cache_data.clear()
    st.cache_resource.clear()


@pytest.fixture
def app_settings(tmp_path, monkeypatch):
    """Point the app at tmp_path; COMFYUI_URL is a closed port unless a test passes real URLs."""
    def configure(urls: list[str] | None = None) -> Settings:
        settings = make_settings(tmp_path, [f"http://127.0.0.1:{free_port()}"] if urls is None else urls)
        for attr, name in ENV.items():
            value = getattr(settings, attr)
            monkeypatch.setenv(name, ",".join(value) if attr == "comfyui_urls" else str(value))
        return settings
    return configure


@pytest.fixture
def offline(app_settings) -> Settings:
    return app_settings()


@pytest.fixture
def db(offline) -> Store:
    store = Store(offline.db_path)
    yield store
    store.close()


def page(name: str) -> AppTest:
    at = AppTest.from_file(MAIN, default_timeout=30)
    if name != "overview":
        at.switch_page(f"pages/{name}.py")
    return at.run()


def generate(workflow: str) -> AppTest:
    at = page("generate")
    at.selectbox(key="gen_workflow").set_value(workflow)
    return at.run()


def batch(workflow: str) -> AppTest:
    at = page("batch")
    at.selectbox(key="batch_workflow").set_value(workflow)
    return at.run()


def texts(at: AppTest) -> list[str]:
    return [t.value for t in at.text]


def messages(at: AppTest, kind: str) -> list[str]:
    """Alert texts as a reader sees them (without the Markdown escapes the app adds)."""
    return [m.value.replace("\\", "").replace("&lt;", "<") for m in getattr(at, kind)]


def no_failures(at: AppTest) -> None:
    assert [e.value for e in at.exception] == []


def png(color: tuple[int, ...], size: tuple[int, int] = (32, 16), mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, "PNG")
    return buf.getvalue()


def finish_with_images(settings: Settings, store: Store, colors: list[tuple[int, int, int]]) -> list[int]:
    """Play the scheduler's part without a server: claim each queued task and record a real PNG for it."""
    return [finish_next_task(settings, store, png(color, (48, 32)))["task_id"] for color in colors]


# -- every page -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["overview", "generate", "batch", "tasks", "gallery", "servers"])
def test_every_page_says_plainly_that_comfyui_is_unreachable(offline, name):
    at = page(name)
    no_failures(at)
    assert messages(at, "error") == []
    url = offline.comfyui_urls[0]
    (warning,) = messages(at, "warning")
    assert warning.startswith(f"ComfyUI is unreachable: {url} (connection refused). Work you submit is kept in "
                              "the queue and starts when a server is back.")
    assert "COMFYUI_URL=http://127.0.0.1:8188 streamlit run app.py" in warning
    sidebar = [m.value for m in at.sidebar.markdown]
    assert "**Servers:** 0 up, 1 down" in sidebar
    assert "**Tasks:** 0 queued · 0 running · 0 failed · 0 done" in sidebar
    assert [c.value for c in at.sidebar.caption][-1].startswith("Scheduler: none running")


def test_no_server_configured_says_how_to_add_one(app_settings):
    app_settings([])
    at = page("tasks")
    no_failures(at)
    (warning,) = messages(at, "warning")
    assert warning.startswith("No ComfyUI server is configured. Work you submit is kept in the queue until one is.")
    assert "add a server on the Servers page" in warning


def test_a_malformed_setting_is_one_sentence_not_a_traceback(offline, monkeypatch):
    monkeypatch.setenv("COMFYBATCH_IN_FLIGHT", "two")
    at = page("batch")
    no_failures(at)
    assert messages(at, "error")[0] == "ComfyBatch cannot start: COMFYBATCH_IN_FLIGHT: 'two' is not a valid int"


# -- Generate -----------------------------------------------------------------------------------------
def test_generate_queues_work_while_comfyui_is_down(offline, db):
    at = generate("empty_image")
    at.number_input(key="gen_empty_image_width").set_value(40)
    at.number_input(key="gen_empty_image_count").set_value(2)
    at.text_area(key="gen_empty_image_extra").set_value("2.filename_prefix=red")
    at.button[0].click().run()
    no_failures(at)
    assert messages(at, "success") == ["Batch 1: 2 task(s) queued."]
    assert db.counts() == {"queued": 2}
    task = db.get_task(1)
    assert task["params"]["width"] == 40 and task["params"]["2.filename_prefix"] == "red"
    assert (task["graph"]["1"]["inputs"]["width"], task["graph"]["1"]["inputs"]["height"]) == (40, 64)
    assert task["graph"]["2"]["inputs"]["filename_prefix"] == "red"
    assert "Batch 1: 0/2 done (0%) - 2 queued - ETA unknown" in texts(at)


def test_generate_reports_bad_inputs_and_enqueues_nothing(offline, db):
    at = generate("empty_image")
    at.text_area(key="gen_empty_image_extra").set_value("just words").run()
    assert messages(at, "error") == ["the other inputs need fixing\n\n- other inputs line 1: expected <node id>.<input>"
                                     "=value, got 'just words'"]
    assert at.button[0].disabled
    at.text_area(key="gen_empty_image_extra").set_value("1.colour=5").run()
    at.button[0].click().run()
    no_failures(at)
    (error,) = messages(at, "error")
    assert error.startswith("1 problem(s) found; nothing was enqueued")
    assert "parameter '1.colour': node 1 (EmptyImage) has no input 'colour'" in error
    assert db.counts() == {}


def test_generate_form_for_sd15_with_aspect_preset_and_fixed_seed(offline, db):
    at = generate("sd15_txt2img")
    assert [t.key for t in at.text_area][:2] == ["gen_sd15_txt2img_prompt", "gen_sd15_txt2img_negative_prompt"]
    assert at.text_area(key="gen_sd15_txt2img_negative_prompt").value == "text, watermark"
    assert {n.key for n in at.number_input} >= {f"gen_sd15_txt2img_{k}" for k in ("width", "height", "seed", "steps",
                                                                                  "cfg", "count")}
    assert at.text_input(key="gen_sd15_txt2img_sampler_name").value == "euler"  # server down: no choice list
    at.selectbox(key="gen_sd15_txt2img_aspect").set_value("3:4").run()  # a size the workflow's TOML declares
    assert (at.number_input(key="gen_sd15_txt2img_width").value,
            at.number_input(key="gen_sd15_txt2img_height").value) == (512, 680)
    at.text_area(key="gen_sd15_txt2img_prompt").set_value("一只小猪在花园里")
    at.radio(key="gen_sd15_txt2img_seed_mode").set_value("Fixed").run()
    at.number_input(key="gen_sd15_txt2img_seed").set_value(1234)
    at.number_input(key="gen_sd15_txt2img_steps").set_value(2)
    at.number_input(key="gen_sd15_txt2img_count").set_value(2)
    at.button[0].click().run()
    no_failures(at)
    assert messages(at, "success") == ["Batch 1: 2 task(s) queued."]
    first, second = db.get_task(1), db.get_task(2)
    assert (first["seed"], second["seed"]) == (1234, 1235)  # a fixed seed counts up across copies
    assert first["prompt"] == "一只小猪在花园里"
    assert first["graph"]["5"]["inputs"] == {"width": 512, "height": 680, "batch_size": 1}
    assert first["graph"]["3"]["inputs"]["steps"] == 2


def test_generate_with_an_input_image_shows_a_preview_and_stages_the_upload(offline, db):
    at = generate("invert")
    assert "No upload: the workflow's own image (example.png) is used." in [c.value for c in at.caption]
    at.get("file_uploader")[0].set_value(("red.png", png((255, 0, 0)), "image/png")).run()
    assert len(at.image) == 1
    at.button[0].click().run()
    no_failures(at)
    task = db.get_task(1)
    assert task["graph"]["1"]["inputs"]["image"] == "red.png"
    assert Path(task["inputs"]["1.image"]["path"]).read_bytes() == png((255, 0, 0))


# -- Batch ----------------------------------------------------------------------------------------------
GOOD_CSV = "1.color,width,height,count\n16711680,32,32,1\n65280,48,32,2\n"
BAD_CSV = "1.color,width,heigth,count\n255,abc,32,1\n,32,32,0\n7,32,9,1\n"


def upload_csv(at: AppTest, data: bytes, name: str = "jobs.csv") -> AppTest:
    at.get("file_uploader")[0].set_value((name, data, "text/csv"))
    return at.run()


def test_batch_submits_the_whole_table_once(offline, db):
    at = upload_csv(batch("empty_image"), GOOD_CSV.encode())
    no_failures(at)
    assert messages(at, "success") == ["Ready: 3 task(s) from 2 row(s) in 1 batch(es)."]
    assert db.counts() == {}  # the dry run wrote nothing
    submit = next(b for b in at.button if b.label == "Submit batch")
    submit.click().run()
    no_failures(at)
    assert "Batch 1: 3 task(s) queued." in messages(at, "success")
    assert db.counts() == {"queued": 3}
    assert [db.get_task(i)["row_number"] for i in (1, 2, 3)] == [2, 3, 3]
    assert messages(at, "info") == ["This table was already submitted as batch 1."]
    assert next(b for b in at.button if b.label == "Submit batch").disabled


def test_batch_marks_every_bad_cell_and_enqueues_nothing(offline, db):
    at = upload_csv(batch("empty_image"), BAD_CSV.encode(), "bad.csv")
    no_failures(at)
    (error,) = messages(at, "error")
    lines = error.split("\n")
    assert lines[0] == "5 problem(s) in 3 row(s); nothing will be enqueued until they are fixed."
    assert lines[2:] == [
        "- row 2, column 'width': expected an integer, got 'abc'",
        "- row 2, column 'heigth': not a named parameter of this workflow, and not of the form <node id>.<input> "
        "or <node title>.<input>",
        "- row 3, column 'count': expected a whole number from 1 to 1000, got '0'",
        "- row 3, column 'heigth': not a named parameter of this workflow, and not of the form <node id>.<input> "
        "or <node title>.<input>",
        "- row 4, column 'heigth': not a named parameter of this workflow, and not of the form <node id>.<input> "
        "or <node title>.<input>"]
    marked = at.dataframe[-1].value
    assert list(marked.columns[:2]) == ["problem", "#"]
    assert marked["#"].tolist() == ["2", "3", "4"]
    assert marked["problem"].tolist()[0].startswith("width: expected an integer, got 'abc'; heigth: not a named")
    assert [b.label for b in at.button if b.label == "Submit batch"] == []
    assert db.counts() == {}


def test_batch_edits_in_the_table_fix_the_problems(offline, db):
    at = upload_csv(batch("empty_image"), b"1.color,width\n255,abc\n7,16\n")
    assert messages(at, "error")[0].startswith("1 problem(s) in 1 row(s)")
    (editor,) = at.data_editor
    assert editor.value["width"].tolist() == ["abc", "16"]
    at.session_state[editor.key] = {"edited_rows": {0: {"width": "24"}}, "added_rows": [], "deleted_rows": []}
    at.run()
    no_failures(at)
    assert messages(at, "error") == []
    assert messages(at, "success") == ["Ready: 2 task(s) from 2 row(s) in 1 batch(es)."]
    next(b for b in at.button if b.label == "Submit batch").click().run()
    assert db.get_task(1)["graph"]["1"]["inputs"]["width"] == 24


def test_batch_reports_a_ragged_row_as_the_cli_does_until_it_is_edited(offline, db):
    at = upload_csv(batch("empty_image"), b"1.color,width\n255,16\n7,24,oops\n9\n")
    no_failures(at)
    (editor,) = at.data_editor
    assert list(editor.value.columns) == ["#", "1.color", "width"]  # no made-up "extra 1" column
    (error,) = messages(at, "error")
    assert error.split("\n")[2:] == [
        "- row 3: 3 cells but the header has 2 columns; remove what is beyond the last column (oops)",
        "- row 4: 1 cells but the header has 2 columns; add the missing separators (empty cells are fine)"]
    at.session_state[editor.key] = {"edited_rows": {2: {"width": "8"}}, "added_rows": [], "deleted_rows": [1]}
    at.run()
    no_failures(at)
    assert messages(at, "error") == []
    assert messages(at, "success") == ["Ready: 2 task(s) from 2 row(s) in 1 batch(es)."]


def test_batch_upload_preview_refuses_a_huge_count_without_expanding_it(offline, db):
    at = upload_csv(batch("empty_image"), b"1.color,count\n1,1000\n2,1000000000\n" + b"3,1000\n" * 25)
    no_failures(at)
    (error,) = messages(at, "error")
    assert "- row 3, column 'count': expected a whole number from 1 to 1000, got '1000000000'" in error
    assert "would make 26,001 tasks; at most 20,000 in one submission (COMFYBATCH_MAX_TASKS)" in error
    assert db.counts() == {}


def test_batch_reads_gbk_and_shows_the_dry_run(offline, db):
    csv = "prompt,seed,steps,width,height\n一只小猪在花园里,99,2,64,96\n".encode("gbk")
    at = upload_csv(batch("sd15_txt2img"), csv, "gbk.csv")
    no_failures(at)
    assert messages(at, "success") == ["Ready: 1 task(s) from 1 row(s) in 1 batch(es)."]
    preview = at.dataframe[-1].value
    assert preview.loc[0, "prompt"] == "一只小猪在花园里"
    assert (preview.loc[0, "seed"], preview.loc[0, "steps"]) == (99, 2)
    assert json.loads(at.json[0].value)["6"]["inputs"]["text"] == "一只小猪在花园里"


def test_batch_images_named_in_the_csv_come_from_the_second_uploader(offline, db):
    at = upload_csv(batch("invert"), b"image\nred.png\n")
    error = messages(at, "error")[0]
    assert "- row 2, column 'image': image 'red.png' was not uploaded with the submission (images sent: none)" in error
    at.get("file_uploader")[1].set_value([("red.png", png((255, 0, 0)), "image/png")]).run()
    no_failures(at)
    assert messages(at, "success") == ["Ready: 1 task(s) from 1 row(s) in 1 batch(es)."]


def test_batch_offers_a_template_for_the_chosen_workflow(offline):
    at = batch("sd15_txt2img")
    (button,) = at.get("download_button")
    assert button.proto.label == "Download a template CSV for this workflow"
    assert "Upload a CSV file to check it and see what would be submitted." in messages(at, "info")
    assert "prompt, negative_prompt, seed, steps, cfg" in at.caption[0].value


# -- Tasks ----------------------------------------------------------------------------------------------
def test_tasks_lists_filters_and_acts_on_selected_rows(offline, db):
    submit_rows(offline, db, "empty_image", [{"1.color": str(i)} for i in range(3)], name="first")
    submit_rows(offline, db, "sd15_txt2img", [{"prompt": "a red fox", "steps": "2"}], name="second")
    at = page("tasks")
    no_failures(at)
    assert texts(at)[:3] == ["Batch 2: 0/1 done (0%) - 1 queued - ETA unknown",
                             "Batch 1: 0/3 done (0%) - 3 queued - ETA unknown", "Showing 1-4 of 4 task(s)"]
    table = at.dataframe[0].value
    assert table["id"].tolist() == [4, 3, 2, 1]
    assert table["status"].tolist() == ["queued"] * 4
    assert table.loc[0, "prompt"] == "a red fox"

    at.text_input(key="tasks_text").set_value("fox").run()
    assert "Showing 1-1 of 1 task(s)" in texts(at)
    at.text_input(key="tasks_text").set_value("").run()
    at.selectbox(key="tasks_batch").set_value(1).run()
    assert texts(at) == ["Batch 1: 0/3 done (0%) - 3 queued - ETA unknown", "Showing 1-3 of 3 task(s)"]

    at.session_state["tasks_table_3"] = {"selection": {"rows": [0, 2], "columns": [], "cells": []}}
    at.run()
    assert texts(at)[-1] == "Selected: 2 task(s): 3, 1"
    next(b for b in at.button if b.label == "Cancel selected").click().run()
    no_failures(at)
    assert messages(at, "success") == ["Cancelled 2 queued task(s); 0 on a server are being stopped."]
    assert [db.get_task(i)["status"] for i in (1, 2, 3)] == ["cancelled", "queued", "cancelled"]
    at.number_input(key="tasks_priority").set_value(5)
    next(b for b in at.button if b.label == "Set priority").click().run()
    assert [db.get_task(i)["priority"] for i in (1, 2, 3)] == [5, 0, 5]
    next(b for b in at.button if b.label == "Retry selected").click().run()
    assert messages(at, "success") == ["Put 2 task(s) back in the queue."]
    assert db.counts(1) == {"queued": 3}
    next(b for b in at.button if b.label == "Clear selection").click().run()
    assert not any(t.startswith("Selected:") for t in texts(at))

    at.multiselect(key="tasks_status").set_value(["failed"]).run()
    assert "Showing 0-0 of 0 task(s)" in texts(at)


def test_tasks_pages_through_many_tasks(offline, db):
    submit_rows(offline, db, "empty_image", [{"1.color": str(i)} for i in range(120)])
    at = page("tasks")
    assert "Showing 1-50 of 120 task(s)" in texts(at)
    at.get("pagination")[0].set_value(3).run()
    assert "Showing 101-120 of 120 task(s)" in texts(at)
    assert at.dataframe[0].value["id"].tolist() == list(range(20, 0, -1))
    at.selectbox(key="tasks_page_size").set_value(100).run()
    assert "Showing 101-120 of 120 task(s)" in texts(at)


def test_tasks_shows_failures_and_finished_work(offline, db):
    submit_rows(offline, db, "empty_image", [{"1.color": "1"}, {"1.color": "2"}])
    finish_with_images(offline, db, [(1, 2, 3)])
    task = db.claim_next_task("http://gpu-1:8188", str(uuid.uuid4()))
    db.transition(task["id"], service.TaskStatus.FAILED, ["submitted"], error="ComfyUI failed while running node 2")
    at = page("tasks")
    assert texts(at)[0] == "Batch 1: 2/2 done (100%) - 1 succeeded, 1 failed"
    table = at.dataframe[0].value
    assert table[["status", "progress", "server", "attempts"]].values.tolist() == [
        ["failed", 0.0, "http://gpu-1:8188", 1], ["succeeded", 1.0, "http://gpu-1:8188", 1]]
    assert table.loc[0, "error"] == "ComfyUI failed while running node 2"


# -- Gallery --------------------------------------------------------------------------------------------
def test_gallery_grid_detail_and_rerun_with_changes(offline, db):
    submit_rows(offline, db, "sd15_txt2img", [{"prompt": "a red fox", "seed": "42", "steps": "3"},
                                                      {"prompt": "a blue bird", "steps": "3"}])
    finish_with_images(offline, db, [(255, 0, 0), (0, 0, 255)])
    at = page("gallery")
    no_failures(at)
    assert "Showing 1-2 of 2 image(s); 0 picked in all batches" in texts(at)
    tiles = [m.value for m in at.markdown if "/files/thumb/" in m.value]
    assert ['src="/files/thumb/2"' in tiles[0], 'src="/files/thumb/1"' in tiles[1]] == [True, True]
    assert 'title="a red fox"' in tiles[1] and ">a red fox · seed 42 · 48×32</div>" in tiles[1]

    at.text_input(key="gallery_text").set_value("fox").run()
    assert "Showing 1-1 of 1 image(s); 0 picked in all batches" in texts(at)
    at.text_input(key="gallery_text").set_value("").run()
    at.text_input(key="gallery_params").set_value("steps=3; seed=42").run()
    assert "Showing 1-1 of 1 image(s); 0 picked in all batches" in texts(at)
    at.text_input(key="gallery_params").set_value("steps").run()
    assert messages(at, "error") == ["the parameter filter needs fixing\n\n- field 'parameters': condition 1: "
                                     "expected name=value, got 'steps'"]
    at.text_input(key="gallery_params").set_value("").run()

    next(b for b in at.button if b.label == "Pick all on this page").click().run()
    assert "Showing 1-2 of 2 image(s); 2 picked in all batches" in texts(at)
    assert [b.label for b in at.button if b.key and b.key.startswith("gpick_")] == ["★", "★"]
    next(b for b in at.button if b.label == "Prepare ZIP of 2 picked").click().run()
    links = [m.value for m in at.markdown if 'class="cb-download"' in m.value]
    assert len(links) == 1 and "/files/export/" in links[0] and "comfybatch-picked-images.zip" in links[0]
    at.selectbox(key="gallery_batch").set_value(1).run()
    assert [b.label for b in at.button if b.label.startswith("Prepare")] == [
        "Prepare ZIP of 2 picked", "Prepare CSV of picked", "Prepare batch 1 ZIP", "Prepare batch 1 results CSV"]

    at.button(key="gopen_1").click().run()
    no_failures(at)
    detail = next(t for t in texts(at) if t.startswith("Task 1 (succeeded)"))
    assert detail.endswith("· workflow sd15_txt2img · seed 42 · server http://gpu-1:8188")
    params = at.table[-1].value["value"].to_dict()
    assert (params["prompt"], params["seed"], params["steps"], params["width"]) == ("a red fox", "42", "3", "512")
    next(b for b in at.button if b.label == "Re-run with changes").click().run()
    no_failures(at)
    assert at.title[0].value == "Generate"
    assert messages(at, "info") == ["Prefilled from task 1: change what you like and generate."]
    assert at.text_area(key="gen_sd15_txt2img_prompt").value == "a red fox"
    assert at.radio(key="gen_sd15_txt2img_seed_mode").value == "Fixed"
    assert at.number_input(key="gen_sd15_txt2img_seed").value == 42
    assert at.number_input(key="gen_sd15_txt2img_steps").value == 3


def test_gallery_with_no_images_says_so(offline):
    at = page("gallery")
    assert "No images match. Images appear here as tasks finish." in messages(at, "info")


# -- Servers ----------------------------------------------------------------------------------------------
STORAGE_OFF = ("Object storage is off: images stay on this machine only. Set COMFYBATCH_S3_BUCKET (with the endpoint, "
               "region and credentials) to upload them to S3, Alibaba OSS, Tencent COS, MinIO or R2.")


def test_servers_add_disable_enable_and_remove_at_run_time(offline, db):
    at = page("servers")
    no_failures(at)
    configured = offline.comfyui_urls[0]
    assert texts(at) == [f"{configured}: down", STORAGE_OFF]
    at.text_input(key="servers_new_url").set_value("127.0.0.1:9")
    next(b for b in at.button if b.label == "Add server").click().run()
    assert messages(at, "success") == ["Added http://127.0.0.1:9. The scheduler starts sending it work within a "
                                       "second."]
    assert [(s["url"], s["enabled"], s["source"]) for s in db.servers()] == [
        (configured, 1, "config"), ("http://127.0.0.1:9", 1, "runtime")]
    at.selectbox(key="servers_pick").set_value("http://127.0.0.1:9").run()
    next(b for b in at.button if b.label == "Disable").click().run()
    assert db.servers()[1]["enabled"] == 0
    assert "http://127.0.0.1:9: down (disabled)" in texts(at)
    next(b for b in at.button if b.label == "Enable").click().run()
    assert db.servers()[1]["enabled"] == 1
    next(b for b in at.button if b.label == "Remove").click().run()
    assert messages(at, "success") == ["Removed http://127.0.0.1:9."]
    assert [s["url"] for s in db.servers()] == [configured]


def test_object_storage_on_the_servers_gallery_and_tasks_pages(offline, db, s3, monkeypatch):
    for name, value in s3.env().items():
        monkeypatch.setenv(name, value)
    submit_rows(offline, db, "sd15_txt2img", [{"prompt": "a red fox", "steps": "3"},
                                              {"prompt": "a blue bird", "steps": "3"}])
    finish_with_images(offline, db, [(255, 0, 0), (0, 0, 255)])
    at = page("servers")
    no_failures(at)
    assert texts(at)[1:] == [
        f"Object storage: bucket '{s3.bucket}' at {s3.url} - reachable, bucket exists",
        "Uploads: 0 stored, 0 pending, 0 failed; 2 image(s) made while storage was off (python -m core storage sync)"]
    service.sync_storage(offline.with_overrides(**s3.settings()), db)
    ui.refresh_health()
    at = page("servers")
    assert texts(at)[1:] == [f"Object storage: bucket '{s3.bucket}' at {s3.url} - reachable, bucket exists",
                             "Uploads: 2 stored, 0 pending, 0 failed"]

    at = page("gallery")
    no_failures(at)
    tiles = [m.value for m in at.markdown if "/files/thumb/" in m.value]
    links = [t.split('href="', 1)[1].split('"', 1)[0] for t in tiles]
    assert [link.startswith(f"{s3.url}/{s3.bucket}/comfybatch/") and "X-Amz-Signature=" in link
            for link in links] == [True, True]
    at.selectbox(key="gallery_batch").set_value(1).run()
    assert "Batch 1 - 2/2 image(s) in object storage" in texts(at)
    at = page("tasks")
    no_failures(at)
    assert "Batch 1: 2/2 done (100%) - 2 succeeded - 2/2 image(s) in object storage" in texts(at)


def test_servers_reject_a_bad_url_and_report_a_failed_test(offline, db):
    at = page("servers")
    at.text_input(key="servers_new_url").set_value("ftp://example.org")
    next(b for b in at.button if b.label == "Add server").click().run()
    assert messages(at, "error") == ["'ftp://example.org' is not an http(s) URL; enter one server URL, e.g. "
                                     "http://127.0.0.1:8188"]
    port = free_port()
    at.text_input(key="servers_new_url").set_value(f"http://127.0.0.1:{port}")
    next(b for b in at.button if b.label == "Test connection").click().run()
    no_failures(at)
    assert messages(at, "error")[0].startswith(f"Cannot reach http://127.0.0.1:{port}: connection refused.")
    assert len(db.servers()) == 1


def test_servers_health_and_connection_test_against_a_real_comfyui(app_settings, comfy):
    app_settings([comfy.url])
    at = page("servers")
    no_failures(at)
    assert messages(at, "warning") == []
    line, storage = texts(at)
    assert (line.startswith(f"{comfy.url}: up, ComfyUI 0."), storage) == (True, STORAGE_OFF)
    table = at.table[0].value
    assert table[["status", "running", "pending", "device"]].values.tolist() == [["up", 0, 0, "cpu"]]
    at.text_input(key="servers_new_url").set_value(comfy.url)
    next(b for b in at.button if b.label == "Test connection").click().run()
    assert messages(at, "success")[0].startswith(f"{comfy.url} answers: ComfyUI 0.")
    assert "**Servers:** 1 up, 0 down" in [m.value for m in at.sidebar.markdown]


@pytest.fixture
def live(app_settings, comfy) -> Iterator[Store]:
    """The pages pointed at the real ComfyUI, with a scheduler running in this process; yields its store."""
    settings = app_settings([comfy.url])
    store = Store(settings.db_path)
    scheduler = Scheduler(settings, store)
    scheduler.start()
    yield store
    scheduler.stop()
    store.close()


def test_generate_with_a_real_comfyui_and_scheduler_shows_the_images(live: Store):
    store = live
    at = generate("sd15_txt2img")
    sampler = at.selectbox(key="gen_sd15_txt2img_sampler_name")  # choices come from the server
    assert sampler.value == "euler" and "dpmpp_2m" in sampler.options
    at.text_area(key="gen_sd15_txt2img_prompt").set_value("a red fox in the snow")
    for name, value in (("width", 64), ("height", 64), ("steps", 2), ("count", 2)):
        at.number_input(key=f"gen_sd15_txt2img_{name}").set_value(value)
    at.button[0].click().run()
    assert messages(at, "success") == ["Batch 1: 2 task(s) queued."]
    assert service.wait_for_tasks(store, [1, 2], timeout=120) == {"succeeded": 2}
    at.run()
    assert "Batch 1: 2/2 done (100%) - 2 succeeded" in texts(at)
    tiles = [m.value for m in at.markdown if "/files/thumb/" in m.value]
    assert len(tiles) == 2


def test_generate_image_to_image_with_a_real_comfyui(live: Store):
    store = live
    at = generate("sd15_img2img")
    at.get("file_uploader")[0].set_value(("photo.png", png((200, 30, 30), (64, 48)), "image/png")).run()
    assert len(at.image) == 1  # the preview
    at.text_area(key="gen_sd15_img2img_prompt").set_value("watercolour")
    at.number_input(key="gen_sd15_img2img_steps").set_value(2)
    at.button[0].click().run()
    no_failures(at)
    assert messages(at, "success") == ["Batch 1: 1 task(s) queued."]
    assert service.wait_for_tasks(store, [1], timeout=120) == {"succeeded": 1}
    (image,) = store.images_for_task(1)
    assert (image["width"], image["height"]) == (64, 48)
    assert store.get_task(1)["graph"]["10"]["inputs"]["image"] == "photo.png"


def test_batch_names_what_no_server_can_run(app_settings, comfy):
    settings = app_settings([comfy.url])
    at = upload_csv(batch("qwen_image_t2i"), "prompt\n一只小猪在花园里\n".encode())
    no_failures(at)
    (error,) = messages(at, "error")
    lines = error.split("\n")
    assert lines[0] == "no ComfyUI server can run workflow 'qwen_image_t2i'; nothing was enqueued"
    assert lines[2:] and all(line.startswith(f"- {comfy.url}: ") for line in lines[2:])
    assert all("problem" not in d.value.columns for d in at.dataframe)
    store = Store(settings.db_path)
    try:
        assert store.counts() == {}
    finally:
        store.close()


def test_adding_a_workflow_on_generate(offline, db):
    at = page("generate")
    graph = {"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
             "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "x"}}}
    ui_format = json.dumps({"nodes": [], "links": []}).encode()
    uploader = next(u for u in at.get("file_uploader") if u.proto.label == "Workflow file")
    uploader.set_value(("my ui export.json", ui_format, "application/json")).run()
    next(b for b in at.button if b.label == "Add this workflow").click().run()
    no_failures(at)
    assert messages(at, "error")[0].startswith("my ui export.json is a ComfyUI UI-format workflow")
    assert not (offline.workflows_dir / "my_ui_export.json").exists()
    uploader = next(u for u in at.get("file_uploader") if u.proto.label == "Workflow file")
    uploader.set_value(("tiny square.json", json.dumps(graph).encode(), "application/json")).run()
    next(b for b in at.button if b.label == "Add this workflow").click().run()
    no_failures(at)
    assert messages(at, "success") == ["Added workflow 'tiny_square' with parameters: width, height, batch_size"]
    assert at.selectbox(key="gen_workflow").value == "tiny_square"
    assert json.loads((offline.workflows_dir / "tiny_square.json").read_text()) == graph


def test_batch_takes_a_webhook_url_checked_like_the_api(offline, db):
    at = batch("empty_image")
    at.text_input(key="batch_webhook").set_value("ftp://hooks.example/x")
    at = upload_csv(at, GOOD_CSV.encode())
    (error,) = messages(at, "error")
    assert "webhook" in error and "expected an http:// or https:// URL" in error
    at.text_input(key="batch_webhook").set_value("https://hooks.example/done").run()
    next(b for b in at.button if b.label == "Submit batch").click().run()
    no_failures(at)
    assert db.db.execute("SELECT url, state FROM webhooks").fetchall() == [("https://hooks.example/done", "waiting")]


@pytest.mark.parametrize("private", [True, False])
def test_tasks_as_a_member_shows_only_their_batches_when_private_and_no_actions_on_others(offline, db, monkeypatch,
                                                                                          private):
    from core.users import MEMBER, Actor

    alice, bob = Actor("alice", MEMBER), Actor("bob", MEMBER)
    for who, color in ((alice, "1"), (bob, "2")):
        service.submit(offline, db, service.Submission("empty_image", [service.Row({"1.color": color})]), actor=who)
    monkeypatch.setenv("COMFYBATCH_PRIVATE_BATCHES", "true" if private else "false")
    monkeypatch.setattr(ui, "current_actor", lambda settings, store: alice)
    at = page("tasks")
    no_failures(at)
    assert at.selectbox(key="tasks_person").options == (["alice (mine)"] if private else
                                                        ["Everyone", "alice (mine)", "bob"])
    assert [o.split(" ")[0] for o in at.selectbox(key="tasks_batch").options] == (
        ["All", "#1"] if private else ["All", "#2", "#1"])
    assert at.dataframe[0].value["id"].tolist() == [1]  # a member starts on "mine"
    assert not any(b.label in ("Pause queue", "Resume queue") for b in at.button)  # the queue is an admin's
    if private:
        return
    at.selectbox(key="tasks_person").set_value(None).run()
    at.selectbox(key="tasks_batch").set_value(2).run()
    assert at.dataframe[0].value["id"].tolist() == [2]
    assert not any(b.label.endswith("batch 2") or b.label == "Run batch 2 next" for b in at.button)
    at.session_state["tasks_table_2"] = {"selection": {"rows": [0], "columns": [], "cells": []}}
    at.run()
    assert [b.disabled for b in at.button if b.label.endswith(" selected")] == [True, True]
    assert any("someone else submitted (2)" in c.value for c in at.caption)
    at.selectbox(key="tasks_batch").set_value(1).run()
    assert any(b.label == "Pause batch 1" for b in at.button)
