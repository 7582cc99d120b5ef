"""`rlhf-loop serve-reward`'s token: from RLHF_LOOP_REWARD_TOKEN, or from --token with a warning (a command line is
visible to every user of the machine through ps). The server itself is replaced by a stub that records its call.
"""

from __future__ import annotations

import pytest

import reward.server
from reward.config import RewardConfig
from reward.server import running_server
from rlhf_loop.frontend.cli import main
from rlhf_loop.common.errors import UserError


@pytest.fixture
def served(monkeypatch):
    calls = []
    monkeypatch.setattr(reward.server, "load_reward_config", lambda path, overrides: RewardConfig())
    monkeypatch.setattr(reward.server, "serve", lambda cfg, **kwargs: calls.append(kwargs))
    monkeypatch.delenv("RLHF_LOOP_REWARD_TOKEN", raising=False)
    return calls


def test_the_token_flag_works_and_warns_in_one_line(served, capsys):
    assert main(["serve-reward", "rm.yaml", "--token", "s3cret"]) == 0
    assert served[0]["token"] == "s3cret"
    warning = capsys.readouterr().err
    assert warning.count("\n") == 1 and warning.startswith("rlhf-loop: warning: --token")
    assert "RLHF_LOOP_REWARD_TOKEN" in warning and "s3cret" not in warning


def test_the_token_from_the_environment_needs_no_warning(served, capsys, monkeypatch):
    monkeypatch.setenv("RLHF_LOOP_REWARD_TOKEN", "from-env")
    assert main(["serve-reward", "rm.yaml", "--host", "0.0.0.0"]) == 0
    assert served[0]["token"] == "from-env" and served[0]["host"] == "0.0.0.0"
    assert capsys.readouterr().err == ""


def test_without_a_token_the_error_names_the_variable(tmp_path):
    (tmp_path / "r.py").write_text("def one(messages, response, meta):\n    return 1.0\n")
    with pytest.raises(UserError, match="needs a bearer token: set RLHF_LOOP_REWARD_TOKEN"):
        with running_server(RewardConfig(kind="function", function=f"{tmp_path}/r.py:one"), host="0.0.0.0"):
            pass
