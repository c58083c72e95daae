"""Webhooks without ComfyUI: the URL check of the one intake path (API, CLI), and the deliverer against a real
local receiver: signature, one frozen body for every retry, the backoff schedule, giving up, and the secret
kept out of the database. The restart between attempts is in test_compat_api.py (a real `streamlit run`)."""

from __future__ import annotations

import hashlib
import hmac
import json
import time

import pytest

from core import service, webhooks
from core.config import Settings
from core.errors import ConfigError, InputError
from core.intake import MAX_WEBHOOK_URL
from tests.support import Receiver, cli_env, run_cli, submit_rows

SECRET = "whsec-4e1f-unit"


def finished_batch(settings: Settings, store, url: str) -> int:
    """A batch with a webhook, made final by cancelling its queued tasks (no server needed)."""
    result = submit_rows(settings, store, "empty_image", [{"1.color": 1}, {"1.color": 2}], webhook=url, name="hooked")
    service.cancel(store, result.task_ids)
    return result.batch_ids[0]


@pytest.mark.parametrize("url, code", [("ftp://example.com/x", "invalid"), ("http://", "invalid"),
                                       ("http://exa mple.com/", "invalid"), ("", "invalid"), (42, "invalid"),
                                       ("https://example.com/" + "a" * MAX_WEBHOOK_URL, "too_large")])
def test_a_bad_webhook_url_is_refused_with_a_named_problem(offline_engine, url, code):
    settings, store = offline_engine
    with pytest.raises(InputError) as caught:
        submit_rows(settings, store, "empty_image", [{"1.color": 1}], webhook=url)
    assert [(p.field, p.code) for p in caught.value.problems] == [("webhook", code)]
    assert len(str(caught.value.problems[0])) < 300  # the message does not grow with the input
    assert store.count_tasks() == 0


def test_the_cli_takes_a_webhook_and_refuses_a_bad_one(tmp_path):
    env = cli_env(tmp_path, [])
    bad = run_cli(env, "submit", "--workflow", "empty_image", "--param", "1.color=5", "--webhook", "file:///etc/x")
    assert bad.returncode == 2 and "webhook" in bad.stderr and "http:// or https://" in bad.stderr
    good = run_cli(env, "submit", "--workflow", "empty_image", "--param", "1.color=5", "--webhook",
                   "https://hooks.example/batch")
    assert good.returncode == 0, good.stderr
    status = run_cli(env, "status", good.stdout.split()[0]).stdout
    assert "webhook    waiting after 0 call(s)" in status


def test_a_delivery_is_signed_retried_with_backoff_and_recorded(offline_engine):
    settings, store = offline_engine
    settings = settings.with_overrides(webhook_secret=SECRET, webhook_backoff=("5", "7"),
                                       public_url="https://batch.example")
    with Receiver([503, 500, 204]) as receiver:
        batch_id = finished_batch(settings, store, receiver.url)
        deliverer = webhooks.Deliverer(settings, store)
        assert deliverer.deliver_next() is False  # waiting: nothing is due before the batch is promoted
        assert deliverer.promote() == 1
        assert deliverer.deliver_next() is True
        assert deliverer.deliver_next(time.time() + 4) is False  # the first retry waits 5 s
        assert deliverer.deliver_next(time.time() + 5.5) is True
        assert deliverer.deliver_next(time.time() + 6) is False  # the second waits 7 s
        assert deliverer.deliver_next(time.time() + 7.5) is True
        assert deliverer.deliver_next(time.time() + 10**6) is False  # delivered: never called again
    bodies = {body for _, body in receiver.calls}
    assert len(receiver.calls) == 3 and len(bodies) == 1  # the same bytes every time
    body = bodies.pop()
    for headers, _ in receiver.calls:
        expected = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
        assert hmac.compare_digest(headers["x-comfybatch-signature-256"], expected)
        assert headers["x-comfybatch-event"] == "batch.finished" and headers["content-type"] == "application/json"
    assert [h["x-comfybatch-attempt"] for h, _ in receiver.calls] == ["1", "2", "3"]
    data = json.loads(body)
    assert data["batch"]["id"] == batch_id and data["batch"]["name"] == "hooked"
    assert data["counts"] == {"cancelled": 2} and data["total"] == 2
    assert data["results_url"] == f"https://batch.example/api/v1/batches/{batch_id}/results.csv"
    status = service.batch_summary(store, batch_id)["webhook"]
    assert status["state"] == "delivered" and status["attempts"] == 3
    assert [c["status_code"] for c in status["calls"]] == [503, 500, 204]
    assert status["calls"][0]["error"] == "the receiver answered HTTP 503"
    database = settings.db_path.read_bytes() + settings.db_path.with_name("tasks.db-wal").read_bytes()
    assert SECRET.encode() not in database
    assert SECRET not in repr(settings)


