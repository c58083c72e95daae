"""Workflow templates: discovery, addressing, patching and the errors users meet. Pure, no server."""

from __future__ import annotations

import json
import random

import pytest

from core import workflows
from core.errors import InputError, WorkflowError
from core.workflows import Param
from tests.support import ROOT

WF = ROOT / "workflows"


def undeclared(tmp_path, name):
    """A copy of a shipped graph without its .toml declaration, to exercise discovery."""
    path = tmp_path / f"{name}.json"
    path.write_text((WF / f"{name}.json").read_text(encoding="utf-8"), encoding="utf-8")
    return workflows.load_workflow(path)


def test_sd15_parameters_are_discovered_from_the_graph(tmp_path):
    wf = undeclared(tmp_path, "sd15_txt2img")
    assert {name: (p.target, p.kind) for name, p in wf.params.items()} == {
        "prompt": ("6.text", "string"), "negative_prompt": ("7.text", "string"), "seed": ("3.seed", "seed"),
        "steps": ("3.steps", "int"), "cfg": ("3.cfg", "float"), "sampler_name": ("3.sampler_name", "string"),
        "scheduler": ("3.scheduler", "string"), "denoise": ("3.denoise", "float"), "width": ("5.width", "int"),
        "height": ("5.height", "int"), "batch_size": ("5.batch_size", "int"),
        "checkpoint": ("4.ckpt_name", "string")}


def test_patching_changes_exactly_the_named_inputs_of_a_copy():
    wf = workflows.load_workflow(WF / "sd15_txt2img.json")
    original = json.loads(json.dumps(wf.graph))
    resolved, graph = workflows.build_graph(
        wf, {"prompt": "一只小猪", "seed": "42", "steps": "2", "width": "64", "height": "64", "7.text": "blurry"})
    expected = json.loads(json.dumps(original))
    expected["6"]["inputs"]["text"] = "一只小猪"
    expected["7"]["inputs"]["text"] = "blurry"
    expected["3"]["inputs"].update(seed=42, steps=2)
    expected["5"]["inputs"].update(width=64, height=64)
    assert graph == expected
    assert wf.graph == original
    assert resolved == {"prompt": "一只小猪", "seed": 42, "steps": 2, "width": 64, "height": 64, "7.text": "blurry"}


def test_random_seed_is_resolved_to_an_integer():
    wf = workflows.load_workflow(WF / "sd15_txt2img.json")
    resolved, graph = workflows.build_graph(wf, {"seed": "random"}, random.Random(7))
    assert resolved["seed"] == random.Random(7).randint(0, workflows.SEED_MAX)
    assert graph["3"]["inputs"]["seed"] == resolved["seed"]
    assert workflows.build_graph(wf, {}, random.Random(7))[0] == resolved  # random is the default


def test_generic_and_title_addressing_on_a_model_free_graph(tmp_path):
    wf = undeclared(tmp_path, "empty_image")
    assert set(wf.params) == {"width", "height", "batch_size"}  # no sampler: the one sized node
    _, graph = workflows.build_graph(wf, {"1.color": "255", "Save Image.filename_prefix": "x/y", "width": 8})
    assert graph["1"]["inputs"] == {"width": 8, "height": 64, "batch_size": 1, "color": 255}
    assert graph["2"]["inputs"]["filename_prefix"] == "x/y"


@pytest.mark.parametrize(("values", "problem"), [
    ({"colour": "1"}, "unknown parameter 'colour': not a named parameter of this workflow, and not of the form "
                      "<node id>.<input> or <node title>.<input>"),
    ({"9.width": "1"}, "unknown parameter '9.width': no node has this id or title"),
    ({"1.colour": "1"}, "parameter '1.colour': node 1 (EmptyImage) has no input 'colour' "
                        "(its inputs: width, height, batch_size, color)"),
    ({"2.images": "1"}, "parameter '2.images': node 2 (SaveImage) input 'images' is a link from node 1, not a value; "
                        "it cannot be overwritten"),
    ({"width": "wide"}, "parameter 'width' (1.width): expected an integer, got 'wide'"),
    ({"width": "1.5"}, "parameter 'width' (1.width): expected an integer, got '1.5'"),
    ({"1.color": True}, "parameter '1.color' (1.color): expected a number, got true"),
    ({"1.color": [1]}, "parameter '1.color' (1.color): expected text, a number, true/false or null, got a list [1]"),
    ({"width": "nan"}, "parameter 'width' (1.width): expected an integer, got 'nan'"),
    ({"width": "9" * 5000}, "parameter 'width' (1.width): expected an integer, got '" + "9" * 56 + "..."),
    ({"width": str(2**64)}, "parameter 'width' (1.width): 18446744073709551616 is outside the 64-bit range ComfyUI "
                            "and ComfyBatch store (at most 9,223,372,036,854,775,807 in size)"),
])
def test_bad_parameters_are_named(tmp_path, values, problem):
    wf = undeclared(tmp_path, "empty_image")
    with pytest.raises(InputError) as err:
        workflows.resolve_params(wf, values)
    assert [str(p.at(row=2, file="jobs.csv")) for p in err.value.problems] == [f"jobs.csv row 2: {problem}"]
    (key,) = values
    assert (err.value.problems[0].parameter, err.value.problems[0].row) == (key, None)  # typed, not text


