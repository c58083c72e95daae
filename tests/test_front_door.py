"""core.service as the one front door, without servers: adding a workflow checks everything before a file is
written, actions take the status groups of core.models, and the API's JSON and CSV readers build the same
Submission the CLI and the pages build, so a bad row gets the same problem whichever face it came in by."""

from __future__ import annotations

import json

import pytest

from api import intake as api_intake
from core import service, workflows
from core.errors import InputError
from core.models import RETRYABLE, UNFINISHED, TaskStatus
from tests.support import ROOT, submit_csv, submit_rows

GOOD = (ROOT / "workflows" / "empty_image.json").read_bytes()


@pytest.mark.parametrize(("name", "data", "message"), [
    ("no_inputs.json", json.dumps({"1": {"class_type": "EmptyImage"}}).encode(),
     "no_inputs.json is not a usable API-format workflow"),
    ("deep.json", b"[" * 100_000 + b"]" * 100_000, "deep.json: not a usable JSON file (RecursionError"),
    ("huge.json", b" " * (workflows.MAX_WORKFLOW_BYTES + 1), "huge.json: 2,097,153 bytes is too large for a workflow"),
    ("ui.json", json.dumps({"nodes": [], "links": []}).encode(), "ui.json is a ComfyUI UI-format workflow"),
    ("bad.json", b"{nope", "bad.json: not a valid JSON file"),
    ("links.json", json.dumps({"1": {"class_type": "SaveImage", "inputs": {"images": ["9", 0]}}}).encode(),
     "links.json is not a usable API-format workflow"),
])
def test_a_bad_workflow_upload_is_refused_and_nothing_is_written(offline_engine, name, data, message):
    settings, _ = offline_engine
    before = sorted(p.name for p in settings.workflows_dir.iterdir())
    with pytest.raises(InputError) as err:
        service.add_workflow(settings, name, data)
    assert str(err.value).startswith(message)
    assert len(str(err.value)) < 600
    assert sorted(p.name for p in settings.workflows_dir.iterdir()) == before
    found, problems = workflows.list_workflows(settings.workflows_dir)
    assert problems == [] and len(found) == len([n for n in before if n.endswith(".json")])


def test_a_good_upload_with_subgraph_style_ids_is_added_and_listed(offline_engine):
    settings, store = offline_engine
    graph = {"75:12": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
             "save": {"class_type": "SaveImage", "inputs": {"images": ["75:12", 0], "filename_prefix": "x"}}}
    added = service.add_workflow(settings, "My Graph (v2).json", json.dumps(graph).encode())
    assert (added.name, sorted(added.params)) == ("My_Graph__v2", ["batch_size", "height", "width"])
    assert (settings.workflows_dir / "My_Graph__v2.json").is_file()
    with pytest.raises(InputError, match="a workflow named 'My_Graph__v2' already exists"):
        service.add_workflow(settings, "My Graph (v2).json", GOOD)
    result = submit_rows(settings, store, "My_Graph__v2", [{"75:12.color": "3", "75:12.width": "16"}])
    assert store.get_task(result.task_ids[0])["graph"]["75:12"]["inputs"]["width"] == 16


def test_actions_use_the_status_groups_of_the_engine(offline_engine):
    settings, store = offline_engine
    ids = submit_rows(settings, store, "empty_image", [{"1.color": str(i)} for i in range(4)]).task_ids
    store.claim_next_task("http://gpu:8188", "p-1")
    store.transition(ids[1], TaskStatus.FAILED, ["queued"], error="boom")
    assert service.cancel_batch(store, 1) == {"cancelled": [ids[2], ids[3]], "cancelling": [ids[0]]}
    assert service.retry_batch(store, 1) == [ids[1], ids[2], ids[3]]
    assert store.counts(1) == {"queued": 3, "submitted": 1}
    assert (UNFINISHED, RETRYABLE) == (("queued", "submitted", "running"), ("failed", "cancelled"))
    assert service.set_batch_priority(store, 1, 7) == 4
    with pytest.raises(InputError) as err:
        service.set_priority(store, ids, 10**7)
    assert [str(p) for p in err.value.problems] == [
        "field 'priority': expected a whole number from -1000000 to 1000000 (higher runs first), got 10000000"]
    with pytest.raises(InputError, match="enter one server URL"):
        service.add_server(store, "http://a:1, http://b:2")
    assert service.add_server(store, "gpu-3:8188") == "http://gpu-3:8188"


def test_json_and_csv_from_the_api_get_the_answers_the_cli_gets(offline_engine):
    settings, store = offline_engine
    csv_data = b"1.color,1.width\nred,16\n1,wide,extra\n"
    with pytest.raises(InputError) as from_cli:
        submit_csv(settings, store, csv_data, "jobs.csv", "empty_image")
    form = api_intake.form_submission(settings, {"workflow": ["empty_image"]}, {"csv": [("jobs.csv", csv_data)]})
    with pytest.raises(InputError) as from_api:
        service.submit(settings, store, form)
    assert from_api.value.problems == from_cli.value.problems
    assert [str(p) for p in from_cli.value.problems] == [
        "jobs.csv row 2: parameter '1.color' (1.color): expected an integer, got 'red'",
        "jobs.csv row 3: 3 cells but the header has 2 columns; remove what is beyond the last column (extra)",
        "jobs.csv row 3: parameter '1.width' (1.width): expected an integer, got 'wide'"]
    body = api_intake.json_submission({"workflow": "empty_image", "rows": [{"1.color": "red", "1.width": 16}],
                                       "count": 0})
    with pytest.raises(InputError) as from_json:
        service.submit(settings, store, body)
    assert [str(p) for p in from_json.value.problems] == [
        "field 'count': expected a whole number from 1 to 1000, got 0",
        "row 1: parameter '1.color' (1.color): expected an integer, got 'red'"]
    assert store.counts() == {}
