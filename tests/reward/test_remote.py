"""kind remote: the HTTP client against our server, OpenRLHF's protocol, tokens, retries and giving up clearly."""

from __future__ import annotations

import email.utils
import logging
import random
import re
import socket
import time

import pytest
from fastapi import FastAPI
from fastapi.responses import JSONResponse

from reward.base import RewardQuery
from reward.config import RemoteConfig, RewardComponent, RewardConfig, ServerConfig
from reward.registry import build_reward_model
from reward.remote import JITTER, TIMEOUT_MARGIN_S, RewardServerError, retry_after_seconds, retry_wait
from reward.server import background, running_server
from rlhf_loop.common.errors import UserError

QUERIES = [
    RewardQuery([{"role": "user", "content": "Name three fruits."}], ["apple banana cherry", "no", ""]),
    RewardQuery([{"role": "user", "content": "Count to five."}], ["one two three four five"]),
    RewardQuery([{"role": "user", "content": "Colour?"}], ["blue", "green", "red"]),
]


def remote_config(url: str, **settings) -> RewardConfig:
    top = {k: settings.pop(k) for k in ("batch_size", "model_path") if k in settings}
    return RewardConfig(kind="remote", remote=RemoteConfig(url=url, backoff_s=0.01, **settings), **top)


@pytest.fixture(scope="module")
def bt_config(tiny_reward_dir):
    return RewardConfig(model_path=str(tiny_reward_dir))


@pytest.fixture(scope="module")
def expected(bt_config):
    return [r.scores for r in build_reward_model(bt_config, "cpu").score(QUERIES)]


def test_remote_matches_in_process_and_keeps_groups_together(bt_config, expected):
    with running_server(bt_config) as url:
        client = build_reward_model(remote_config(url, batch_size=2, concurrency=3), "cpu")
        sent = []
        inner = client._request
        client._request = lambda method, path, body=None: sent.append(body) or inner(method, path, body)
        results = client.score(QUERIES)
    assert [[len(q["responses"]) for q in body["queries"]] for body in sent] == [[3], [1], [3]]
    for scores, reference in zip([r.scores for r in results], expected):
        assert scores == pytest.approx(reference, abs=1e-5)


def test_openrlhf_protocol_against_our_get_reward(bt_config, expected):
    with running_server(bt_config) as url:
        client = build_reward_model(remote_config(url, protocol="openrlhf", model_path=bt_config.model_path), "cpu")
        results = client.score(QUERIES)
    for scores, reference in zip([r.scores for r in results], expected):
        assert scores == pytest.approx(reference, abs=1e-5)


def test_objectives_come_from_the_server(tmp_path):
    (tmp_path / "r.py").write_text("def length(messages, response, meta):\n    return len(response)\n")
    length = RewardConfig(kind="function", function=f"{tmp_path}/r.py:length")
    with running_server(RewardConfig(kind="combined", components=[RewardComponent(name="len", reward=length)])) as url:
        client = build_reward_model(remote_config(url), "cpu")
        assert client.objectives == ["len"]
        assert client.score(QUERIES[:1])[0].objectives == {"len": [19.0, 2.0, 0.0]}


def test_token_comes_from_the_environment(bt_config, monkeypatch):
    with running_server(bt_config, token="s3cret") as url:
        monkeypatch.delenv("RLHF_LOOP_REWARD_TOKEN", raising=False)
        with pytest.raises(RewardServerError, match="rejected the token: set the environment variable"):
            build_reward_model(remote_config(url), "cpu")
        monkeypatch.setenv("RLHF_LOOP_REWARD_TOKEN", "s3cret")
        assert len(build_reward_model(remote_config(url), "cpu").score(QUERIES)) == 3


def flaky_app(failures: int, status: int = 503, headers: dict[str, str] | None = None):
    """Fails the first `failures` /score calls with `status` (and `headers`), then scores every response 1.0."""
    app, calls = FastAPI(), []

    @app.get("/info")
    async def info():
        return {"objectives": []}

    @app.post("/score")
    async def score(body: dict):
        calls.append(1)
        if len(calls) <= failures:
            return JSONResponse({"detail": "busy"}, status_code=status, headers=headers)
        return {"results": [{"scores": [1.0] * len(q["responses"]), "objectives": {}} for q in body["queries"]]}

    return app, calls


def test_transient_failures_are_retried_with_backoff():
    app, calls = flaky_app(failures=2)
    with background(app) as url:
        client = build_reward_model(remote_config(url, max_retries=3, concurrency=1), "cpu")
        assert [r.scores for r in client.score(QUERIES[:1])] == [[1.0, 1.0, 1.0]]
    assert len(calls) == 3


def test_after_the_last_retry_the_stage_stops_with_a_clear_error():
    app, calls = flaky_app(failures=100)
    with background(app) as url:
        client = build_reward_model(remote_config(url, max_retries=2, concurrency=1), "cpu")
        with pytest.raises(RewardServerError, match=r"failed 3 times \(last: HTTP 503: busy\).*rlhf-loop resume"):
            client.score(QUERIES[:1])
    assert len(calls) == 3


def test_client_errors_are_not_retried():
    app, calls = flaky_app(failures=100, status=400)
    with background(app) as url:
        client = build_reward_model(remote_config(url, max_retries=3), "cpu")
        with pytest.raises(RewardServerError, match=r"refused the request \(HTTP 400: busy\)"):
            client.score(QUERIES[:1])
    assert len(calls) == 1


@pytest.mark.parametrize("status", [400, 404, 413, 415, 422])
def test_no_client_error_is_retried_even_with_a_retry_after(status):
    app, calls = flaky_app(failures=100, status=status, headers={"Retry-After": "0"})
    with background(app) as url:
        client = build_reward_model(remote_config(url, max_retries=3), "cpu")
        with pytest.raises(RewardServerError, match=rf"refused the request \(HTTP {status}: busy\)"):
            client.score(QUERIES[:1])
    assert len(calls) == 1


