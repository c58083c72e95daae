"""Sign-in through real Chromium against a real `streamlit run app.py` (issue 11): local accounts (wrong
password, lockout, sign-out, a member refused an admin action, images and the API unreachable without a
session), per-user API tokens made and revoked on the Account page, and no password or token in the log."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from playwright.sync_api import Page, expect

from core import users
from core.store import Store
from core.users import Actor
from tests.appserver import AppServer, start_app
from tests.support import make_settings, png, settle, submitted_image

pytestmark = [pytest.mark.browser, pytest.mark.slow]
expect.set_options(timeout=20_000)

ALICE_PASSWORD = "alice-pass-7Hq!"
ROOT_PASSWORD = "root-pass-Zx9%"


@pytest.fixture
def app(tmp_path) -> Iterator[AppServer]:
    users_file = tmp_path / "users.toml"
    users.save_account(users_file, "alice", users.MEMBER, ALICE_PASSWORD)
    users.save_account(users_file, "root", users.ADMIN, ROOT_PASSWORD)
    options: dict[str, Any] = {"users_file": users_file, "lockout_after": 3, "lockout_seconds": 300}
    image = submitted_image(make_settings(tmp_path, [], **options), Actor("alice", users.MEMBER), png((9, 8, 7)))
    server = start_app(tmp_path, [], **options)
    server.image = image  # type: ignore[attr-defined]
    yield server
    server.stop()


def sign_in(page: Page, app: AppServer, name: str, password: str) -> None:
    page.goto(app.url + "/signin")
    page.get_by_label("User name").fill(name)
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Sign in").click()


def type_then_click(page: Page, url: str, label: str, text: str, button: str) -> None:
    """Open a page, type into the text input labelled `label`, then click `button`."""
    page.goto(url)
    settle(page)
    page.get_by_label(label).fill(text)
    page.get_by_label(label).press("Enter")
    settle(page)
    page.get_by_role("button", name=button).click()
    settle(page)


def test_local_sign_in_gate_lockout_roles_images_and_sign_out(app, browser):
    image = app.image
    urls = [f"{app.url}/files/image/{image['id']}", f"{app.url}/files/thumb/{image['id']}",
            f"{app.api}/images/{image['id']}", f"{app.api}/batches"]
    context = browser.new_context(viewport={"width": 1300, "height": 1000})
    page = context.new_page()
    # Not signed in: every page shows only the way in; images and the API answer 401.
    for path in ("/", "/tasks", "/gallery", "/servers", "/account"):
        page.goto(app.url + path)
        settle(page)
        expect(page.get_by_text("Sign in with a ComfyBatch account")).to_be_visible()
        expect(page.get_by_text("Signed in as")).to_have_count(0)
    assert [context.request.get(u).status for u in urls] == [401] * 4

    page.get_by_text("Sign in with a ComfyBatch account").click()
    expect(page.get_by_label("Password")).to_be_visible()
    sign_in(page, app, "alice", "not her password")
    expect(page.get_by_role("alert")).to_have_text("wrong user name or password")

    sign_in(page, app, "alice", ALICE_PASSWORD)
    page.wait_for_url(app.url + "/")
    settle(page)
    expect(page.get_by_text("Signed in as alice (member)")).to_be_visible()
    assert [context.request.get(u).status for u in urls] == [200] * 4  # the session cookie opens them
    assert context.request.get(urls[0]).body() == png((9, 8, 7))

    # Tasks: the person filter starts on "mine" for a member.
    page.goto(app.url + "/tasks")
    settle(page)
    expect(page.get_by_role("combobox", name="Person")).to_have_value("alice (mine)")

    # A member is refused an admin action by the engine, with a plain sentence.
    type_then_click(page, app.url + "/servers", "URL", "127.0.0.1:9", "Add server")
    expect(page.get_by_text("alice may not add a server: only an admin may (your role is member)")).to_be_visible()

    # Sign out: the session ends on the server; the old cookie opens nothing.
    cookie = next(c["value"] for c in context.cookies() if c["name"] == "comfybatch_session")
    page.goto(app.url + "/signout")
    expect(page.get_by_label("Password")).to_be_visible()
    page.goto(app.url + "/gallery")
    settle(page)
    expect(page.get_by_text("Sign in with a ComfyBatch account")).to_be_visible()
    assert [requests.get(u, cookies={"comfybatch_session": cookie}, timeout=10).status_code for u in urls] == [401] * 4

    # Lockout: three wrong passwords for root, then even the right one waits.
    for _ in range(3):
        sign_in(page, app, "root", "guess")
    expect(page.get_by_role("alert")).to_contain_text("too many failed sign-ins for 'root': try again in")
    sign_in(page, app, "root", ROOT_PASSWORD)
    expect(page.get_by_role("alert")).to_contain_text("too many failed sign-ins for 'root'")
    context.close()
    log = stored_and_logged(app)
    assert ALICE_PASSWORD.encode() not in log and ROOT_PASSWORD.encode() not in log and cookie.encode() not in log


def test_api_tokens_are_made_once_and_revoked_on_the_account_page(app, browser):
    context = browser.new_context(viewport={"width": 1300, "height": 1000})
    page = context.new_page()
    sign_in(page, app, "alice", ALICE_PASSWORD)
    page.wait_for_url(app.url + "/")
    type_then_click(page, app.url + "/account", "Label (what the token is for)", "render script", "Create token")
    expect(page.get_by_text("Copy it now: it is not shown again.")).to_be_visible()
    token = page.get_by_test_id("stCode").inner_text().strip()
    assert re.fullmatch(r"cbt_[A-Za-z0-9_-]{40,}", token)
    headers = {"Authorization": f"Bearer {token}"}
    body = {"workflow": "empty_image", "rows": [{"1.color": 1, "1.width": 16}]}
    made = requests.post(app.api + "/batches", json=body, headers=headers, timeout=30)
    assert (made.status_code, made.json()["batches"][0]["submitted_by"]) == (201, "alice")
    refused = requests.post(app.api + "/queue/pause", headers=headers, timeout=10)
    assert refused.status_code == 403
    expect(page.get_by_text("render script")).to_be_visible()
    page.reload()
    settle(page)
    expect(page.get_by_test_id("stCode")).to_have_count(0)  # shown once
    page.get_by_role("button", name="Revoke").click()
    settle(page)
    expect(page.get_by_text("revoked: it no longer works")).to_be_visible()
    assert requests.get(app.api + "/batches", headers=headers, timeout=10).status_code == 401
    context.close()
    assert token.encode() not in stored_and_logged(app)


def stored_and_logged(app: AppServer) -> bytes:
    """Every byte of the app's database (checkpointed), its WAL, its log files and its console output."""
    store = Store(app.settings.db_path)
    try:
        store.db.execute("PRAGMA wal_checkpoint(FULL)")
    finally:
        store.close()
    stored = b"".join(p.read_bytes() for p in app.settings.db_path.parent.glob(app.settings.db_path.name + "*"))
    return stored + app.log.read_bytes() + b"".join(p.read_bytes() for p in app.settings.log_dir.glob("*"))
