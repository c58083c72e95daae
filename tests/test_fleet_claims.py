"""Fleet scheduling decisions in the claim, stepped through the real store (no ComfyUI needed for the order):
fair share between batches at equal priority, priority over fairness, run next, pause of a batch and of the
whole queue (kept across a reopen), draining servers."""

from __future__ import annotations

import itertools

import pytest

from core.store import Store

SERVERS = ("http://gpu-1:8188", "http://gpu-2:8188")
IN_FLIGHT = 2
PROMPT_IDS = (f"p-{n}" for n in itertools.count())


@pytest.fixture
def db(tmp_path):
    store = Store(tmp_path / "t.db")
    yield store
    store.close()


def add(store: Store, n: int, priority: int = 0, name: str = "b") -> tuple[int, list[int]]:
    return store.create_batch(name, "wf", [{"params": {}, "graph": {}}] * n, priority=priority)


def claim(store: Store, server: str = SERVERS[0], policy: str = "fair") -> int | None:
    task = store.claim_next_task(server, next(PROMPT_IDS), policy)
    return None if task is None else task["batch_id"]


def finish_one(store: Store, server: str) -> None:
    task_id = store.db.execute("SELECT MIN(id) FROM tasks WHERE server = ? AND status = 'submitted'",
                               (server,)).fetchone()[0]
    assert store.complete_task(task_id, [])


def big_batch_starts_before_small_batch_done(db: Store, policy: str) -> int:
    """The issue's scenario on a fleet of 2 servers x 2 in flight: a 2,000-task batch is running, a 3-task
    batch arrives at the same priority; servers then finish one task at a time, in turn, and each fills its
    freed slot. Returns how many big-batch tasks started after the small batch arrived and before its 3rd
    task started."""
    big, _ = add(db, 2000, name="big")
    for server in SERVERS:
        for _ in range(IN_FLIGHT):
            assert claim(db, server, policy) == big
    small, _ = add(db, 3, name="small")
    big_starts = small_starts = 0
    turn = 0
    while small_starts < 3:
        server = SERVERS[turn % len(SERVERS)]
        turn += 1
        finish_one(db, server)
        batch = claim(db, server, policy)
        big_starts += batch == big
        small_starts += batch == small
    return big_starts


def test_fair_share_starts_a_small_batch_within_the_bound_of_the_issue(db):
    big_starts = big_batch_starts_before_small_batch_done(db, "fair")
    assert big_starts == 2  # round robin: small, big, small, big, small
    assert big_starts <= len(SERVERS) * IN_FLIGHT + 3


def test_fifo_makes_the_small_batch_wait_for_the_big_one(tmp_path):
    store = Store(tmp_path / "fifo.db")
    assert big_batch_starts_before_small_batch_done(store, "fifo") == 2000 - len(SERVERS) * IN_FLIGHT
    store.close()


def test_fair_share_alternates_between_three_batches_in_turn(db):
    a, _ = add(db, 4, name="a")
    b, _ = add(db, 2, name="b")
    c, _ = add(db, 3, name="c")
    order = [claim(db) for _ in range(10)]
    assert order == [a, b, c, a, b, c, a, c, a, None]


def test_priority_wins_over_fairness(db):
    low, _ = add(db, 3, name="low")
    assert claim(db) == low
    high, _ = add(db, 2, priority=5, name="high")
    assert [claim(db) for _ in range(5)] == [high, high, low, low, None]


def test_run_next_goes_ahead_of_everything_at_its_priority_and_the_latest_mark_first(db):
    a, _ = add(db, 3, name="a")
    b, _ = add(db, 2, name="b")
    c, _ = add(db, 2, name="c")
    urgent, _ = add(db, 1, priority=9, name="urgent")
    db.set_run_next(b)
    db.set_run_next(c)
    assert [claim(db) for _ in range(9)] == [urgent, c, c, b, b, a, a, a, None]


def test_a_paused_batch_is_skipped_and_resumes_where_it_stopped(db, tmp_path):
    a, a_tasks = add(db, 3, name="a")
    b, _ = add(db, 2, name="b")
    assert claim(db) == a
    db.set_batch_paused(a, True)
    assert [claim(db) for _ in range(3)] == [b, b, None]
    reopened = Store(tmp_path / "t.db")  # kept in the database: a restarted worker sees it too
    assert (reopened.get_batch(a)["paused"], claim(reopened)) == (1, None)
    reopened.set_batch_paused(a, False)
    task = reopened.claim_next_task(SERVERS[0], "p-resumed")
    assert task is not None and task["id"] == a_tasks[1]
    reopened.close()


