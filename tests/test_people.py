"""People on the work (issue 11): roles checked in the front door, who submitted each batch, who acted on
someone else's batch, the per-user cap, local accounts (Argon2 hashes, lockout, sessions that end on sign-out),
per-user API tokens through the real HTTP API, and no secret in the database, the log or an error."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from core import accounts, service, users
from core.errors import Forbidden, InputError, SignInFailed
from core.store import Store
from core.users import ADMIN, CLI, MEMBER, Actor
from tests.support import cli_env, make_settings, run_cli, serve_api

ALICE, BOB, ROOT_ADMIN = Actor("alice", MEMBER), Actor("bob", MEMBER), Actor("root", ADMIN)
PASSWORDS = {"alice": "correct horse battery staple", "root": "admin-secret-Ω"}
ROW = {"1.color": 255, "1.width": 16}


@pytest.fixture
def people(tmp_path) -> Iterator[tuple[Any, Store]]:
    users_file = tmp_path / "users.toml"
    users.save_account(users_file, "alice", MEMBER, PASSWORDS["alice"])
    users.save_account(users_file, "root", ADMIN, PASSWORDS["root"])
    settings = make_settings(tmp_path, [], users_file=users_file, lockout_after=3, lockout_seconds=60)
    store = Store(settings.db_path)
    yield settings, store
    store.close()


def submit(settings: Any, store: Store, actor: Actor, count: int = 1) -> int:
    sub = service.Submission("empty_image", [service.Row(dict(ROW))], count=count, source="test")
    return service.submit(settings, store, sub, actor=actor).batch_ids[0]


def test_batches_record_who_submitted_and_members_act_only_on_their_own(people):
    settings, store = people
    mine, theirs = submit(settings, store, ALICE), submit(settings, store, BOB)
    assert [store.get_batch(b)["submitted_by"] for b in (mine, theirs)] == ["alice", "bob"]
    assert service.pause_batch(store, mine, actor=ALICE)["paused"] is True
    with pytest.raises(Forbidden) as refused:
        service.cancel_batch(store, theirs, actor=ALICE)
    assert str(refused.value) == (f"alice may not cancel batch {theirs}: it was submitted by bob, and a member acts "
                                  "only on their own batches")
    task = store.task_ids(batch_id=theirs)[0]
    for action in (lambda: service.cancel(store, [task], actor=ALICE),
                   lambda: service.retry(store, [task], actor=ALICE),
                   lambda: service.set_priority(store, [task], 5, actor=ALICE),
                   lambda: service.pause_batch(store, theirs, actor=ALICE),
                   lambda: service.run_batch_next(store, theirs, actor=ALICE)):
        with pytest.raises(Forbidden):
            action()
    assert store.counts(theirs) == {"queued": 1} and store.get_batch(theirs)["paused"] == 0


@pytest.mark.parametrize(("action", "what"), [
    (lambda s: service.pause_queue(s, actor=ALICE), "pause the whole queue"),
    (lambda s: service.resume_queue(s, actor=ALICE), "resume the whole queue"),
    (lambda s: service.add_server(s, "http://127.0.0.1:9", actor=ALICE), "add a server"),
    (lambda s: service.drain_server(s, "http://127.0.0.1:9", actor=ALICE), "drain a server"),
    (lambda s: service.remove_server(s, "http://127.0.0.1:9", actor=ALICE), "remove a server"),
])
def test_admin_actions_are_refused_to_a_member_in_the_front_door(people, action, what):
    _, store = people
    with pytest.raises(Forbidden) as refused:
        action(store)
    assert str(refused.value) == f"alice may not {what}: only an admin may (your role is member)"
    assert store.queue_paused() is False and store.servers() == []


def test_an_admin_acting_on_someone_elses_batch_is_recorded_in_its_task_events(people):
    settings, store = people
    batch = submit(settings, store, ALICE, count=2)
    service.pause_batch(store, batch, actor=ROOT_ADMIN)
    service.cancel_batch(store, batch, actor=ROOT_ADMIN)
    service.pause_batch(store, submit(settings, store, ROOT_ADMIN), actor=ROOT_ADMIN)  # their own: no trace
    events = [(e["task_id"], e["status"], e["detail"], e["actor"]) for e in store.events()
              if e["batch_id"] == batch and e["actor"]]
    first, second = store.task_ids(batch_id=batch)
    assert events == [(first, "queued", "batch paused by root", "root"),
                      (second, "queued", "batch paused by root", "root"),
                      (first, "cancelled", "cancel requested by root", "root"),
                      (second, "cancelled", "cancel requested by root", "root")]
    assert [e for e in store.events() if e["batch_id"] != batch and e["actor"]] == []


def test_the_per_user_cap_refuses_a_submission_over_it_with_a_clear_message(people):
    settings, store = people
    capped = settings.with_overrides(user_max_queued=3)
    submit(capped, store, ALICE, count=2)
    with pytest.raises(InputError) as refused:
        submit(capped, store, ALICE, count=2)
    assert refused.value.summary == ("alice has 2 task(s) queued; 2 more would pass the per-user cap of 3 "
                                     "(COMFYBATCH_USER_MAX_QUEUED); nothing was enqueued")
    assert [str(p) for p in refused.value.problems] == [
        "field 'count': at most 1 more task(s) now; wait for queued work to start or cancel some"]
    submit(capped, store, BOB, count=3)  # the cap is per person
    assert store.count_tasks() == 5


def test_local_sign_in_wrong_password_lockout_and_sign_out(people, caplog):
    settings, store = people
    caplog.set_level(logging.DEBUG)
    with pytest.raises(SignInFailed, match="^wrong user name or password$"):
        accounts.sign_in(settings, store, "alice", "wrong")
    with pytest.raises(SignInFailed, match="^wrong user name or password$"):
        accounts.sign_in(settings, store, "nobody", "wrong")  # an unknown name reads the same
    session = accounts.sign_in(settings, store, "alice", PASSWORDS["alice"])
    assert accounts.session_actor(settings, store, session) == ALICE
    accounts.sign_out(store, session)
    assert accounts.session_actor(settings, store, session) is None  # ended on sign-out, not just forgotten by a cookie
    for _ in range(2):
        with pytest.raises(SignInFailed):
            accounts.sign_in(settings, store, "alice", "guess")
    with pytest.raises(SignInFailed) as locked:
        accounts.sign_in(settings, store, "alice", "guess")
    assert str(locked.value).startswith("wrong user name or password; too many failed sign-ins for 'alice': try again "
                                        "in 60 s") and locked.value.retry_after > 50
    with pytest.raises(SignInFailed, match="too many failed sign-ins"):
        accounts.sign_in(settings, store, "alice", PASSWORDS["alice"])  # even the right password waits it out
    root = accounts.sign_in(settings, store, "root", PASSWORDS["root"])  # the lockout is per name
    assert accounts.session_actor(settings, store, root) == ROOT_ADMIN
    users.save_account(settings.users_file, "root", MEMBER, PASSWORDS["root"])  # demoted: open sessions follow
    assert accounts.session_actor(settings, store, root) == Actor("root", MEMBER)
    secrets_seen = [PASSWORDS["alice"], PASSWORDS["root"], session, root]
    assert_nowhere(secrets_seen, store, settings, caplog.text + str(locked.value))


def assert_nowhere(secrets: list[str], store: Store, settings: Any, *texts: str) -> None:
    """None of `secrets` is in the database file (and its WAL), the users file, or the given texts."""
    store.db.execute("PRAGMA wal_checkpoint(FULL)")
    blobs = [p.read_bytes() for p in settings.db_path.parent.glob(settings.db_path.name + "*")]
    blobs.append(settings.users_file.read_bytes())
    blobs.extend(t.encode() for t in texts)
    for secret in secrets:
        assert not any(secret.encode() in blob for blob in blobs), "a secret was stored or shown"


def test_the_users_file_holds_argon2_hashes_only_and_the_cli_writes_it(tmp_path, people):
    settings, _ = people
    text = settings.users_file.read_text(encoding="utf-8")
    assert text.count("$argon2id$") == 2 and PASSWORDS["alice"] not in text
    env = {**cli_env(tmp_path, []), "COMFYBATCH_USERS_FILE": str(tmp_path / "team.toml")}
    made = run_cli_input(env, "s3cret pass\n", "users", "add", "carol", "--role", "admin")
    assert (made.returncode, made.stdout.strip()) == (0, f"carol (admin) saved in {tmp_path / 'team.toml'}")
    account = users.load_accounts(tmp_path / "team.toml")["carol"]
    assert (account.role, users.verify_password(account.password_hash, "s3cret pass")) == (ADMIN, True)
    assert "s3cret" not in (tmp_path / "team.toml").read_text(encoding="utf-8") + made.stdout + made.stderr
    bad = run_cli_input(env, "x\n", "users", "add", "no spaces", "--role", "member")
    assert (bad.returncode, bad.stderr.splitlines()[0]) == (2, "error: not a valid user name")


def run_cli_input(env: dict[str, str], stdin: str, *args: str) -> Any:
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "core", *args], env=env, cwd=env["WORK"], input=stdin,
                          capture_output=True, text=True, timeout=60)


def test_cli_acts_as_the_local_admin_cli(tmp_path):
    env = cli_env(tmp_path, [])
    done = run_cli(env, "submit", "--workflow", "empty_image", "--param", "1.color=1", "--param", "1.width=16")
    assert done.returncode == 0, done.stderr
    store = Store(tmp_path / "tasks.db")
    try:
        assert store.get_batch(1)["submitted_by"] == CLI.name
    finally:
        store.close()


# -- API tokens per user, through the HTTP API -------------------------------------------------------------
@pytest.fixture
def api_for(people) -> Iterator[tuple[str, Any, Store]]:
    from api.app import Api

    settings, store = people
    settings = settings.with_overrides(api_tokens=("env-admin-token",))
    api = Api()
    api.bind(settings, store)
    with serve_api(api) as base:
        yield base, settings, store


def test_per_user_tokens_act_as_their_owner_and_stop_when_revoked(api_for, caplog):
    base, settings, store = api_for
    caplog.set_level(logging.DEBUG)
    alice_id, alice_token = accounts.create_token(store, ALICE, "laptop")
    _, root_token = accounts.create_token(store, ROOT_ADMIN, "")
    body = {"workflow": "empty_image", "rows": [ROW]}
    with requests.Session() as web:
        def as_(token: str) -> dict[str, str]:
            return {"Authorization": f"Bearer {token}"}

        made = web.post(f"{base}/batches", json=body, headers=as_(alice_token), timeout=30)
        assert made.status_code == 201, made.text
        batch = made.json()["batches"][0]
        assert batch["submitted_by"] == "alice"
        assert web.get(batch["url"], headers=as_("env-admin-token"), timeout=10).json()["submitted_by"] == "alice"
        env_made = web.post(f"{base}/batches", json=body, headers=as_("env-admin-token"), timeout=30).json()
        assert env_made["batches"][0]["submitted_by"] == "api"  # COMFYBATCH_API_TOKENS: admin tokens, kept working
        refused = web.post(f"{base}/queue/pause", headers=as_(alice_token), timeout=10)
        assert (refused.status_code, refused.json()["error"]) == (
            403, "alice may not pause the whole queue: only an admin may (your role is member)")
        other = env_made["batch_ids"][0]
        refused = web.post(f"{base}/batches/{other}/cancel", headers=as_(alice_token), timeout=10)
        assert refused.status_code == 403 and "submitted by api" in refused.json()["error"]
        assert web.post(f"{base}/queue/pause", headers=as_(root_token), timeout=10).json()["paused"] is True
        accounts.revoke_token(store, ALICE, alice_id)
        gone = web.get(f"{base}/batches", headers=as_(alice_token), timeout=10)
        assert gone.status_code == 401 and gone.json()["error"].startswith("the API token is not valid")
        assert web.get(f"{base}/batches", timeout=10).status_code == 401  # no credential at all
        texts = caplog.text + gone.text + refused.text
    assert [(t["user"], t["label"], t["revoked_by"]) for t in accounts.tokens(store, ROOT_ADMIN)] == [
        ("root", "", None), ("alice", "laptop", "alice")]
    assert [t["user"] for t in accounts.tokens(store, ALICE)] == ["alice"]
    with pytest.raises(Forbidden):
        accounts.revoke_token(store, ALICE, 2)  # root's
    assert_nowhere([alice_token, root_token, "env-admin-token"], store, settings, texts)


def test_the_session_cookie_opens_the_api_and_image_routes_and_nothing_else_does(api_for):
    from api.auth import SignInRoutes
    from api.files import FileServer
    from tests.support import finish_next_task, png

    _, settings, store = api_for
    submit(settings, store, ALICE)
    image = finish_next_task(settings, store, png((1, 2, 3)))
    files, sign_in = FileServer(), SignInRoutes()
    files.bind(settings, store)
    sign_in.bind(settings, store)
    from api.app import Api

    api = Api()
    api.bind(settings, store)
    with serve_api(api, [*files.routes, *sign_in.routes]) as base, requests.Session() as web:
        root = base.removesuffix("/api/v1")
        urls = [f"{root}/files/image/{image['id']}", f"{root}/files/thumb/{image['id']}",
                f"{base}/images/{image['id']}", f"{base}/batches"]
        assert [web.get(u, timeout=10).status_code for u in urls] == [401] * 4
        wrong = web.post(f"{root}/signin", data={"name": "alice", "password": "nope"}, timeout=30,
                         allow_redirects=False)
        assert wrong.status_code == 401 and "wrong user name or password" in wrong.text
        assert "nope" not in wrong.text
        ok = web.post(f"{root}/signin", data={"name": "alice", "password": PASSWORDS["alice"]}, timeout=30,
                      allow_redirects=False)
        assert (ok.status_code, ok.headers["location"]) == (303, "/")
        cookie = ok.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=lax" in cookie
        assert [web.get(u, timeout=10).status_code for u in urls] == [200] * 4
        assert web.get(urls[0], timeout=10).content == png((1, 2, 3))
        # The cookie opens reads only: a change needs a token (no cross-site request forgery from another port).
        assert web.post(f"{base}/queue/pause", timeout=10).status_code == 401 and not store.queue_paused()
        web.get(f"{root}/signout", timeout=10)
        assert [requests.get(u, cookies={accounts.SESSION_COOKIE: ok.cookies[accounts.SESSION_COOKIE]},
                             timeout=10).status_code for u in urls] == [401] * 4  # the old cookie is dead


def test_every_face_passes_the_acting_user_to_state_changing_front_door_calls():
    """The front door checks roles only if the faces say who acts: every call from the pages, the API and the
    CLI to a state-changing service function names `actor=`."""
    import ast

    from tests.support import ROOT

    changing = {"submit", "cancel", "retry", "set_priority", "cancel_batch", "retry_batch", "set_batch_priority",
                "pause_batch", "resume_batch", "run_batch_next", "pause_queue", "resume_queue", "drain_server",
                "undrain_server", "add_server", "set_server_enabled", "remove_server", "add_workflow", "sync_storage"}
    faces = [*(ROOT / "pages").glob("*.py"), *(ROOT / "api").glob("*.py"), ROOT / "core" / "__main__.py"]
    seen, missing = 0, []
    for path in faces:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Call):
                continue
            names = [n.attr for n in ast.walk(node.func) if isinstance(n, ast.Attribute)
                     and isinstance(n.value, ast.Name) and n.value.id == "service" and n.attr in changing]
            if names or (isinstance(node.func, ast.Name) and node.func.id == "action"):
                seen += 1
                if not any(k.arg == "actor" for k in node.keywords):
                    missing.append(f"{path.name}:{node.lineno}")
    assert seen >= 25 and missing == []


# -- COMFYBATCH_PRIVATE_BATCHES: a member sees only their own batches -----------------------------------------
def test_private_batches_limit_a_members_reads_in_the_engine_and_admins_see_all(people):
    from core import overview, queries, visibility
    from core.errors import NotFound
    from tests.support import finish_next_task, png

    settings, store = people
    mine, theirs = submit(settings, store, ALICE), submit(settings, store, BOB)
    images = {finish_next_task(settings, store, png((1, 2, 3)))["batch_id"] for _ in range(2)}
    assert images == {mine, theirs}
    bob_task, bob_image = store.task_ids(batch_id=theirs)[0], store.images_for_batch(theirs)[0]["id"]

    def seen(s: Any, actor: Actor) -> tuple[Any, ...]:
        person = visibility.person_for(s, actor)
        return (queries.count_tasks(store, queries.TaskFilter(person=person)),
                queries.count_images(store, queries.ImageFilter(person=person)),
                [b["id"] for b in visibility.list_batches(store, 10, person)],
                queries.summary_batch_ids(store, person=person), overview.active_batch_ids(store, person=person))

    private = settings.with_overrides(private_batches=True)
    assert seen(private, ALICE) == (1, 1, [mine], [mine], [])
    assert seen(private, ROOT_ADMIN) == seen(settings, ALICE) == (2, 2, [theirs, mine], [theirs, mine], [])
    # Asking for someone else's work by name matches nothing when private; off, it is theirs.
    assert queries.count_tasks(store, queries.TaskFilter(person=visibility.person_for(private, ALICE, "bob"))) == 0
    assert visibility.person_for(settings, ALICE, "bob") == "bob"
    for read, message in ((lambda s, a: visibility.visible_batch(s, store, a, theirs), f"batch {theirs}"),
                          (lambda s, a: visibility.visible_task(s, store, a, bob_task), f"task {bob_task}"),
                          (lambda s, a: visibility.check_image(s, store, a, bob_image), f"image {bob_image}")):
        with pytest.raises(NotFound) as hidden:
            read(private, ALICE)
        assert str(hidden.value) == f"{message} does not exist"  # the same answer as an id that never existed
        read(private, ROOT_ADMIN)
        read(settings, ALICE)
    assert visibility.visible_batch(private, store, ALICE, mine)["submitted_by"] == "alice"
    # The gallery's "picked" exports and count: only the member's own picks when private.
    service.set_picked(store, [i["id"] for b in (mine, theirs) for i in store.images_for_batch(b)], True)
    alice_only = visibility.person_for(private, ALICE)
    assert (queries.count_picked(store, None, alice_only), queries.count_picked(store)) == (1, 2)
    out = service.export_file(private, store, "csv", picked=True, person=alice_only)
    assert [line.split(",")[0] for line in out.path.read_text("utf-8-sig").splitlines()[1:]] == [
        str(store.task_ids(batch_id=mine)[0])]
    assert b"".join(service.results_csv_chunks(private, store, person=alice_only)).count(b"\n") == 2


def test_private_batches_through_the_http_api_and_the_image_routes(api_for):
    from api.app import Api
    from api.files import FileServer
    from core import access
    from tests.support import finish_next_task, png

    _, settings, store = api_for
    mine, theirs = submit(settings, store, ALICE), submit(settings, store, BOB)
    for _ in range(2):
        finish_next_task(settings, store, png((1, 2, 3)))
    bob_task, bob_image = store.task_ids(batch_id=theirs)[0], store.images_for_batch(theirs)[0]["id"]
    _, alice_token = accounts.create_token(store, ALICE, "")
    _, root_token = accounts.create_token(store, ROOT_ADMIN, "")
    from starlette.routing import Mount

    from api import compat

    api, files, old = Api(), FileServer(), compat.make()
    with serve_api(api, [*files.routes, Mount("/compat", app=old)]) as base, requests.Session() as web:
        root = base.removesuffix("/api/v1")

        def view(token: str, private: bool) -> dict[str, Any]:
            s = settings.with_overrides(private_batches=private)
            for face in (api, files, old):
                face.bind(s, store)
            auth = {"Authorization": f"Bearer {token}"}

            def get(url: str) -> Any:
                return web.get(url, headers=auth, timeout=10)

            return {
                "batches": [b["id"] for b in get(f"{base}/batches").json()["batches"]],
                "tasks": get(f"{base}/tasks").json()["total"],
                "events": {e["batch_id"] for e in get(f"{base}/events").json()["events"]},
                "compat": {int(t["task_id"]) for t in get(f"{root}/compat/tasks").json()["tasks"]},
                "by id": [get(u).status_code for u in (
                    f"{base}/batches/{theirs}", f"{base}/tasks/{bob_task}", f"{base}/tasks/{bob_task}/events",
                    f"{base}/batches/{theirs}/images", f"{base}/batches/{theirs}/results.csv",
                    f"{base}/images/{bob_image}", f"{base}/images/{bob_image}/thumbnail",
                    f"{root}/files/image/{bob_image}", f"{root}/files/thumb/{bob_image}",
                    f"{root}/compat/status/{bob_task}")],
                "own csv": get(f"{base}/batches/{mine}/results.csv").status_code,
                "acting": web.post(f"{base}/batches/{theirs}/cancel", headers=auth, timeout=10).status_code,
            }

        both = {"batches": [theirs, mine], "tasks": 2, "events": {mine, theirs}, "compat": {1, 2}, "by id": [200] * 10,
                "own csv": 200}
        assert view(alice_token, private=True) == {"batches": [mine], "tasks": 1, "events": {mine}, "compat": {1},
                                                   "by id": [404] * 10, "own csv": 200, "acting": 404}
        assert view(alice_token, private=False) == {**both, "acting": 403}
        assert view(root_token, private=True) == {**both, "acting": 200}
        missing = web.get(f"{base}/batches/{theirs}", headers={"Authorization": f"Bearer {alice_token}"},
                          timeout=10)
        assert missing.json()["error"] == f"batch {theirs} does not exist"  # (still private: bound last by root)
        # A signed link keeps working: whoever holds it was given it.
        api.bind(settings.with_overrides(private_batches=True), store)
        files.bind(settings.with_overrides(private_batches=True), store)
        assert web.get(root + access.image_url(settings, bob_image), timeout=10).status_code == 200