def test_numbers_must_be_finite_and_an_addressed_int_input_takes_a_fraction(tmp_path):
    wf = workflows.load_workflow(WF / "qwen_image_t2i.json")  # "3.denoise": 1 in the template (a FLOAT input)
    assert workflows.resolve_params(wf, {"3.denoise": "0.5", "3.steps": "4"})["3.denoise"] == 0.5
    assert workflows.resolve_params(wf, {"3.denoise": "1"})["3.denoise"] == 1
    for bad in ("nan", "inf", "-Infinity", float("nan"), float("inf")):
        with pytest.raises(InputError) as err:
            workflows.resolve_params(wf, {"cfg": bad})
        assert err.value.problems[0].code in ("invalid", "wrong_type"), bad
        assert "finite" in err.value.problems[0].message or "expected a number" in err.value.problems[0].message
    with pytest.raises(InputError) as err:
        workflows.resolve_params(wf, {"3.denoise": "nan"})
    assert str(err.value.problems[0]) == "parameter '3.denoise' (3.denoise): expected a number, got 'nan'"
    with pytest.raises(InputError) as err:
        workflows.resolve_params(wf, {"seed": str(2**63), "prompt": "a\x00b"})
    assert [p.code for p in err.value.problems] == ["out_of_range", "nul"]


def test_declared_bounds_and_choices_are_enforced():
    p = Param("steps", "3", "steps", "int", minimum=1, maximum=50)
    assert workflows.coerce(p, " 20 ") == 20
    with pytest.raises(InputError, match=r"parameter 'steps' \(3.steps\): 0 is below the minimum 1"):
        workflows.coerce(p, "0")
    s = Param("sampler_name", "3", "sampler_name", "string", choices=("euler", "dpmpp_2m"))
    with pytest.raises(InputError, match="'heun' is not one of euler, dpmpp_2m"):
        workflows.coerce(s, "heun")


def test_ui_format_file_gets_a_clear_message(tmp_path):
    path = tmp_path / "ui.json"
    path.write_text(json.dumps({"nodes": [{"id": 1, "type": "KSampler"}], "links": []}))
    with pytest.raises(WorkflowError) as err:
        workflows.load_workflow(path)
    assert str(err.value) == (
        "ui.json is a ComfyUI UI-format workflow (it has 'nodes' and 'links'). ComfyUI's /prompt only accepts the "
        "API format: open it in ComfyUI and use Workflow > Export (API) (\"Save (API)\"), then use that file.")


def test_broken_links_and_bad_json_are_reported(tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    dangling = {"1": {"class_type": "SaveImage", "inputs": {"images": ["7", 0]}}}
    (tmp_path / "dangling.json").write_text(json.dumps(dangling))
    found, problems = workflows.list_workflows(tmp_path)
    assert found == []
    assert problems[0].startswith("bad.json: not a valid JSON file")
    assert problems[1] == ("dangling.json is not a usable API-format workflow\n"
                           "- node 1 (SaveImage) input 'images' links to missing node 7")


def test_a_broken_or_huge_file_never_takes_the_workflow_list_down(tmp_path):
    (tmp_path / "ok.json").write_text((WF / "empty_image.json").read_text())
    (tmp_path / "no_inputs.json").write_text(json.dumps({"1": {"class_type": "EmptyImage"}}))
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    (tmp_path / "huge.json").write_bytes(b" " * (workflows.MAX_WORKFLOW_BYTES + 1))
    (tmp_path / "named.json").write_text(json.dumps({  # subgraph-style and very long ids are fine
        "75:12": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
        "9" * 5000: {"class_type": "SaveImage", "inputs": {"images": ["75:12", 0], "filename_prefix": "x"}}}))
    found, problems = workflows.list_workflows(tmp_path)
    assert sorted(w.name for w in found) == ["named", "ok"]
    assert [p.split(":")[0].split(" ")[0] for p in problems] == ["deep.json", "huge.json", "no_inputs.json"]
    assert problems[2] == ("no_inputs.json is not a usable API-format workflow\n"
                           "- node 1 (EmptyImage): 'inputs' is missing")
    assert all(len(p) < 400 for p in problems)


def test_declared_parameters_from_a_toml_sidecar(tmp_path):
    (tmp_path / "t.json").write_text((WF / "sd15_txt2img.json").read_text())
    (tmp_path / "t.toml").write_text('title = "Tiny SD"\n[params.subject]\ntarget = "6.text"\nrequired = true\n'
                                     '[params.steps]\ntarget = "3.steps"\nmin = 1\nmax = 10\n')
    wf = workflows.load_workflow(tmp_path / "t.json")
    assert (wf.title, list(wf.params)) == ("Tiny SD", ["subject", "steps"])
    with pytest.raises(InputError) as err:
        workflows.resolve_params(wf, {"steps": "11"})
    assert [str(p) for p in err.value.problems] == ["parameter 'steps' (3.steps): 11 is above the maximum 10",
                                                    "parameter 'subject': missing: this workflow requires it"]
    (tmp_path / "t.toml").write_text('[params.x]\ntarget = "3.steps"\ntype = "integer"\n')
    with pytest.raises(WorkflowError) as err:
        workflows.load_workflow(tmp_path / "t.json")
    assert [str(p) for p in err.value.problems] == [
        "[params.x]: type 'integer' is not one of int, float, number, string, bool, seed, image"]
    (tmp_path / "t.toml").write_text('[params.x]\ntarget = "6.clip"\n')
    with pytest.raises(WorkflowError, match=r"\[params.x\]: parameter '6.clip'"):
        workflows.load_workflow(tmp_path / "t.json")
