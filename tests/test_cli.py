"""`python -m core`: the commands a script or a person types, run as real subprocesses."""

from __future__ import annotations

import json
import re
import zipfile

import pytest

from core.models import RETRYABLE, TaskStatus
from core.store import Store
from tests.support import cli_env as make_env
from tests.support import make_settings
from tests.support import run_cli as run

pytestmark = pytest.mark.slow  # every test starts `python -m core` subprocesses


def test_submit_worker_status_export(tmp_path, comfy):
    env = make_env(tmp_path, [comfy.url])
    (tmp_path / "jobs.csv").write_text("1.color,1.width\n255,16\n65280,24\n", encoding="utf-8")
    dry = run(env, "submit", "jobs.csv", "--workflow", "empty_image", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    graphs = [json.loads(line) for line in dry.stdout.splitlines()]
    assert [(g["1"]["inputs"]["color"], g["1"]["inputs"]["width"]) for g in graphs] == [(255, 16), (65280, 24)]
    assert json.loads(run(env, "status", "--json").stdout) == {}

    submitted = run(env, "submit", "jobs.csv", "--workflow", "empty_image", "--count", "2", "--batch-name", "cli")
    assert (submitted.returncode, submitted.stdout) == (0, "1\n")
    single = run(env, "submit", "--workflow", "empty_image", "--param", "1.color=7", "--priority", "5")
    assert single.stdout == "2\n"
    assert json.loads(run(env, "status", "--json").stdout) == {"queued": 5}

    worker = run(env, "worker", "--until-idle", "--quiet")
    assert worker.returncode == 0, worker.stderr
    assert json.loads(run(env, "status", "--json").stdout) == {"succeeded": 5}
    # A run shorter than the minute between summary lines still tells its count, with the servers it fed.
    log = (tmp_path / "logs" / "comfybatch.log").read_text()
    assert re.search(r"INFO core\.scheduler: 5 task\(s\) succeeded in the last \d+ s on 1 server\(s\)\n", log), log
    assert json.loads(run(env, "status", "1", "--json").stdout) == {"succeeded": 4}

    exported = run(env, "export", "1", "--csv", "out.csv", "--zip", "out.zip")
    assert json.loads(exported.stdout) == {"images": 4, "rows": 4, "zipped": 4}
    with zipfile.ZipFile(tmp_path / "out.zip") as zf:
        assert len(zf.namelist()) == 4 and all(n.startswith("batch-00001/") for n in zf.namelist())
    lines = (tmp_path / "out.csv").read_text(encoding="utf-8-sig").splitlines()
    assert lines[0] == ("task_id,row_number,1.color,1.width,resolved_seed,status,server,attempts,error,images,"
                        "image_urls,submitted_by")
    assert lines[1].startswith(f"1,2,255,16,,succeeded,{comfy.url},1,,batch-00001/task-000001_2_00.png")
    assert lines[1].endswith(",cli")  # the CLI submits as the local admin "cli"


def test_errors_are_one_clear_line_and_non_zero(tmp_path):
    env = make_env(tmp_path, [])
    (tmp_path / "bad.csv").write_text("1.color,1.width\nred,16\n1,wide\n", encoding="utf-8")
    bad = run(env, "submit", "bad.csv", "--workflow", "empty_image")
    assert bad.returncode == 2
    assert bad.stderr.splitlines() == [
        "error: 2 problem(s) found; nothing was enqueued",
        "- bad.csv row 2: parameter '1.color' (1.color): expected an integer, got 'red'",
        "- bad.csv row 3: parameter '1.width' (1.width): expected an integer, got 'wide'"]
    assert "Traceback" not in bad.stderr
    unknown = run(env, "submit", "--workflow", "nope", "--prompt", "x")
    assert unknown.returncode == 2
    assert unknown.stderr.startswith("error: 1 problem(s) found; nothing was enqueued\n"
                                     "- --workflow: unknown workflow 'nope' (available: ")
    assert run(env, "submit", "missing.csv", "--workflow", "empty_image").stderr == "error: missing.csv: no such file\n"
    assert run(env, "worker").stderr == (
        "error: no ComfyUI server configured: set COMFYUI_URL, e.g. COMFYUI_URL=http://127.0.0.1:8188\n")
    assert run(env, "cancel", "--task", "99").stderr == "error: task 99 does not exist\n"
    bad_param = run(env, "submit", "--workflow", "empty_image", "--param", "oops")
    assert bad_param.stderr.startswith("error: --param 'oops': expected KEY=VALUE")


def test_servers_reports_down_server_and_exit_code(tmp_path, comfy):
    env = make_env(tmp_path, [comfy.url, "http://127.0.0.1:9"])
    out = run(env, "servers")
    assert out.returncode == 1
    lines = out.stdout.splitlines()
    assert lines[0].startswith(f"{comfy.url}\tup\tComfyUI 0.3.75 on cpu")
    assert lines[1].startswith("http://127.0.0.1:9\tDOWN\tComfyUI at http://127.0.0.1:9 is unreachable")


def test_bad_inputs_exit_2_with_one_line_per_problem_and_enqueue_nothing(tmp_path):
    env = make_env(tmp_path, [])
    for count in ("0", "-2"):
        out = run(env, "submit", "--workflow", "empty_image", "--count", count)
        assert (out.returncode, out.stderr.splitlines()) == (2, [
            "error: 1 problem(s) found; nothing was enqueued",
            f"- --count: expected a whole number from 1 to 1000, got {count}"])
    huge = run(env, "submit", "--workflow", "empty_image", "--count", str(10**9))
    assert huge.returncode == 2 and "would make 1,000,000,000 tasks; at most 20,000" in huge.stderr
    seed = run(env, "submit", "--workflow", "sd15_txt2img", "--param", "3.seed=" + "9" * 30, "--param", "cfg=nan")
    assert (seed.returncode, seed.stderr.splitlines()) == (2, [
        "error: 2 problem(s) found; nothing was enqueued",
        "- parameter '3.seed' (3.seed): 999999999999999999999999999999 is outside the 64-bit range ComfyUI and "
        "ComfyBatch store (at most 9,223,372,036,854,775,807 in size)",
        "- parameter 'cfg' (3.cfg): expected a finite number, got 'nan'"])
    (tmp_path / "big.csv").write_text("prompt,seed\n" + "x" * 1_000_000 + ",1\n", encoding="utf-8")
    big = run(env, "submit", "big.csv", "--workflow", "sd15_txt2img")
    assert big.returncode == 2 and big.stderr.startswith("error: big.csv row 2: not readable as CSV (field larger")
    (tmp_path / "fr.csv").write_bytes("prompt\nFrançais élégant\n".encode("cp1252"))
    fr = run(env, "submit", "fr.csv", "--workflow", "sd15_txt2img")
    assert fr.returncode == 2 and "fr.csv: cannot read the text: it is not UTF-8 (byte 0xe7 on line 2)" in fr.stderr
    for out in (huge, seed, big, fr):
        assert "Traceback" not in out.stderr
    assert json.loads(run(env, "status", "--json").stdout) == {}


def test_retry_takes_the_same_statuses_as_the_api(tmp_path):
    env = make_env(tmp_path, [])
    assert run(env, "submit", "--workflow", "empty_image", "--count", "3").returncode == 0
    store = Store(make_settings(tmp_path, []).db_path)
    try:
        ids = store.task_ids(batch_id=1)
        assert run(env, "cancel", "--task", str(ids[0])).stdout == "cancelled 1, cancelling on server 0\n"
        store.transition(ids[1], TaskStatus.FAILED, ["queued"], error="boom")
        out = run(env, "retry", "--batch", "1")
        assert out.stdout == "requeued 2 task(s)\n"  # the failed one and the cancelled one: models.RETRYABLE
        assert RETRYABLE == ("failed", "cancelled")
        assert store.counts(1) == {"queued": 3}
    finally:
        store.close()
