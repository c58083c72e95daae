"""Generate: one prompt through a workflow's form; the batch's progress and images appear below as they land."""

from __future__ import annotations

from typing import Any

import streamlit as st

import ui
from core import queries, service, sweeps, workflows
from core.errors import InputError
from core.workflows import Param, Workflow

ASPECTS = {"1:1": (1, 1), "4:3": (4, 3), "3:4": (3, 4), "3:2": (3, 2), "2:3": (2, 3), "16:9": (16, 9),
           "9:16": (9, 16)}
FIRST = ("prompt", "negative_prompt")
SIZE = ("width", "height")
LATER = ("seed", "steps", "cfg", "sampler_name", "scheduler", "denoise")


def aspect_size(aspect: str, long_side: int, multiple: int = 8) -> tuple[int, int]:
    a, b = ASPECTS[aspect]
    long_side = max(multiple, int(long_side) // multiple * multiple)
    short = max(multiple, round(long_side * min(a, b) / max(a, b) / multiple) * multiple)
    return (long_side, short) if a >= b else (short, long_side)


def declared_sizes(wf: Workflow) -> dict[str, tuple[int, int]]:
    """Named sizes a workflow's TOML declares (`[presets.size]`), e.g. {"3:4": (512, 680)}."""
    sizes = (wf.presets or {}).get("size") or {}
    return {str(name): (int(pair[0]), int(pair[1])) for name, pair in sizes.items()}


def key(wf: Workflow, name: str) -> str:
    return f"gen_{wf.name}_{name}"


def apply_prefill(wf_names: list[str]) -> None:
    """'Re-run with changes' from the Gallery: set the widgets' state before they are drawn."""
    prefill = st.session_state.pop("generate_prefill", None)
    if not prefill or prefill["workflow"] not in wf_names:
        return
    st.session_state["gen_workflow"] = prefill["workflow"]
    st.session_state["generate_prefill_pending"] = prefill


def fill_widgets(wf: Workflow) -> None:
    prefill = st.session_state.pop("generate_prefill_pending", None)
    if not prefill or prefill["workflow"] != wf.name:
        return
    extra = []
    for name, value in prefill["values"].items():
        param = wf.params.get(name)
        if param is None:
            extra.append(f"{name}={value}")
        elif param.kind == "seed":
            st.session_state[key(wf, "seed_mode")] = "Fixed"
            st.session_state[key(wf, "seed")] = int(value)
        elif param.kind == "image":
            continue  # uploads cannot be prefilled; the form says so
        elif param.kind in ("int", "float"):
            st.session_state[key(wf, name)] = float(value) if is_float(param) else int(value)
        elif param.kind == "bool":
            st.session_state[key(wf, name)] = bool(value)
        else:
            st.session_state[key(wf, name)] = str(value)
    st.session_state[key(wf, "extra")] = "\n".join(extra)
    st.session_state[key(wf, "aspect")] = "Custom"
    uploads = " Input images are not kept with a task: upload them again." if any(
        p.kind == "image" for p in wf.params.values()) else ""
    st.info(f"Prefilled from task {prefill.get('task_id')}: change what you like and generate.{uploads}")


FLOATY = ("cfg", "denoise")


def default_state(k: str, value: Any) -> None:
    """Give a widget its first value through session state (so a prefill never clashes with `value=`)."""
    if k not in st.session_state:
        st.session_state[k] = value


def is_float(p: Param) -> bool:
    return p.kind == "float" or isinstance(p.default, float) or p.name in FLOATY


def number_widget(wf: Workflow, p: Param, label: str, **kw: Any) -> Any:
    cast = float if is_float(p) else int
    bounds: dict[str, Any] = {k: cast(v) for k, v in (("min_value", p.minimum), ("max_value", p.maximum))
                              if v is not None}
    default = p.default if isinstance(p.default, (int, float)) and not isinstance(p.default, bool) else 0
    default_state(key(wf, p.name), cast(default))
    step = kw.pop("step", None) or (0.5 if cast is float else 1)
    return st.number_input(label, key=key(wf, p.name), step=cast(step), **bounds, **kw)


def param_widget(wf: Workflow, p: Param) -> Any:
    label = p.label or p.name.replace("_", " ").capitalize()
    k = key(wf, p.name)
    tip = getattr(p, "help", "") or None
    options = list(p.choices) if p.choices else None  # declared, or what the servers offer
    if options:
        default_state(k, p.default if p.default is not None else options[0])
        if st.session_state[k] not in options:
            # Keep the template's (or a prefilled) value even if no server lists it: the preflight says why.
            options = [st.session_state[k], *options]
        return st.selectbox(label, options, key=k, help=tip)
    if p.kind == "bool":
        default_state(k, bool(p.default))
        return st.checkbox(label, key=k, help=tip)
    if p.kind in ("int", "float"):
        return number_widget(wf, p, label, step=8 if p.name in SIZE else None, help=tip)
    default_state(k, "" if p.default is None else str(p.default))
    if p.multiline or p.name in FIRST:
        return st.text_area(label, key=k, height=120 if p.name == "prompt" else 80, help=tip)
    return st.text_input(label, key=k, help=tip)


def on_aspect(wf: Workflow) -> None:
    aspect = st.session_state[key(wf, "aspect")]
    if aspect == "Custom":
        return
    sizes = declared_sizes(wf)
    if aspect in sizes:
        size = sizes[aspect]
    else:
        w, h = st.session_state.get(key(wf, "width"), 512), st.session_state.get(key(wf, "height"), 512)
        size = aspect_size(aspect, max(w, h))
    st.session_state[key(wf, "width")], st.session_state[key(wf, "height")] = size


def parse_extra(text: str) -> dict[str, str]:
    values, problems = {}, []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        name, sep, value = line.partition("=")
        if not sep or not name.strip():
            problems.append(f"other inputs line {n}: expected <node id>.<input>=value, got {line.strip()!r}")
            continue
        try:
            listed = sweeps.parse_cell(value)
        except InputError as exc:
            problems.append(f"other inputs line {n}: {exc.summary}")
            continue
        values[name.strip()] = value.strip() if listed is None else listed
    if problems:
        raise InputError("the other inputs need fixing", problems)
    return values


def form(wf: Workflow) -> tuple[dict[str, Any], dict[str, bytes], int]:
    """Draw the workflow's form; returns (row, uploaded images, count)."""
    params = wf.params
    row: dict[str, Any] = {}
    images: dict[str, bytes] = {}
    for name in FIRST:
        if name in params:
            row[name] = param_widget(wf, params[name])
    for p in params.values():
        if p.kind == "image":
            upload = st.file_uploader(f"{p.label or p.name} (input image{', required' if p.required else ''})",
                                      type=["png", "jpg", "jpeg", "webp"], key=key(wf, p.name),
                                      help=getattr(p, "help", "") or None)
            if upload is not None:
                images[upload.name] = upload.getvalue()
                row[p.name] = upload.name
                st.image(upload.getvalue(), caption=upload.name, width=240)
            elif getattr(p, "prune", ()):
                st.caption("No upload: this part of the workflow is left out.")
            elif not p.required:
                st.caption(f"No upload: the workflow's own image ({p.default}) is used.")
    if all(s in params for s in SIZE):
        c1, c2, c3 = st.columns(3)
        with c1:
            st.selectbox("Aspect", ["Custom", *(declared_sizes(wf) or ASPECTS)], key=key(wf, "aspect"),
                         on_change=on_aspect, args=(wf,),
                         format_func=lambda a: a if a not in declared_sizes(wf) else
                         "{} ({}×{})".format(a, *declared_sizes(wf)[a]))
        with c2:
            row["width"] = param_widget(wf, params["width"])
        with c3:
            row["height"] = param_widget(wf, params["height"])
    if "seed" in params:
        c1, c2 = st.columns([1, 2])
        with c1:
            mode = st.radio("Seed", ["Random", "Fixed"], key=key(wf, "seed_mode"), horizontal=True)
        with c2:
            seed = number_widget(wf, params["seed"], "Seed value", disabled=mode == "Random")
        row["seed"] = "random" if mode == "Random" else int(seed)
    rest = [p for n, p in params.items() if n not in (*FIRST, *SIZE, "seed") and p.kind != "image"]
    rest.sort(key=lambda p: (LATER.index(p.name) if p.name in LATER else len(LATER), p.name))
    cols = st.columns(3)
    for i, p in enumerate(rest):
        with cols[i % 3]:
            row[p.name] = param_widget(wf, p)
    c1, c2, c3 = st.columns(3)
    with c1:
        count = st.number_input("Images per prompt", min_value=1, max_value=ctx.settings.max_count, value=1, step=1,
                                key=key(wf, "count"))
    with c2:
        st.text_input("Batch name (optional)", key="gen_batch_name")
    with c3:
        st.number_input("Priority (higher runs first)", value=0, step=1, key="gen_priority")
    with st.expander("Other inputs (any node input by address)", expanded=bool(st.session_state.get(key(wf, "extra")))):
        extra = st.text_area("One per line: `<node id>.<input>=value`, e.g. `1.color=16711680`",
                             key=key(wf, "extra"))
    row.update(parse_extra(extra))
    lists = sweep_panel(wf, [p.name for p in params.values() if p.kind != "image"])
    for name in lists:
        row.pop(name, None)  # the lists go last, in the order chosen: the first is the grid's rows
    row.update(lists)
    return row, images, int(count)


def sweep_panel(wf: Workflow, names: list[str]) -> dict[str, list[str]]:
    """Lists of values for any parameters: the batch is every combination (X/Y/Z). One value per line."""
    chosen_key, open_key = key(wf, "sweep"), key(wf, "sweep_open")
    # `expanded` is fixed once per workflow and session: Streamlit mounts an expander anew when it changes, and
    # turning it on with the first choice closed the list being chosen from (the browser keeps it open meanwhile).
    if open_key not in st.session_state:
        st.session_state[open_key] = bool(st.session_state.get(chosen_key))
    with st.expander("Sweep: give parameters several values (every combination is one task)",
                     expanded=st.session_state[open_key]):
        chosen = st.multiselect("Parameters to vary", names, key=chosen_key, max_selections=sweeps.MAX_AXES)
        lists: dict[str, list[str]] = {}
        cols = st.columns(max(1, min(3, len(chosen))))
        for i, name in enumerate(chosen):
            with cols[i % len(cols)]:
                text = st.text_area(f"Values of {name}, one per line", key=key(wf, f"sweep_{name}"), height=120)
            values = [line.strip() for line in text.splitlines() if line.strip()]
            if values:
                lists[name] = values
        st.caption('Any other input too: under "Other inputs" write e.g. `3.cfg=[4, 7, 10]` (a JSON list). '
                   "The same in a CSV cell. A random seed is drawn once for the whole sweep.")
    return lists


def live_panel(batch_id: int, done_at_draw: bool) -> None:
    """Progress and images of the last batch submitted here, redrawn every 2 s until it is finished."""
    @st.fragment(run_every=None if done_at_draw else 2.0)
    def panel() -> None:
        ctx = ui.context()
        with ui.guard():
            summary = service.batch_summary(ctx.store, batch_id)
            done = summary["done"] >= summary["total"]
            if done != done_at_draw:
                st.rerun()  # switch the fragment's timer on or off
            ui.batch_progress(summary)
            for task in queries.batch_errors(ctx.store, batch_id):
                st.error(f"Task {task['id']} failed: {task['error']}")
            images = queries.batch_images(ctx.store, batch_id)
            cols = st.columns(4)
            for i, img in enumerate(images):
                with cols[i % 4]:
                    ui.image_tile(ctx, img["id"], f"task {img['task_id']} · {img['width']}×{img['height']}", height=220)
    panel()


def add_workflow_panel() -> None:
    """Upload an API-format JSON to add a workflow; it is available at once with its discovered parameters."""
    with st.expander("Add a workflow (ComfyUI API-format JSON)"):
        upload = st.file_uploader("Workflow file", type=["json"], key="gen_add_workflow")
        if upload is not None and st.button("Add this workflow", key="gen_add_workflow_button"):
            try:
                added = service.add_workflow(ctx.settings, upload.name, upload.getvalue(), actor=ctx.actor)
            except InputError as exc:
                ui.show_error(exc)
                return
            st.session_state["gen_workflow_next"] = added.name
            ui.flash("generate", "success", f"Added workflow '{added.name}' with parameters: "
                     + (", ".join(added.params) or "none found; address inputs as <node id>.<input>"))
            st.rerun()


ctx = ui.setup("Generate")
with ui.guard():
    if "gen_workflow_next" in st.session_state:
        st.session_state["gen_workflow"] = st.session_state.pop("gen_workflow_next")
    found, broken = workflows.list_workflows(ctx.settings.workflows_dir)
    for problem in broken:
        st.warning(f"Workflow file skipped: {problem}")
    names = [w.name for w in found]
    if not names:
        st.info(f"No workflows in {ctx.settings.workflows_dir}: put API-format JSON files there "
                "(in ComfyUI: Workflow > Export (API)), or add one here.")
        add_workflow_panel()
        st.stop()
    local = service.local_backends(ctx.settings)
    if local["mode"] == "demo":  # the first run: say plainly what these images are, start on the demo's workflow
        st.info(local["note"], icon=":material/science:")
        if local["demo_workflow"] in names:
            default_state("gen_workflow", local["demo_workflow"])
    apply_prefill(names)
    by_name = {w.name: w for w in found}
    name = st.selectbox("Workflow", names, key="gen_workflow",
                        format_func=lambda n: f"{by_name[n].title or n} ({n})")
    wf, _ = service.workflow_for_servers(ctx.settings, ctx.store, name)  # list inputs offer the servers' choices
    if wf.description:
        st.caption(wf.description)
    fill_widgets(wf)
    ui.show_flash("generate")
    try:
        row, images, count = form(wf)
        form_error = None
    except InputError as exc:
        row, images, count, form_error = {}, {}, 1, exc
    if form_error:
        ui.show_error(form_error)
    submission = service.Submission(
        wf.name, [service.Row(row)], count=count, name=st.session_state.get("gen_batch_name") or None,
        priority=int(st.session_state.get("gen_priority") or 0), images=images, source="page")
    tasks = service.task_count(submission)  # from the list lengths: nothing is expanded to count
    too_many = tasks > ctx.settings.max_tasks
    if tasks > 1 or too_many:
        shape = " x ".join(f"{len(v)} {k}" for k, v in sweeps.axes(row).items())
        st.text(f"This makes {tasks:,} task(s)" + (f" ({shape}" + (f" x {count} each" if count > 1 else "") + ")"
                                                   if shape else ""))
    if too_many:
        st.warning(f"{tasks:,} tasks is more than the {ctx.settings.max_tasks:,} one submission may make "
                   "(COMFYBATCH_MAX_TASKS): use fewer values.")
    if st.button("Generate", type="primary", disabled=form_error is not None or too_many):
        result = service.submit(ctx.settings, ctx.store, submission, actor=ctx.actor)
        st.session_state["gen_batch_id"] = result.batch_ids[0]
        st.success(f"Batch {result.batch_ids[0]}: {len(result.task_ids)} task(s) queued.")
        st.session_state["gen_batch_sweep"] = bool(sweeps.axes(row))

batch_id = st.session_state.get("gen_batch_id")
if batch_id is not None:
    st.subheader(f"Batch {batch_id}")
    if st.session_state.get("gen_batch_sweep"):
        st.session_state["grid_batch"] = batch_id
        st.page_link(ui.page_path("grid"), label="See it as a comparison grid", icon=":material/grid_on:")
    with ui.guard():
        first = service.batch_summary(ctx.store, batch_id)
        live_panel(batch_id, first["done"] >= first["total"])

with ui.guard():
    add_workflow_panel()
