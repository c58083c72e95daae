"""OIDC sign-in through Streamlit's own st.login, against a real OpenID Connect provider process on loopback
(oidc-provider-mock) and a real `streamlit run app.py`, driven in real Chromium (issue 11): the identity
provider's user lands in ComfyBatch with the role COMFYBATCH_ADMINS gives, images are reachable through the
pages' signed links and not without, and signing out ends it."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
import requests
from playwright.sync_api import Page, expect

from core.users import Actor
from tests.appserver import AppServer, start_app
from tests.comfyui_harness.server import free_port
from tests.support import make_settings, png, settle, submitted_image

pytestmark = [pytest.mark.browser, pytest.mark.slow]
expect.set_options(timeout=30_000)

COOKIE_SECRET = "oidc-cookie-secret-for-tests-4b1f"
CLIENT_SECRET = "client-secret-never-logged-93ad"


@pytest.fixture
def provider(tmp_path) -> Iterator[str]:
    """oidc-provider-mock as its own process on a free loopback port; yields its issuer URL."""
    port = free_port()
    log = open(tmp_path / "oidc.log", "wb")  # noqa: SIM115 - closed below, after the process
    proc = subprocess.Popen([sys.executable, "-m", "oidc_provider_mock", "--port", str(port), "--user",
                             "boss@example.org", "--user", "ann@example.org"], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    issuer = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if requests.get(issuer + "/.well-known/openid-configuration", timeout=1).ok:
                    break
            except requests.RequestException:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "oidc.log").read_text()
            time.sleep(0.1)
        yield issuer
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


@pytest.fixture
def app(tmp_path, provider) -> Iterator[AppServer]:
    secrets = tmp_path / "secrets.toml"
    secrets.write_text(
        "[auth]\n"
        'redirect_uri = "http://127.0.0.1:{port}/oauth2callback"\n'
        f'cookie_secret = "{COOKIE_SECRET}"\n'
        'client_id = "comfybatch"\n'
        f'client_secret = "{CLIENT_SECRET}"\n'
        f'server_metadata_url = "{provider}/.well-known/openid-configuration"\n', encoding="utf-8")
    (tmp_path / "app").mkdir()
    image = submitted_image(make_settings(tmp_path / "app", []), Actor("ann@example.org"), png((4, 5, 6)))
    server = start_app(tmp_path / "app", [], extra_args=("--secrets.files", str(secrets)),
                       extra_env={"COMFYBATCH_SECRETS_FILE": str(secrets), "AUTHLIB_INSECURE_TRANSPORT": "1"},
                       admins=("boss@example.org",))
    server.image = image  # type: ignore[attr-defined]
    yield server
    server.stop()


def oidc_sign_in(page: Page, app: AppServer, who: str) -> None:
    page.goto(app.url + "/gallery")
    settle(page)
    page.get_by_role("button", name="Sign in with your identity provider").click()
    page.get_by_role("button", name=who).click()  # the provider's form: a predefined user
    page.wait_for_url(app.url + "/**")
    settle(page)


def test_oidc_sign_in_roles_signed_image_links_and_sign_out(app, browser):
    image = app.image
    context = browser.new_context(viewport={"width": 1300, "height": 1000})
    page = context.new_page()
    page.goto(app.url + "/")
    settle(page)
    expect(page.get_by_role("button", name="Sign in with your identity provider")).to_be_visible()
    assert context.request.get(f"{app.url}/files/image/{image['id']}").status == 401

    oidc_sign_in(page, app, "ann@example.org")
    expect(page.get_by_text("Signed in as ann@example.org (member)")).to_be_visible()
    page.goto(app.url + "/gallery")
    settle(page)
    thumb = page.locator(f"img[data-image-id='{image['id']}']")
    expect(thumb).to_be_visible()
    src = thumb.get_attribute("src")
    assert src is not None and "sig=" in src
    assert context.request.get(app.url + src).status == 200  # the signed link the page rendered
    assert requests.get(f"{app.url}/files/thumb/{image['id']}", timeout=10).status_code == 401  # unsigned
    page.goto(app.url + "/tasks")
    settle(page)
    expect(page.get_by_role("combobox", name="Person")).to_have_value("ann@example.org (mine)")

    page.get_by_role("button", name="Sign out").click()
    page.get_by_role("button", name="End session").click()  # the provider's end-session form (RP-initiated)
    page.wait_for_url(app.url + "/**")
    page.goto(app.url + "/tasks")
    settle(page)
    expect(page.get_by_role("button", name="Sign in with your identity provider")).to_be_visible()

    oidc_sign_in(page, app, "boss@example.org")
    expect(page.get_by_text("Signed in as boss@example.org (admin)")).to_be_visible()
    context.close()
    log = app.log.read_text(encoding="utf-8", errors="replace")
    assert CLIENT_SECRET not in log and COOKIE_SECRET not in log
