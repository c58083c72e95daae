"""CSV intake through the one reader and the one submission path: encodings Excel produces (and refusals of the
ones that would be mojibake), per-row errors as typed problems, limits checked before anything is expanded,
all-or-nothing enqueue. No ComfyUI needed: no server configured, so nothing is preflighted."""

from __future__ import annotations

import codecs
import tracemalloc

import pytest

from core import csvin, service
from core.errors import InputError, Problem

ROWS = "prompt,seed,steps\n一只粉色的小猪在花园里,1,2\n戴帽子的猫 cat with a hat,2,3\n"
MB = 1024 * 1024


def submit_csv(settings, store, data: bytes, filename: str, workflow: str, **fields):
    return service.submit(settings, store, service.csv_submission(settings, data, filename, workflow, **fields))


def texts(exc: InputError) -> list[str]:
    return [str(p) for p in exc.problems]


def read(data: bytes, name: str = "jobs.csv", **limits) -> list:
    values = {"max_bytes": 20 * MB, "max_rows": 10_000, "max_count": 1000, **limits}
    return csvin.read_rows(data, name, **values)


@pytest.mark.parametrize("encoding", ["utf-8", "utf-8-sig", "gbk", "gb18030", "utf-16"])
def test_chinese_prompts_survive_every_encoding(offline_engine, encoding):
    settings, store = offline_engine
    result = submit_csv(settings, store, ROWS.encode(encoding), "jobs.csv", "sd15_txt2img")
    tasks = [store.get_task(t) for t in result.task_ids]
    assert [t["params"] for t in tasks] == [{"prompt": "一只粉色的小猪在花园里", "seed": "1", "steps": "2"},
                                            {"prompt": "戴帽子的猫 cat with a hat", "seed": "2", "steps": "3"}]
    assert [t["graph"]["6"]["inputs"]["text"] for t in tasks] == ["一只粉色的小猪在花园里", "戴帽子的猫 cat with a hat"]
    assert [t["row_number"] for t in tasks] == [2, 3]
    assert store.list_tasks(text="小猪")[0]["id"] == tasks[0]["id"]


@pytest.mark.parametrize(("data", "where"), [
    ("prompt\nFrançais élégant\n".encode("cp1252"), "byte 0xe7 on line 2"),
    ("prompt\n日本語のテキスト\n".encode("shift_jis"), "byte 0x93 on line 2"),
    ("prompt\nMüller straße\n".encode("cp1252"), "byte 0xfc on line 2"),
])
def test_western_and_japanese_files_are_refused_not_stored_as_mojibake(offline_engine, data, where):
    settings, store = offline_engine
    with pytest.raises(InputError) as err:
        submit_csv(settings, store, data, "jobs.csv", "sd15_txt2img")
    assert str(err.value) == (
        f"jobs.csv: cannot read the text: it is not UTF-8 ({where}) and does not read as Chinese GBK/GB18030 "
        "either (a Western Windows, Shift-JIS or Big5 file?). Accepted: UTF-8 (with or without BOM), UTF-16 with "
        "BOM, or GBK/GB18030; in Excel use File > Save As > 'CSV UTF-8 (Comma delimited)' and upload that file")
    assert store.counts() == {}


def test_a_utf8_bom_in_front_of_gbk_blames_the_encoding_not_a_column(offline_engine):
    settings, store = offline_engine
    data = codecs.BOM_UTF8 + "prompt,seed\n小猪,1\n".encode("gbk")
    with pytest.raises(InputError) as err:
        submit_csv(settings, store, data, "jobs.csv", "sd15_txt2img")
    assert err.value.summary.startswith("jobs.csv: the file starts with a UTF-8 mark but is not UTF-8 text (byte 0xd6 "
                                        "on line 2); it mixes encodings.")
    assert err.value.problems == []


