"""CSV intake: encodings Excel produces, per-row errors, all-or-nothing enqueue."""

from __future__ import annotations

import pytest

from core import service
from core.csvin import read_csv
from core.errors import InputError
from core.store import Store
from tests.conftest import make_settings

ROWS = "prompt,seed,steps\n一只粉色的小猪在花园里,1,2\n戴帽子的猫 cat with a hat,2,3\n"


@pytest.fixture
def offline(tmp_path):
    settings = make_settings(tmp_path, [])
    store = Store(settings.db_path)
    yield settings, store
    store.close()


@pytest.mark.parametrize("encoding", ["utf-8", "utf-8-sig", "gbk", "gb18030"])
def test_chinese_prompts_survive_every_encoding(offline, encoding):
    settings, store = offline
    result = service.submit_csv(settings, store, ROWS.encode(encoding), "jobs.csv", "sd15_txt2img")
    tasks = [store.get_task(t) for t in result.task_ids]
    assert [t["params"] for t in tasks] == [{"prompt": "一只粉色的小猪在花园里", "seed": "1", "steps": "2"},
                                            {"prompt": "戴帽子的猫 cat with a hat", "seed": "2", "steps": "3"}]
    assert [t["graph"]["6"]["inputs"]["text"] for t in tasks] == ["一只粉色的小猪在花园里", "戴帽子的猫 cat with a hat"]
    assert [t["row_number"] for t in tasks] == [2, 3]
    assert store.list_tasks(text="小猪")[0]["id"] == tasks[0]["id"]


def test_bad_rows_enqueue_nothing_and_every_one_is_reported(offline):
    settings, store = offline
    data = (b"prompt,steps,width,colour,count\n"
            b"ok,2,64,,1\n"
            b"bad steps,two,64,,\n"
            b"bad width,2,-,,\n"
            b",,,red,\n"
            b"bad count,2,64,,zero\n")
    with pytest.raises(InputError) as err:
        service.submit_csv(settings, store, data, "jobs.csv", "sd15_txt2img")
    assert err.value.problems == [
        "jobs.csv row 3: parameter 'steps' (3.steps): expected an integer, got 'two'",
        "jobs.csv row 4: parameter 'width' (5.width): expected an integer, got '-'",
        "jobs.csv row 5: unknown parameter 'colour': not a named parameter of this workflow, and not of the form "
        "<node id>.<input> or <node title>.<input>",
        "jobs.csv row 6 column 'count': expected a whole number from 1 to 1000, got 'zero'"]
    assert str(err.value).startswith("4 problem(s) found; nothing was enqueued")
    assert store.counts() == {} and store.list_batches() == []


def test_count_and_batch_name_columns(offline):
    settings, store = offline
    data = b"1.color,count,batch_name\n1,2,reds\n2,,blues\n3,3,reds\n"
    result = service.submit_csv(settings, store, data, "c.csv", "empty_image")
    assert len(result.batch_ids) == 2
    names = {b["id"]: b["name"] for b in store.list_batches()}
    per_batch = {names[b]: store.count_tasks(batch_id=b) for b in result.batch_ids}
    assert per_batch == {"reds": 5, "blues": 1}


def test_fixed_seed_with_count_steps_the_seed(offline):
    settings, store = offline
    result = service.submit_rows(settings, store, "sd15_txt2img", [{"prompt": "x", "seed": "10"}], count=3)
    assert [store.get_task(t)["seed"] for t in result.task_ids] == [10, 11, 12]


def test_structure_errors_name_file_and_row():
    with pytest.raises(InputError, match="jobs.csv: the file is empty"):
        read_csv(b"", "jobs.csv")
    with pytest.raises(InputError, match="jobs.csv: no data rows below the header"):
        read_csv(b"prompt,seed\n\n", "jobs.csv")
    with pytest.raises(InputError) as err:
        read_csv(b"prompt,prompt\na,b\n", "jobs.csv")
    assert err.value.problems == ["jobs.csv row 1 column 2: duplicate column 'prompt'"]
    assert read_csv(b"prompt,seed\na,1\nc,2,e\n", "jobs.csv")[1].problems == [
        "jobs.csv row 3: 3 cells but the header has 2 columns"]
    with pytest.raises(InputError, match="cannot read the file as UTF-8 or GBK/GB18030"):
        read_csv(b"prompt\n\xff\xfe\xfd\xff", "jobs.csv")


def test_semicolon_and_tab_separated_files_are_read():
    assert [r.params for r in read_csv(b"prompt;seed\nA;1\n", "x.csv")] == [{"prompt": "A", "seed": "1"}]
    assert [r.params for r in read_csv(b"prompt\tseed\nA\t1\n", "x.csv")] == [{"prompt": "A", "seed": "1"}]


def test_missing_input_image_is_named(offline, tmp_path):
    settings, store = offline
    with pytest.raises(InputError) as err:
        service.submit_csv(settings, store, b"image\nnope.png\n", "in.csv", "invert", image_dir=tmp_path)
    assert err.value.problems == [f"in.csv row 2: parameter 'image': image file 'nope.png' not found "
                                  f"(looked in {tmp_path})"]
