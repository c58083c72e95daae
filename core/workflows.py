"""Workflow templates: load, discover parameters, patch a deep copy. Pure, no I/O beyond reading files.

A template is `workflows/NAME.json` in ComfyUI API format (`{node_id: {class_type, inputs, _meta}}`),
optionally beside `workflows/NAME.toml` that declares its title, description and named parameters:

    title = "SD1.5 text to image"
    [params.prompt]
    target = "6.text"          # node id . input name
    label = "Prompt"           # optional: type, default, min, max, choices, required, multiline, help
    [params.image2]
    target = "106.image"
    type = "image"
    prune = ["106", "115"]     # when not given: these nodes go, and every input linking to them
    [presets.size]             # optional: named width/height pairs for the form
    "16:9" = [1664, 928]
    [requires.custom_nodes]    # optional: where a custom node class comes from, for preflight messages
    RembgByBiRefNet = "lldacing/ComfyUI_BiRefNet_ll"

Without a declaration, parameters are discovered from the graph (see `discover_params`). Any input of any
node can also be addressed as `<node_id>.<input>` or `<node title>.<input>`.
"""

from __future__ import annotations

import json
import math
import random
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from core.errors import ComfyBatchError, InputError, NotFound, Problem, WorkflowError, clip

SEED_MAX = 2**53 - 1  # exact in JSON/JavaScript, well inside ComfyUI's 64-bit seed range
INT_MAX = 2**63 - 1  # the largest integer SQLite stores (ComfyUI's own INT inputs are 64-bit too)
MAX_WORKFLOW_BYTES = 2 * 1024 * 1024  # an API-format graph is tens of kilobytes; refuse anything near this
SAMPLER_SETTINGS = ("steps", "cfg", "sampler_name", "scheduler", "denoise")
TEXT_INPUTS = ("text", "prompt", "text_g", "text_l")
IMAGE_LOADERS = ("LoadImage", "LoadImageMask")
KINDS = ("int", "float", "number", "string", "bool", "seed", "image")  # the values a Param's kind takes


@dataclass(frozen=True)
class Param:
    """A named parameter: which node input it sets and what values it accepts."""

    name: str
    node_id: str
    input_name: str
    kind: str  # int | float | number (int or float) | string | bool | seed | image
    default: Any = None
    label: str = ""
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[Any, ...] | None = None
    required: bool = False
    multiline: bool = False
    help: str = ""
    prune: tuple[str, ...] = ()  # nodes removed from the graph when this parameter is not given

    @property
    def target(self) -> str:
        return f"{self.node_id}.{self.input_name}"


@dataclass(frozen=True)
class Workflow:
    name: str
    graph: dict[str, Any]
    params: dict[str, Param]
    title: str = ""
    description: str = ""
    declared: bool = False
    presets: dict[str, Any] = field(default_factory=dict)
    custom_nodes: dict[str, str] = field(default_factory=dict)  # class_type -> custom node pack

    def param_for(self, key: str) -> Param:
        """Resolve a parameter key (named, `node_id.input` or `title.input`) or raise InputError."""
        if key in self.params:
            return self.params[key]
        node_id, input_name = _address(self.graph, key)
        value = self.graph[node_id]["inputs"][input_name]
        for p in self.params.values():
            if p.node_id == node_id and p.input_name == input_name:
                return replace(p, name=key)
        # An integer in the template says nothing about the input's type (`denoise: 1` is a FLOAT input):
        # an addressed input takes any number, and ComfyUI's own validation has the last word.
        kind = _kind_of(value)
        return Param(key, node_id, input_name, "number" if kind == "int" else kind, default=value)