def test_a_delivery_gives_up_when_the_schedule_is_spent(offline_engine):
    settings, store = offline_engine
    settings = settings.with_overrides(webhook_backoff=("1",))
    with Receiver([500]) as receiver:
        batch_id = finished_batch(settings, store, receiver.url)
        deliverer = webhooks.Deliverer(settings, store)
        deliverer.promote()
        assert deliverer.deliver_next() and deliverer.deliver_next(time.time() + 2)
        assert deliverer.deliver_next(time.time() + 10**6) is False
    assert "x-comfybatch-signature-256" not in receiver.calls[0][0]  # no secret set: sent unsigned
    status = service.batch_summary(store, batch_id)["webhook"]
    assert (status["state"], status["attempts"]) == ("failed", 2)
    assert status["last_error"] == "the receiver answered HTTP 500"


def test_an_unreachable_receiver_is_an_attempt_with_an_error(offline_engine):
    settings, store = offline_engine
    with Receiver([200]) as receiver:
        url = receiver.url  # closed on leaving: nothing listens there any more
    batch_id = finished_batch(settings, store, url)
    deliverer = webhooks.Deliverer(settings, store)
    deliverer.promote()
    assert deliverer.deliver_next()
    status = service.batch_summary(store, batch_id)["webhook"]
    assert status["state"] == "pending" and status["calls"][0]["status_code"] is None
    assert status["calls"][0]["error"].startswith("ConnectionError")


def test_a_bad_backoff_schedule_is_a_config_error():
    with pytest.raises(ConfigError, match="COMFYBATCH_WEBHOOK_BACKOFF"):
        Settings.load(env={"COMFYBATCH_WEBHOOK_BACKOFF": "10,soon"})
    assert Settings.load(env={}).webhook_delays[0] == 10 and sum(Settings.load(env={}).webhook_delays) >= 3600


def test_the_batch_line_shows_the_webhook(offline_engine):
    import ui_format

    settings, store = offline_engine
    with Receiver([500]) as receiver:
        batch_id = finished_batch(settings.with_overrides(webhook_backoff=("600",)), store, receiver.url)
        assert ui_format.webhook_text(service.batch_summary(store, batch_id)) == \
            " - webhook waits for the batch to finish"
        deliverer = webhooks.Deliverer(settings.with_overrides(webhook_backoff=("600",)), store)
        deliverer.promote()
        deliverer.deliver_next()
    line = ui_format.batch_status_line(service.batch_summary(store, batch_id))
    assert " - webhook retrying (1 call; the receiver answered HTTP 500), next try in " in line


def test_a_cli_worker_makes_the_first_call_before_it_exits_idle(tmp_path):
    env = cli_env(tmp_path, ["http://127.0.0.1:9"])  # a worker needs a server; nothing runs on it here
    with Receiver([204]) as receiver:
        submitted = run_cli(env, "submit", "--workflow", "empty_image", "--param", "1.color=5", "--webhook",
                            receiver.url)
        batch_id = submitted.stdout.split()[0]
        assert run_cli(env, "cancel", "--batch", batch_id).returncode == 0
        worker = run_cli(env, "worker", "--until-idle", "--quiet", timeout=120)
        assert worker.returncode == 0, worker.stderr
        assert len(receiver.calls) == 1 and json.loads(receiver.calls[0][1])["batch"]["id"] == int(batch_id)
    assert "webhook    delivered after 1 call(s)" in run_cli(env, "status", batch_id).stdout
