"""Property-based fuzzing (hypothesis) of /score, /get_reward and the token check: no 5xx, and nothing scored
without the right token and a JSON content type. The long version is scripts/fuzz_reward_server.py, whose
strategies and properties this test runs with a few hundred examples.
"""

from __future__ import annotations

import importlib.util
import itertools
import sys
from pathlib import Path

import pytest

from reward.function import load_code_reference
from reward.server import running_server

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("fuzz_reward_server", REPO / "scripts" / "fuzz_reward_server.py")
fuzzer = sys.modules[_spec.name] = importlib.util.module_from_spec(_spec)  # its dataclasses look themselves up there
_spec.loader.exec_module(fuzzer)


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    reward_file = fuzzer.write_reward_file(tmp_path_factory.mktemp("fuzz"))
    counter = load_code_reference(f"{reward_file}:SCORED", "test")
    with running_server(fuzzer.server_config(reward_file), token=fuzzer.TOKEN) as url:
        yield url, counter


def test_random_requests_never_get_a_5xx_nor_a_score_without_token_and_json(fuzz_server):
    url, counter = fuzz_server
    statuses = fuzzer.fuzz(url, lambda: counter[0], examples=200)
    print("\n" + fuzzer.table(statuses))
    seen = {status for _, status in statuses}
    assert {400, 401, 415} <= seen, seen  # each check was reached, not only the first
    assert {path for path, _ in statuses} == {"/score", "/get_reward"}


def test_the_properties_can_fail(fuzz_server):
    """A server that scored requests without the token would break the property: a count that grows on every
    request stands in for one, and the fuzzer must notice."""
    url, counter = fuzz_server
    calls = itertools.count()
    with pytest.raises(AssertionError, match="scored a request without the right token"):
        fuzzer.fuzz(url, lambda: counter[0] + next(calls), examples=50, shrink=False)