def test_a_paused_queue_claims_nothing_until_resumed_even_after_a_reopen(db, tmp_path):
    a, _ = add(db, 2, name="a")
    db.set_queue_paused(True)
    assert (db.queue_paused(), claim(db), claim(db, SERVERS[1])) == (True, None, None)
    reopened = Store(tmp_path / "t.db")
    assert (reopened.queue_paused(), claim(reopened)) == (True, None)
    reopened.set_queue_paused(False)
    assert (reopened.queue_paused(), claim(reopened), db.counts()) == (False, a, {"queued": 1, "submitted": 1})
    reopened.close()


# -- model affinity ---------------------------------------------------------------------------------
def add_models(store: Store, n: int, models: list[str], name: str) -> int:
    return store.create_batch(name, "wf", [{"params": {}, "graph": {}, "models": models}] * n)[0]


def test_loader_models_are_read_from_the_graph():
    from core.workflows import loaded_models

    graph = {"4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "b.safetensors"}},
             "5": {"class_type": "LoraLoader", "inputs": {"lora_name": "style.safetensors", "model": ["4", 0]}},
             "6": {"class_type": "DualCLIPLoader", "inputs": {"clip_name1": "t5.safetensors",
                                                               "clip_name2": "clip_l.safetensors"}},
             "7": {"class_type": "VAELoader", "inputs": {"vae_name": "ae.safetensors"}},
             "8": {"class_type": "UNETLoader", "inputs": {"unet_name": "flux.safetensors"}},
             "9": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "b.safetensors"}}}
    assert loaded_models(graph) == ["ae.safetensors", "b.safetensors", "clip_l.safetensors", "flux.safetensors",
                                    "style.safetensors", "t5.safetensors"]


def test_affinity_keeps_each_server_on_its_model_while_both_batches_progress(db):
    db.sync_servers(SERVERS, lambda: "c")
    x = add_models(db, 6, ["x.safetensors"], "x")
    y = add_models(db, 6, ["y.safetensors"], "y")
    one, two = SERVERS
    order = []
    for _ in range(6):
        for server in (one, two):
            task = db.claim_next_task(server, next(PROMPT_IDS), "fair", affinity_patience=16)
            order.append((server, task["batch_id"]))
    assert order == [(one, x), (two, y)] * 6  # one load per (server, model)
    assert [s["models"] for s in db.servers()] == ["x.safetensors", "y.safetensors"]


def test_without_affinity_servers_alternate_models_with_the_batches(db):
    db.sync_servers(SERVERS, lambda: "c")
    x = add_models(db, 4, ["x.safetensors"], "x")
    y = add_models(db, 4, ["y.safetensors"], "y")
    one = SERVERS[0]
    assert [db.claim_next_task(one, next(PROMPT_IDS), "fair")["batch_id"] for _ in range(4)] == [x, y, x, y]


def test_fairness_wins_once_a_batch_has_waited_the_patience(db):
    db.sync_servers(SERVERS, lambda: "c")
    x = add_models(db, 10, ["x.safetensors"], "x")
    one = SERVERS[0]
    assert db.claim_next_task(one, next(PROMPT_IDS), "fair", 3)["batch_id"] == x
    y = add_models(db, 10, ["y.safetensors"], "y")
    # The server has x loaded: y is passed over until it has waited 3 claims, then goes, and the server (now
    # with y loaded) keeps y until x has waited 3 claims: never more than the patience between turns.
    order = [db.claim_next_task(one, next(PROMPT_IDS), "fair", 3)["batch_id"] for _ in range(9)]
    assert order == [x, x, y, y, y, x, x, x, y]


def test_fair_share_is_between_people_first_then_between_a_persons_batches(db):
    alice = [db.create_batch(f"alice-{i}", "wf", [{"params": {}, "graph": {}}] * 4, submitted_by="alice")[0]
             for i in range(5)]
    (bob, _) = db.create_batch("bob", "wf", [{"params": {}, "graph": {}}] * 4, submitted_by="bob")
    order = [claim(db) for _ in range(10)]
    # One person's five batches do not get five turns to another person's one: the two people alternate, and
    # alice's turns go round her batches.
    assert order == [alice[0], bob, alice[1], bob, alice[2], bob, alice[3], bob, alice[4], alice[0]]
