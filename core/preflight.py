"""Preflight: check a workflow's graphs against each server's `/object_info` before anything is enqueued.

Reports, per server, node classes it lacks (with the custom node pack they likely come from), model files it
does not have, and values outside ComfyUI's own bounds or choices. `/object_info` (about 0.5 MB) is cached per
server for a few minutes; an unreachable server is remembered briefly so a submit does not wait on it again.
"""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import Any

from core.comfy import ComfyClient
from core.errors import ComfyBatchError
from core.workflows import Workflow, _is_link, short_list

INFO_TTL = 300.0
FAILURE_TTL = 10.0
PREFLIGHT_TIMEOUT = 3.0
MAX_PROBLEMS = 20
# Where commonly used custom nodes come from (templates can add more under [requires.custom_nodes]).
KNOWN_PACKS = {
    "RembgByBiRefNet": "lldacing/ComfyUI_BiRefNet_ll",
    "LoadRembgByBiRefNetModel": "lldacing/ComfyUI_BiRefNet_ll",
    "UnetLoaderGGUF": "city96/ComfyUI-GGUF",
    "DualCLIPLoaderGGUF": "city96/ComfyUI-GGUF",
    "IPAdapterModelLoader": "cubiq/ComfyUI_IPAdapter_plus",
    "ControlNetPreprocessor": "Fannovel16/comfyui_controlnet_aux",
}

_cache: dict[str, tuple[float, dict[str, Any] | None, str]] = {}
_cache_lock = threading.Lock()


@dataclass
class ServerReport:
    url: str
    reachable: bool
    problems: list[str] = field(default_factory=list)
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.reachable and not self.problems


def object_info(url: str, refresh: bool = False) -> dict[str, Any] | None:
    """The server's node catalogue, cached; None when it cannot be reached (also cached, briefly)."""
    now = time.monotonic()
    with _cache_lock:
        hit = _cache.get(url)
    if hit and not refresh and now - hit[0] < (INFO_TTL if hit[1] is not None else FAILURE_TTL):
        return hit[1]
    client = ComfyClient(url, f"comfybatch-preflight-{uuid.uuid4().hex[:8]}", PREFLIGHT_TIMEOUT, 30.0)
    info: dict[str, Any] | None
    try:
        info, error = client.object_info(), ""
    except ComfyBatchError as exc:
        info, error = None, str(exc)
    finally:
        client.close()
    with _cache_lock:
        _cache[url] = (now, info, error)
    return info


def last_error(url: str) -> str:
    with _cache_lock:
        return _cache.get(url, (0, None, ""))[2]


def input_spec(info: dict[str, Any], class_type: str, input_name: str) -> tuple[Any, dict[str, Any]] | None:
    node = info.get(class_type) or {}
    for group in ("required", "optional"):
        spec = ((node.get("input") or {}).get(group) or {}).get(input_name)
        if isinstance(spec, list) and spec:
            opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            kind = spec[0]
            if kind == "COMBO":  # newer servers: ["COMBO", {"options": [...]}]
                kind = list(opts.get("options") or [])
            return kind, opts
    return None


def check_graph(workflow: Workflow, graph: dict[str, Any], info: dict[str, Any],
                uploaded: set[str] = frozenset()) -> list[str]:  # type: ignore[assignment]
    """Problems running `graph` on a server with this `info`; `uploaded` are node.input targets whose files
    are uploaded at submission (their current value need not exist on the server)."""
    problems: list[str] = []
    for node_id, node in graph.items():
        class_type = node["class_type"]
        where = f"node {node_id} ({class_type})"
        if class_type not in info:
            pack = workflow.custom_nodes.get(class_type) or KNOWN_PACKS.get(class_type)
            problems.append(f"{where}: node type {class_type} is not installed"
                            + (f" (custom node pack {pack})" if pack else ""))
            continue
        for name, value in node["inputs"].items():
            if _is_link(value) or f"{node_id}.{name}" in uploaded:
                continue
            spec = input_spec(info, class_type, name)
            if spec is None:
                continue
            kind, opts = spec
            if isinstance(kind, list):
                if value not in kind and not opts.get("image_upload"):  # an empty list: nothing installed
                    if "loader" in class_type.lower() or name.endswith("_name") or name in ("model", "ckpt_name"):
                        problems.append(f"{where} input '{name}': model file '{value}' is missing on the server")
                    else:
                        problems.append(f"{where} input '{name}': '{value}' is not one of the server's choices "
                                        f"({short_list(kind)})")
            elif kind in ("INT", "FLOAT") and isinstance(value, (int, float)) and not isinstance(value, bool):
                if "min" in opts and value < opts["min"]:
                    problems.append(f"{where} input '{name}': {value} is below ComfyUI's minimum {opts['min']}")
                if "max" in opts and value > opts["max"]:
                    problems.append(f"{where} input '{name}': {value} is above ComfyUI's maximum {opts['max']}")
    return problems


def check_servers(urls: list[str], workflow: Workflow, graphs: list[dict[str, Any]],
                  uploaded: set[str] = frozenset()) -> list[ServerReport]:  # type: ignore[assignment]
    """One report per server; distinct problems across all graphs, at most MAX_PROBLEMS each."""
    reports = []
    for url in urls:
        info = object_info(url)
        if info is None:
            reports.append(ServerReport(url, False, error=last_error(url)))
            continue
        seen: dict[str, None] = {}
        for graph in graphs:
            for problem in check_graph(workflow, graph, info, uploaded):
                seen.setdefault(problem)
            if len(seen) >= MAX_PROBLEMS:
                break
        reports.append(ServerReport(url, True, list(seen)[:MAX_PROBLEMS]))
    return reports


def with_server_choices(workflow: Workflow, infos: list[dict[str, Any]]) -> Workflow:
    """The workflow with each list-valued parameter (checkpoint, LoRA, sampler, ...) offering what the servers
    really have (the union over `infos`), so forms and CSV validation match reality."""
    if not infos:
        return workflow
    params = {}
    for name, p in workflow.params.items():
        node = workflow.graph.get(p.node_id, {})
        union: list[Any] = []
        for info in infos:
            spec = input_spec(info, node.get("class_type", ""), p.input_name)
            if spec and isinstance(spec[0], list) and not spec[1].get("image_upload"):
                union.extend(c for c in spec[0] if c not in union)
        params[name] = replace(p, choices=tuple(union)) if union and p.kind != "image" else p
    return replace(workflow, params=params)
