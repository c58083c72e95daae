"""Fleet scheduling against two real ComfyUI servers on loopback: fair share between a 2,000-task batch and a
3-task one, pausing a batch and the whole queue (across a scheduler restart), and draining a server."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from core import service
from core.models import IN_FLIGHT
from core.scheduler import Scheduler
from core.store import Store
from tests.support import make_settings, submit_rows, wait_until

BLUR = {"1.width": 512, "1.height": 512}


@pytest.fixture(scope="module")
def second_comfy(comfy_factory: Any) -> Any:
    return comfy_factory()


@pytest.fixture
def fleet(comfy: Any, second_comfy: Any, tmp_path: Any) -> Iterator[tuple[Any, Store, list[Scheduler]]]:
    """Settings for both real servers (2 prompts in flight each), their store, and the schedulers a test starts
    (stopped at the end)."""
    settings = make_settings(tmp_path, [comfy.url, second_comfy.url], in_flight=2)
    store = Store(settings.db_path)
    schedulers: list[Scheduler] = []
    yield settings, store, schedulers
    for sched in schedulers:
        sched.stop()
    store.close()


def start(settings: Any, store: Store, schedulers: list[Scheduler]) -> Scheduler:
    sched = Scheduler(settings, store)
    sched.start()
    schedulers.append(sched)
    return sched


def batch_in_flight(store: Store, batch_id: int) -> int:
    return sum(store.counts(batch_id).get(s, 0) for s in IN_FLIGHT)


def submitted_events(store: Store, after_id: int = 0) -> list[dict[str, Any]]:
    return [e for e in store.events(after_id=after_id, limit=100_000) if e["status"] == "submitted"]


def test_fair_share_a_three_task_batch_starts_within_the_bound_behind_two_thousand(fleet):
    settings, store, schedulers = fleet
    big = submit_rows(settings, store, "empty_image", [{"1.color": i, "1.width": 8, "1.height": 8}
                                                        for i in range(2000)]).batch_ids[0]
    start(settings, store, schedulers)
    wait_until(lambda: store.counts(big).get("succeeded", 0) >= 20, 120, message="the big batch running")
    small = submit_rows(settings, store, "empty_image", [{"1.color": c} for c in (1, 2, 3)]).batch_ids[0]
    wait_until(lambda: store.counts(small) == {"succeeded": 3}, 120, message="the small batch done")
    service.cancel_batch(store, big)
    wait_until(lambda: batch_in_flight(store, big) == 0, 60, message="the big batch stopped")
    # From the moment the small batch is in the queue (its tasks' `queued` events, written with the batch).
    arrived = min(e["id"] for e in store.events(limit=1_000_000) if e["batch_id"] == small)
    after = submitted_events(store, arrived)
    last_small = max(e["id"] for e in after if e["batch_id"] == small)
    big_meanwhile = [e for e in after if e["batch_id"] == big and e["id"] < last_small]
    servers_x_in_flight = len(settings.comfyui_urls) * settings.in_flight
    assert len(big_meanwhile) <= servers_x_in_flight + 3, len(big_meanwhile)
    assert store.counts(small) == {"succeeded": 3}


def test_pause_a_batch_and_the_queue_on_real_servers_and_across_a_restart(fleet):
    settings, store, schedulers = fleet
    a = submit_rows(settings, store, "slow_blur", [{**BLUR, "1.color": i} for i in range(10)]).batch_ids[0]
    first = start(settings, store, schedulers)
    wait_until(lambda: store.counts(a).get("running", 0) >= 1, 120, message="batch A running")
    service.pause_batch(store, a)
    # What is on a server finishes; nothing more of A starts.
    wait_until(lambda: batch_in_flight(store, a) == 0, 120, message="A's in-flight tasks finished")
    done_a = store.counts(a).get("succeeded", 0)
    assert 1 <= done_a <= 4 and store.counts(a) == {"queued": 10 - done_a, "succeeded": done_a}
    b = submit_rows(settings, store, "empty_image", [{"1.color": c} for c in (1, 2, 3)]).batch_ids[0]
    wait_until(lambda: store.counts(b) == {"succeeded": 3}, 120, message="batch B done")
    assert store.counts(a) == {"queued": 10 - done_a, "succeeded": done_a}  # passed over although older

    first.stop()  # a restart: the pause is in the database
    service.pause_queue(store)
    c = submit_rows(settings, store, "empty_image", [{"1.color": 7}]).batch_ids[0]
    second = start(settings, store, schedulers)
    wait_until(lambda: second.is_leader and len(second.workers) == 2
               and all(w.healthy and w.health_published for w in second.workers.values()), 60,
               message="the new scheduler feeding both servers")
    published = {s["url"]: s["health_at"] for s in store.servers()}
    # Two health snapshots later every worker has been through its claim step more than once.
    wait_until(lambda: all(s["health_at"] > published[s["url"]] for s in store.servers()), 30,
               message="another round of every worker")
    assert (store.counts(c), store.counts(a)) == ({"queued": 1}, {"queued": 10 - done_a, "succeeded": done_a})
    service.resume_queue(store)
    wait_until(lambda: store.counts(c) == {"succeeded": 1}, 60, message="C done after the queue resumed")
    assert store.counts(a) == {"queued": 10 - done_a, "succeeded": done_a}  # still paused itself
    service.resume_batch(store, a)
    wait_until(lambda: store.counts(a) == {"succeeded": 10}, 180, message="A resumed where it stopped")
    assert all(store.get_task(t)["attempts"] == 1 for t in store.task_ids(batch_id=a))


def test_drain_a_real_server_finishes_its_work_and_the_rest_goes_elsewhere(fleet):
    settings, store, schedulers = fleet
    one, two = settings.comfyui_urls
    batch = submit_rows(settings, store, "slow_blur", [{**BLUR, "1.color": i} for i in range(12)]).batch_ids[0]
    start(settings, store, schedulers)
    wait_until(lambda: any(t["status"] == "running" for t in store.in_flight_tasks(one)), 120,
               message="a task running on the first server")
    assert service.drain_server(store, one)["state"] == "draining"
    wait_until(lambda: service.server_state(store, one)["state"] == "drained", 120, message="drained")
    mark = store.events(limit=1_000_000)[-1]["id"]
    wait_until(lambda: store.counts(batch) == {"succeeded": 12}, 240, message="the batch done")
    later = submitted_events(store, mark)
    assert later and {e["detail"] for e in later} == {two}
    state = service.server_state(store, one)
    assert (state["state"], state["in_flight"], state["quarantined_until"]) == ("drained", 0, None)