def load_graph(path: Path) -> dict[str, Any]:
    """Read an API-format graph from a JSON file, with a clear error for every way it can be wrong."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise NotFound(f"workflow file {path} does not exist") from None
    if size > MAX_WORKFLOW_BYTES:
        raise WorkflowError(f"{path.name}: {size:,} bytes is too large for a workflow (at most "
                            f"{MAX_WORKFLOW_BYTES:,}); an API-format graph is usually under 100 KB")
    return parse_graph(path.read_bytes(), path.name)


def parse_graph(data: bytes, source: str) -> dict[str, Any]:
    """An API-format graph from a file's bytes (UTF-8, with or without BOM), checked like `check_api_format`."""
    try:
        graph = json.loads(data.decode("utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WorkflowError(f"{source}: not a valid JSON file ({exc})") from None
    except (RecursionError, ValueError) as exc:  # nested too deep; a number with too many digits
        raise WorkflowError(f"{source}: not a usable JSON file ({type(exc).__name__}: {str(exc)[:100]})") from None
    return check_api_format(graph, source)


def check_api_format(data: Any, source: str) -> dict[str, Any]:
    if isinstance(data, dict) and isinstance(data.get("prompt"), dict) and "nodes" not in data:
        data = data["prompt"]  # a saved /prompt request body
    if isinstance(data, dict) and isinstance(data.get("nodes"), list):
        raise WorkflowError(
            f"{source} is a ComfyUI UI-format workflow (it has 'nodes' and 'links'). ComfyUI's /prompt only "
            "accepts the API format: open it in ComfyUI and use Workflow > Export (API) (\"Save (API)\"), "
            "then use that file.")
    if not isinstance(data, dict) or not data:
        raise WorkflowError(f"{source}: expected a JSON object of nodes {{id: {{class_type, inputs}}}}")
    problems = []
    for node_id, node in data.items():
        if not isinstance(node, dict) or not isinstance(node.get("class_type"), str):
            problems.append(Problem(f"node {clip(node_id)}: missing 'class_type'", node=node_id))
            continue
        inputs = node.get("inputs")
        if not isinstance(inputs, dict):
            problems.append(Problem(f"node {clip(node_id)} ({clip(node['class_type'])}): 'inputs' is "
                                    f"{'missing' if inputs is None else 'not an object'}", node=node_id))
            continue
        for name, value in inputs.items():
            if _is_link(value) and str(value[0]) not in data:
                problems.append(Problem(f"node {clip(node_id)} ({clip(node['class_type'])}) input "
                                        f"'{clip(name)}' links to missing node {clip(str(value[0]))}",
                                        node=node_id))
        if len(problems) >= 20:
            break
    if problems:
        raise WorkflowError(f"{source} is not a usable API-format workflow", problems)
    return data


def check_loadable(name: str, graph: dict[str, Any]) -> Workflow:
    """The workflow an uploaded graph (no sidecar) would load as: parameter discovery runs on it, so a graph
    it cannot handle is refused before the file is written."""
    return Workflow(name, graph, discover_params(graph), title=name.replace("_", " "))


def load_workflow(path: Path) -> Workflow:
    graph = load_graph(path)
    sidecar = path.with_suffix(".toml")
    discovered = discover_params(graph)
    if not sidecar.is_file():
        return Workflow(path.stem, graph, discovered, title=path.stem.replace("_", " "))
    try:
        meta = tomllib.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise WorkflowError(f"{sidecar.name}: cannot read ({exc})") from None
    params = _declared_params(graph, meta.get("params", {}), sidecar.name)
    return Workflow(path.stem, graph, params, title=meta.get("title", path.stem),
                    description=meta.get("description", ""), declared=True, presets=meta.get("presets", {}),
                    custom_nodes=dict((meta.get("requires") or {}).get("custom_nodes") or {}))


def list_workflows(folder: Path) -> tuple[list[Workflow], list[str]]:
    """Every loadable template in `folder`, and one message per file that could not be loaded."""
    workflows, problems = [], []
    for path in sorted(folder.glob("*.json")):
        try:
            workflows.append(load_workflow(path))
        except ComfyBatchError as exc:
            problems.append(str(exc))
        except Exception as exc:  # a file dropped in by hand must never take the whole list down
            problems.append(f"{path.name}: cannot be loaded ({type(exc).__name__}: {str(exc)[:200]})")
    return workflows, problems


def get_workflow(folder: Path, name: str) -> Workflow:
    if not name or "/" in name or "\\" in name or name.startswith("."):
        raise NotFound(f"unknown workflow {name!r}")
    path = folder / f"{name.removesuffix('.json')}.json"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in folder.glob("*.json"))) or "none"
        raise NotFound(f"unknown workflow {name!r} (available: {known})")
    return load_workflow(path)