def test_bad_rows_enqueue_nothing_and_every_one_is_reported_with_its_location(offline_engine):
    settings, store = offline_engine
    data = (b"prompt,steps,width,colour,count\n"
            b"ok,2,64,,1\n"
            b"bad steps,two,64,,\n"
            b"bad width,2,-,,\n"
            b",,,red,\n"
            b"bad count,2,64,,zero\n")
    with pytest.raises(InputError) as err:
        submit_csv(settings, store, data, "jobs.csv", "sd15_txt2img")
    assert texts(err.value) == [
        "jobs.csv row 3: parameter 'steps' (3.steps): expected an integer, got 'two'",
        "jobs.csv row 4: parameter 'width' (5.width): expected an integer, got '-'",
        "jobs.csv row 5: unknown parameter 'colour': not a named parameter of this workflow, and not of the form "
        "<node id>.<input> or <node title>.<input>",
        "jobs.csv row 6 column 'count': expected a whole number from 1 to 1000, got 'zero'"]
    assert [(p.row, p.column, p.parameter, p.target, p.code) for p in err.value.problems] == [
        (3, None, "steps", "3.steps", "wrong_type"), (4, None, "width", "5.width", "wrong_type"),
        (5, None, "colour", None, "unknown_parameter"), (6, "count", None, None, "out_of_range")]
    assert err.value.summary == "4 problem(s) found; nothing was enqueued"
    assert store.counts() == {} and store.list_batches() == []


def test_count_and_batch_name_columns(offline_engine):
    settings, store = offline_engine
    data = b"1.color,count,batch_name\n1,2,reds\n2,,blues\n3,3,reds\n"
    result = submit_csv(settings, store, data, "c.csv", "empty_image")
    assert len(result.batch_ids) == 2
    names = {b["id"]: b["name"] for b in store.list_batches()}
    per_batch = {names[b]: store.count_tasks(batch_id=b) for b in result.batch_ids}
    assert per_batch == {"reds": 5, "blues": 1}


def test_fixed_seed_with_count_steps_the_seed(offline_engine):
    settings, store = offline_engine
    sub = service.Submission("sd15_txt2img", [service.Row({"prompt": "x", "seed": "10"})], count=3)
    result = service.submit(settings, store, sub)
    assert [store.get_task(t)["seed"] for t in result.task_ids] == [10, 11, 12]


def test_structure_errors_name_file_and_row():
    with pytest.raises(InputError, match="jobs.csv: the file is empty"):
        read(b"")
    with pytest.raises(InputError, match="jobs.csv: no data rows below the header"):
        read(b"prompt,seed\n\n")
    with pytest.raises(InputError) as err:
        read(b"prompt,prompt,\na,b,c\n")
    assert texts(err.value) == ["jobs.csv row 1: column 2: duplicate column 'prompt'",
                                "jobs.csv row 1: column 3 has no name"]


def test_ragged_rows_are_refused_whether_a_cell_is_missing_or_extra():
    rows = read(b"prompt,seed,steps\na,1,2\nb,2\nc,3,4,extra\nd,4,5,,\n")
    assert [(r.number, [str(p) for p in r.problems]) for r in rows] == [
        (2, []),
        (3, ["jobs.csv row 3: 2 cells but the header has 3 columns; add the missing separators (empty cells are "
             "fine)"]),
        (4, ["jobs.csv row 4: 4 cells but the header has 3 columns; remove what is beyond the last column (extra)"]),
        (5, [])]  # trailing empty cells (Excel writes them) are not a problem


def test_ragged_rows_are_reported_by_the_submission_path(offline_engine):
    settings, store = offline_engine
    with pytest.raises(InputError) as err:
        submit_csv(settings, store, b"1.color,1.width\n1,8\n2\n", "r.csv", "empty_image")
    assert texts(err.value) == ["r.csv row 3: 1 cells but the header has 2 columns; add the missing separators "
                                "(empty cells are fine)"]
    assert store.counts() == {}


def test_semicolon_and_tab_separated_files_are_read():
    assert [r.params for r in read(b"prompt;seed\nA;1\n", "x.csv")] == [{"prompt": "A", "seed": "1"}]
    assert [r.params for r in read(b"prompt\tseed\nA\t1\n", "x.csv")] == [{"prompt": "A", "seed": "1"}]