def logged_waits(caplog) -> list[float]:
    return [float(re.search(r"in ([0-9.]+) s$", r.getMessage()).group(1))
            for r in caplog.records if r.name == "reward.remote" and "retry" in r.getMessage()]


def test_a_503_retry_after_is_honoured_with_jitter(caplog):
    app, calls = flaky_app(failures=1, headers={"Retry-After": "1"})
    with background(app) as url, caplog.at_level(logging.WARNING, logger="reward.remote"):
        client = build_reward_model(remote_config(url, max_retries=3), "cpu")  # backoff_s=0.01
        start = time.monotonic()
        assert [r.scores for r in client.score(QUERIES[:1])] == [[1.0, 1.0, 1.0]]
        elapsed = time.monotonic() - start
    [wait] = logged_waits(caplog)
    assert 1.0 <= wait <= 1.0 + JITTER and elapsed >= 1.0 and len(calls) == 2


def test_a_long_retry_after_is_cut_to_the_cap(caplog):
    app, calls = flaky_app(failures=2, status=429, headers={"Retry-After": "3600"})
    with background(app) as url, caplog.at_level(logging.WARNING, logger="reward.remote"):
        client = build_reward_model(remote_config(url, max_retries=3, max_retry_after_s=0.2), "cpu")
        assert [r.scores for r in client.score(QUERIES[:1])] == [[1.0, 1.0, 1.0]]
    assert all(0.2 <= wait <= 0.2 * (1 + JITTER) for wait in logged_waits(caplog)) and len(calls) == 3


def test_retry_waits_back_off_exponentially_spread_by_jitter():
    settings, rng = RemoteConfig(backoff_s=1.0, max_retry_after_s=30), random.Random(0)
    for attempt in range(4):
        waits = [retry_wait(settings, attempt, None, rng) for _ in range(200)]
        base = 2 ** attempt
        assert base <= min(waits) and max(waits) <= base * (1 + JITTER)
        assert max(waits) - min(waits) > base * JITTER * 0.8  # spread over the jitter range, not one value
    assert 5 <= retry_wait(settings, 0, "5", rng) <= 5 * (1 + JITTER)  # Retry-After above the backoff wins
    assert 4 <= retry_wait(settings, 2, "1", rng) <= 4 * (1 + JITTER)  # and below it, the backoff does
    assert 30 <= retry_wait(settings, 0, "86400", rng) <= 30 * (1 + JITTER)


def test_retry_after_is_read_in_both_forms():
    in_a_minute = email.utils.formatdate(time.time() + 60, usegmt=True)
    assert retry_after_seconds("7") == 7.0 and retry_after_seconds(" 0 ") == 0.0
    assert 55 <= retry_after_seconds(in_a_minute) <= 60
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # a date past: retry now
    for bad in (None, "", "-3", "1.5", "soon", "Wed, 21 Oct 2015 07:28:00"):
        assert retry_after_seconds(bad) is None, bad


def test_the_server_times_out_before_the_client_by_default():
    assert ServerConfig().request_timeout_s + TIMEOUT_MARGIN_S <= RemoteConfig().timeout_s


@pytest.mark.parametrize("server_timeout, client_timeout, expected", [
    (90.0, 120.0, 120.0),  # the defaults: the server's 504 comes first, nothing to change
    (300.0, 120.0, 310.0),  # a patient server: the client waits for its answer
    (5.0, 30.0, 30.0),
])
def test_the_client_waits_past_the_servers_timeout(tmp_path, server_timeout, client_timeout, expected):
    (tmp_path / "r.py").write_text("def one(messages, response, meta):\n    return 1.0\n")
    cfg = RewardConfig(kind="function", function=f"{tmp_path}/r.py:one",
                       server=ServerConfig(request_timeout_s=server_timeout))
    with running_server(cfg) as url:
        client = build_reward_model(remote_config(url, timeout_s=client_timeout), "cpu")
        assert client.client.timeout.read == expected
        assert [r.scores for r in client.score(QUERIES[:1])] == [[1.0, 1.0, 1.0]]


def test_unreachable_server_fails_at_start_up():
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(RewardServerError, match=r"/info failed 2 times \(last: ConnectError"):
        build_reward_model(remote_config(f"http://127.0.0.1:{port}", max_retries=1), "cpu")


def test_a_server_of_another_kind_is_recognised_at_start_up():
    app = FastAPI()

    @app.get("/info")
    async def info():
        return {"name": "something else"}

    with background(app) as url:
        with pytest.raises(RewardServerError, match="not an rlhf-loop reward server.*remote.protocol=openrlhf"):
            build_reward_model(remote_config(url), "cpu")


def test_config_problems_are_caught_before_any_request():
    with pytest.raises(UserError, match="reward.remote.url must be an http"):
        build_reward_model(RewardConfig(kind="remote"), "cpu")
    with pytest.raises(UserError, match="set reward.model_path to the tokenizer"):
        build_reward_model(remote_config("http://127.0.0.1:1", protocol="openrlhf"), "cpu")


def test_nan_from_the_server_names_the_response():
    app = FastAPI()

    @app.get("/info")
    async def info():
        return {"objectives": []}

    @app.post("/score")
    async def score(body: dict):
        return {"results": [{"scores": [0.0, "NaN"], "objectives": {}}]}  # float("NaN") parses: caught after

    with background(app) as url:
        client = build_reward_model(remote_config(url), "cpu")
        with pytest.raises(UserError, match="returned nan for response 1"):
            client.score([RewardQuery([{"role": "user", "content": "hi"}], ["a", "b"])])