def discover_params(graph: dict[str, Any]) -> dict[str, Param]:
    """Name the usual inputs of a graph that declares nothing.

    The text encoder feeding the sampler's `positive` is `prompt`, the one feeding `negative` is
    `negative_prompt`; the sampler's seed/steps/cfg/sampler_name/scheduler/denoise keep their names; the latent
    (or the single image source with width and height) gives width/height/batch_size; LoadImage nodes give
    `image`, `image2`, ...; CheckpointLoaderSimple gives `checkpoint`.
    """
    found: dict[str, Param] = {}

    def add(name: str, node_id: str, input_name: str, **kw: Any) -> None:
        value = graph[node_id]["inputs"].get(input_name)
        if name not in found and input_name in graph[node_id]["inputs"] and not _is_link(value):
            kind = kw.pop("kind", _kind_of(value))
            found[name] = Param(name, node_id, input_name, kind, default=value, **kw)

    samplers = [n for n in _sorted_ids(graph) if {"positive", "negative"} <= set(graph[n]["inputs"])]
    size_node = None
    if samplers:
        s = samplers[0]
        inputs = graph[s]["inputs"]
        for role, name in (("positive", "prompt"), ("negative", "negative_prompt")):
            text_node = _text_source(graph, inputs.get(role))
            if text_node:
                input_name = next(i for i in TEXT_INPUTS if isinstance(graph[text_node]["inputs"].get(i), str))
                add(name, text_node, input_name, kind="string", multiline=True)
        seed_input = "seed" if "seed" in inputs else "noise_seed"
        add("seed", s, seed_input, kind="seed", minimum=0, maximum=SEED_MAX)
        for name in SAMPLER_SETTINGS:
            add(name, s, name, **({"kind": "float"} if name in ("cfg", "denoise") else {}))
        if _is_link(inputs.get("latent_image")):
            size_node = str(inputs["latent_image"][0])
    if size_node is None or "width" not in graph[size_node]["inputs"]:
        sized = [n for n in _sorted_ids(graph)
                 if {"width", "height"} <= set(graph[n]["inputs"]) and graph[n]["class_type"] not in IMAGE_LOADERS]
        size_node = sized[0] if len(sized) == 1 else None
    if size_node:
        for name in ("width", "height", "batch_size"):
            add(name, size_node, name)
    loaders = [n for n in _sorted_ids(graph) if graph[n]["class_type"] in IMAGE_LOADERS]
    for i, node_id in enumerate(loaders):
        add("image" if i == 0 else f"image{i + 1}", node_id, "image", kind="image")
    ckpt = [n for n in _sorted_ids(graph) if graph[n]["class_type"] == "CheckpointLoaderSimple"]
    if ckpt:
        add("checkpoint", ckpt[0], "ckpt_name")
    return found


def resolve_params(workflow: Workflow, values: dict[str, Any], rng: random.Random | None = None
                   ) -> dict[str, Any]:
    """Validate and convert user values; returns {key: value} with `seed` resolved to an int.

    Raises InputError with one Problem per bad parameter (the caller adds the row and file).
    """
    rng = rng or random.Random()
    problems: list[Problem] = []
    resolved = {}
    for key, raw in values.items():
        try:
            param = workflow.param_for(key)
            resolved[key] = coerce(param, raw)
        except InputError as exc:
            problems.extend(exc.problems)
    seed = workflow.params.get("seed")
    if seed is not None and resolved.get("seed") in (None, "random"):
        resolved["seed"] = rng.randint(0, SEED_MAX)
    for p in workflow.params.values():
        if p.required and p.name not in resolved:
            problems.append(Problem("missing: this workflow requires it", parameter=p.name, code="required"))
    if problems:
        raise InputError("invalid parameters", problems)
    return resolved


def patch(workflow: Workflow, resolved: dict[str, Any]) -> dict[str, Any]:
    """Apply already-resolved values to a copy of the graph. Each node and its inputs are copied; link lists
    and `_meta` stay shared with the template, which is safe because only input values are ever replaced
    (a deep copy was 90% of the time of a 10,000-row intake)."""
    pruned = {n for p in workflow.params.values() if p.prune and p.name not in resolved for n in p.prune}
    graph = {nid: {**node, "inputs": {k: v for k, v in node["inputs"].items()
                                      if not (_is_link(v) and str(v[0]) in pruned)}}
             for nid, node in workflow.graph.items() if nid not in pruned}
    for key, value in resolved.items():
        p = workflow.param_for(key)
        graph[p.node_id]["inputs"][p.input_name] = value
    return graph