def test_nul_bytes_in_cells_are_refused(offline_engine):
    settings, store = offline_engine
    with pytest.raises(InputError) as err:
        submit_csv(settings, store, b"prompt,seed\nab\x00c,1\n", "n.csv", "sd15_txt2img")
    assert texts(err.value) == ["n.csv row 2 column 'prompt': contains a NUL character (\\x00); remove it"]


def test_missing_input_image_is_named(offline_engine, tmp_path):
    settings, store = offline_engine
    with pytest.raises(InputError) as err:
        submit_csv(settings, store, b"image\nnope.png\n", "in.csv", "invert", image_dir=tmp_path)
    assert texts(err.value) == [f"in.csv row 2: parameter 'image': image file 'nope.png' not found "
                                f"(looked in {tmp_path})"]


# -- limits, checked before anything grows with the input -------------------------------------------------
def test_count_zero_negative_and_huge_are_refused_before_expanding(offline_engine):
    settings, store = offline_engine
    row = [service.Row({"1.color": "1"})]
    for count in (0, -3):
        with pytest.raises(InputError) as err:
            service.submit(settings, store, service.Submission("empty_image", row, count=count))
        assert texts(err.value) == [f"field 'count': expected a whole number from 1 to 1000, got {count}"]
    tracemalloc.start()
    with pytest.raises(InputError) as err:
        service.submit(settings, store, service.Submission("empty_image", row, count=10**9))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert texts(err.value) == [
        "field 'count': expected a whole number from 1 to 1000, got 1000000000",
        "field 'count': 1 row(s) with count 1,000,000,000 would make 1,000,000,000 tasks; at most 20,000 in one "
        "submission (COMFYBATCH_MAX_TASKS): split it"]
    assert peak < 5 * MB  # nothing was expanded
    assert store.counts() == {}


def test_total_tasks_from_count_columns_are_limited(offline_engine):
    settings, store = offline_engine
    settings = settings.with_overrides(max_tasks=100)
    data = b"1.color,count\n" + b"1,60\n" * 2
    with pytest.raises(InputError) as err:
        submit_csv(settings, store, data, "c.csv", "empty_image")
    assert texts(err.value) == ["field 'rows': 2 row(s) with count 1 would make 120 tasks; at most 100 in one "
                                "submission (COMFYBATCH_MAX_TASKS): split it"]


def test_file_size_rows_and_cell_size_limits():
    with pytest.raises(InputError) as err:
        read(b"prompt\n" + b"a\n" * 600_000, max_bytes=1 * MB)
    assert err.value.summary == ("jobs.csv: the file is 1.1 MB; at most 1 MB (COMFYBATCH_MAX_CSV_MB): split it into "
                                 "smaller files")
    with pytest.raises(InputError, match=r"jobs.csv: more than 5 rows \(COMFYBATCH_MAX_ROWS\); split the file"):
        read(b"prompt\n" + b"a\n" * 6, max_rows=5)
    assert len(read(b"prompt\n" + b"a\n" * 5, max_rows=5)) == 5
    with pytest.raises(InputError) as err:
        read(b"prompt,seed\nok,1\n" + b"x" * (1 * MB) + b",2\n")
    assert err.value.summary.startswith("jobs.csv row 3: not readable as CSV (field larger than field limit")
    assert len(str(err.value)) < 300


def test_problems_are_values_with_fields_and_one_rendering():
    p = Problem("expected an integer, got 'x'", row=3, parameter="steps", target="3.steps", file="a.csv")
    assert str(p) == "a.csv row 3: parameter 'steps' (3.steps): expected an integer, got 'x'"
    assert p.as_dict() == {"message": str(p), "reason": "expected an integer, got 'x'", "row": 3, "column": None,
                           "parameter": "steps", "target": "3.steps", "node": "3", "field": None, "file": "a.csv",
                           "server": None, "code": "invalid"}
    assert str(Problem("required", field="workflow")) == "field 'workflow': required"
    assert Problem("x", row=2).at(row=9, file="f.csv") == Problem("x", row=2, file="f.csv")
