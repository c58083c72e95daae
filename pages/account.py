"""Account: who you are, and your API tokens. A new token is shown once, here, and stored only as a hash; it acts
as you, in your role. Revoking stops it at once. An admin sees and may revoke everyone's tokens."""

import time

import streamlit as st

import ui
from core import accounts


def create_token(ctx: ui.Context) -> tuple[str, str] | None:
    token_id, token = accounts.create_token(ctx.store, ctx.actor, st.session_state.get("account_label", ""))
    st.session_state["account_new_token"] = (token_id, token)
    return None


def revoke(ctx: ui.Context, token_id: int) -> tuple[str, str]:
    accounts.revoke_token(ctx.store, ctx.actor, token_id)
    st.session_state.pop("account_new_token", None)
    return ("success", f"Token {token_id} revoked: it no longer works.")


ctx = ui.setup("Account")
with ui.guard():
    st.markdown(f"You are **{ui.md_escape(ctx.actor.name)}**, role **{ctx.actor.role}**.")
    st.subheader("API tokens")
    st.caption("Send a token as `Authorization: Bearer <token>` to the HTTP API; it acts as you, in your role. "
               "It is shown once, when made: copy it then.")
    ui.show_flash("account")
    st.text_input("Label (what the token is for)", key="account_label", max_chars=accounts.MAX_LABEL)
    st.button("Create token", type="primary", on_click=ui.safe_callback("account", create_token))
    new = st.session_state.pop("account_new_token", None)
    if new is not None:
        st.success(f"Token {new[0]} made. Copy it now: it is not shown again.")
        st.code(new[1], language=None)
    rows = accounts.tokens(ctx.store, ctx.actor)
    if not rows:
        st.caption("No tokens yet.")
    for row in rows:
        made = time.strftime("%Y-%m-%d %H:%M", time.localtime(row["created_at"]))
        line = (f"Token {row['id']} · {row['user']} ({row['role']}) · {row['label'] or 'no label'} · made {made}")
        c1, c2 = st.columns([5, 1])
        if row["revoked_at"]:
            c1.text(f"{line} · revoked by {row['revoked_by']}")
            continue
        c1.text(line)
        c2.button("Revoke", key=f"revoke_{row['id']}",
                  on_click=ui.safe_callback("account", lambda c, t=row["id"]: revoke(c, t)))