def build_graph(workflow: Workflow, values: dict[str, Any], rng: random.Random | None = None
                ) -> tuple[dict[str, Any], dict[str, Any]]:
    resolved = resolve_params(workflow, values, rng)
    return resolved, patch(workflow, resolved)


def coerce(param: Param, raw: Any) -> Any:
    """Convert one value to the type its input takes; InputError carries one Problem naming the parameter."""
    def refuse(reason: str, code: str = "invalid") -> InputError:
        return InputError(reason, [Problem(reason, parameter=param.name, target=param.target, code=code)])

    if param.kind == "seed" and (raw is None or str(raw).strip().lower() in ("", "random")):
        return "random"
    if isinstance(raw, (dict, list, tuple)):
        raise refuse(f"expected text, a number, true/false or null, got {show(raw)}", "wrong_type")
    if isinstance(raw, str):
        if "\x00" in raw:
            raise refuse("contains a NUL character (\\x00); remove it", "nul")
        raw = raw.strip() if param.kind not in ("string",) else raw
    try:
        value: Any
        if param.kind in ("int", "seed", "number"):
            if isinstance(raw, bool):
                raise ValueError
            value = _number(raw, integer=param.kind != "number")
        elif param.kind == "float":
            if isinstance(raw, bool):
                raise ValueError
            value = float(raw) if not isinstance(raw, str) or len(raw) <= 400 else float("nan")
            if not math.isfinite(value):
                raise refuse(f"expected a finite number, got {show(raw)}")
        elif param.kind == "bool":
            text = str(raw).strip().lower()
            if text not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            value = text in ("true", "1", "yes")
        else:
            if not isinstance(raw, str):
                raise ValueError
            value = raw
    except (TypeError, ValueError, OverflowError):
        expected = {"seed": "an integer or 'random'", "int": "an integer", "float": "a number",
                    "number": "a number", "bool": "true or false"}.get(param.kind, "text")
        raise refuse(f"expected {expected}, got {show(raw)}", "wrong_type") from None
    if isinstance(value, int) and not isinstance(value, bool) and not -INT_MAX <= value <= INT_MAX:
        raise refuse(f"{show(value)} is outside the 64-bit range ComfyUI and ComfyBatch store "
                     f"(at most {INT_MAX:,} in size)", "out_of_range")
    if param.kind == "seed" and value < 0:
        raise refuse(f"{value} is below the minimum 0", "out_of_range")
    if param.minimum is not None and value < param.minimum:
        raise refuse(f"{value} is below the minimum {param.minimum:g}", "out_of_range")
    if param.maximum is not None and value > param.maximum:
        raise refuse(f"{value} is above the maximum {param.maximum:g}", "out_of_range")
    if param.choices and value not in param.choices:
        raise refuse(f"{show(value)} is not one of " + short_list(list(param.choices)), "not_a_choice")
    return value


def _number(raw: Any, integer: bool) -> int | float:
    """An int (or, unless `integer`, a float when the value has a fraction); ValueError when not a finite
    number. Text longer than any 64-bit number is refused before Python parses it."""
    if isinstance(raw, str):
        text = raw.strip()
        if len(text) > 40:
            raise ValueError
        try:
            return int(text)
        except ValueError:
            raw = float(text)
    if isinstance(raw, int):
        return raw
    if not isinstance(raw, float) or not math.isfinite(raw):
        raise ValueError
    if raw.is_integer():
        return int(raw)
    if integer:
        raise ValueError
    return raw


def show(value: Any, limit: int = 60) -> str:
    """A user's value for a message: repr-like, clipped, so a message never grows with the input."""
    text = repr(value) if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    kind = "a list " if isinstance(value, (list, tuple)) else "an object " if isinstance(value, dict) else ""
    return kind + clip(text, limit)


def short_list(items: list[Any], limit: int = 8) -> str:
    shown = ", ".join(map(str, items[:limit]))
    return shown + (f", ... ({len(items)} in all)" if len(items) > limit else "")


