"""Settings: one place, environment before secrets before defaults, and the README table kept true."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from core.config import SETTINGS, Settings
from core.errors import ConfigError
from tests.support import ROOT


def test_defaults(tmp_path):
    s = Settings.load(env={}, base_dir=tmp_path)
    assert (s.comfyui_urls, s.db_path, s.output_dir, s.in_flight, s.connect_timeout, s.read_timeout,
            s.max_attempts) == ((), tmp_path / "tasks.db", tmp_path / "generated_images", 2, 10.0, 60.0, 3)


def test_environment_wins_over_secrets_which_win_over_defaults(tmp_path):
    (tmp_path / ".streamlit").mkdir()
    (tmp_path / ".streamlit" / "secrets.toml").write_text(
        'COMFYUI_URL = "http://gpu-1:8188, gpu-2:8188/"\nCOMFYBATCH_IN_FLIGHT = "3"\nCOMFYBATCH_DB = "x.db"\n')
    s = Settings.load(env={"COMFYBATCH_DB": "/data/env.db"}, base_dir=tmp_path)
    assert s.comfyui_urls == ("http://gpu-1:8188", "http://gpu-2:8188")
    assert (s.in_flight, s.db_path) == (3, Path("/data/env.db"))


@pytest.mark.parametrize(("env", "message"), [
    ({"COMFYBATCH_IN_FLIGHT": "two"}, "COMFYBATCH_IN_FLIGHT: 'two' is not a valid int"),
    ({"COMFYBATCH_MAX_ATTEMPTS": "0"}, "COMFYBATCH_MAX_ATTEMPTS: must be greater than 0, got '0'"),
    ({"COMFYUI_URL": "ftp://x"}, "COMFYUI_URL: 'ftp://x' is not an http(s) URL"),
])
def test_bad_values_name_the_setting(tmp_path, env, message):
    with pytest.raises(ConfigError) as err:
        Settings.load(env=env, base_dir=tmp_path)
    assert str(err.value) == message


def test_readme_settings_table_matches_the_code():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| `([A-Z0-9_]+)` \| `([^`]*)` \| (.+?) \|$", readme, re.M)
    assert [(name, default, text) for name, default, text in rows] == [(s.env, s.default, s.help) for s in SETTINGS]
