"""A bounded loopback load test of the reward server: 64 concurrent clients, 2,000 requests over /score and
/get_reward, each answer checked against the scores of its own texts. The long version is
scripts/soak_reward_server.py, whose machinery this test runs.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from reward.function import load_code_reference
from reward.server import running_server

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("soak_reward_server", REPO / "scripts" / "soak_reward_server.py")
soak = sys.modules[_spec.name] = importlib.util.module_from_spec(_spec)  # its dataclasses look themselves up there
_spec.loader.exec_module(soak)


def test_64_clients_2000_requests_none_lost_none_misattributed(tmp_path):
    function = soak.write_reward_file(tmp_path)
    requests = soak.make_requests(2000, seed=1)
    with running_server(soak.server_config(function), replicas=2) as url:
        report = soak.run_load(url, requests, clients=64, expected_score=load_code_reference(function, "test"))
    print("\n" + soak.table([report]))
    assert report.statuses == {200: 2000}
    assert (report.ok, report.lost, report.misattributed) == (2000, 0, 0)
    assert {r.path for r in requests} == {"/score", "/get_reward"}


def test_a_wrong_score_is_counted_as_misattributed(tmp_path):
    """The check above can fail: scores computed by another function than the server's do not pass."""
    function = soak.write_reward_file(tmp_path)
    with running_server(soak.server_config(function)) as url:
        report = soak.run_load(url, soak.make_requests(20, seed=2), clients=4,
                               expected_score=lambda messages, response, meta: float(len(response)))
    assert report.ok + report.misattributed == 20 and report.misattributed >= 19