def _address(graph: dict[str, Any], key: str) -> tuple[str, str]:
    def refuse(reason: str, code: str = "unknown_parameter") -> InputError:
        return InputError(reason, [Problem(reason, parameter=clip(key), code=code)])

    node_ref, dot, input_name = key.rpartition(".")
    if not dot or not node_ref or not input_name:
        raise refuse("not a named parameter of this workflow, and not of the form <node id>.<input> or "
                     "<node title>.<input>")
    if node_ref in graph:
        node_id = node_ref
    else:
        titled = [n for n, node in graph.items() if (node.get("_meta") or {}).get("title") == node_ref]
        if len(titled) != 1:
            raise refuse("no node has this id or title" if not titled else f"{len(titled)} nodes have this title")
        node_id = titled[0]
    inputs = graph[node_id]["inputs"]
    label = f"node {node_id} ({graph[node_id]['class_type']})"
    if input_name not in inputs:
        raise refuse(f"{label} has no input '{clip(input_name)}' (its inputs: {', '.join(inputs) or 'none'})",
                     "no_such_input")
    if _is_link(inputs[input_name]):
        raise refuse(f"{label} input '{input_name}' is a link from node {inputs[input_name][0]}, not a value; it "
                     "cannot be overwritten", "link")
    return node_id, input_name


def _declared_params(graph: dict[str, Any], decl: dict[str, Any], source: str) -> dict[str, Param]:
    params, problems = {}, []
    for name, spec in decl.items():
        try:
            node_id, input_name = _address(graph, str(spec.get("target", "")))
        except InputError as exc:
            problems.append(f"[params.{name}]: {exc.problems[0] if exc.problems else exc}")
            continue
        value = graph[node_id]["inputs"][input_name]
        if spec.get("type") is not None and spec.get("type") not in KINDS:
            problems.append(f"[params.{name}]: type {spec.get('type')!r} is not one of {', '.join(KINDS)}")
            continue
        choices = spec.get("choices")
        params[name] = Param(
            name, node_id, input_name, spec.get("type", "seed" if name == "seed" else _kind_of(value)),
            default=spec.get("default", value), label=spec.get("label", ""), minimum=spec.get("min"),
            maximum=spec.get("max"), choices=tuple(choices) if choices else None,
            required=bool(spec.get("required", False)), multiline=bool(spec.get("multiline", False)),
            help=spec.get("help", ""), prune=tuple(str(n) for n in spec.get("prune", ())))
        missing = [n for n in params[name].prune if n not in graph]
        if missing:
            problems.append(f"[params.{name}]: prune names missing node(s) {', '.join(missing)}")
    if problems:
        raise WorkflowError(f"{source}: parameter declarations do not match the graph", problems)
    return params


def _text_source(graph: dict[str, Any], link: Any, depth: int = 0) -> str | None:
    """Follow a conditioning link back to the node holding the prompt text (through e.g. FluxGuidance)."""
    if not _is_link(link) or depth > 4:
        return None
    node_id = str(link[0])
    inputs = graph.get(node_id, {}).get("inputs", {})
    if any(isinstance(inputs.get(i), str) for i in TEXT_INPUTS):
        return node_id
    return _text_source(graph, inputs.get("conditioning"), depth + 1)


def _is_link(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[1], int)


def _kind_of(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    return "string"


def _sorted_ids(graph: dict[str, Any]) -> list[str]:
    return sorted(graph, key=id_order)


def id_order(node_id: str) -> tuple[int, int, str]:
    """Numeric ids in numeric order, then any others ("75:12" from subgraphs) by text; never int() a string
    of arbitrary length."""
    return (0, len(node_id), node_id) if node_id.isascii() and node_id.isdigit() else (1, 0, node_id)


# Inputs of loader nodes that name a model file (CheckpointLoaderSimple, UNETLoader, CLIPLoader, DualCLIPLoader,
# VAELoader, LoraLoader, ...): model affinity keys on them.
MODEL_INPUTS = ("ckpt_name", "unet_name", "clip_name", "clip_name1", "clip_name2", "clip_name3", "vae_name",
                "lora_name", "model_name")


def loaded_models(graph: dict[str, Any]) -> list[str]:
    """The model files a graph's loader nodes load, sorted and without repeats."""
    names = {value for node in graph.values() if isinstance(node, dict)
             for key, value in (node.get("inputs") or {}).items()
             if key in MODEL_INPUTS and isinstance(value, str) and value}
    return sorted(names)
