"""The reward server's defences: 415 for bodies that are not JSON (what a web page can send cross-site), 400 for deep
nesting before the parser sees it, 503 with Retry-After when its queue is full, 5xx bodies that give away nothing
but a request id. Every server binds 127.0.0.1 and is stopped by its context manager, also when a test fails.
"""

from __future__ import annotations

import json
import logging
import random
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from reward.config import RewardConfig, ServerConfig, reward_config_problems
from reward.function import load_code_reference
from reward.server import json_depth, running_server

PROMPT = [{"role": "user", "content": "Name three fruits."}]
SCORE_BODY = {"queries": [{"messages": PROMPT, "responses": ["apple", "pear"]}]}
GET_REWARD_BODY = {"query": ["P: hi there"], "prompts": ["P: "]}
JSON = {"content-type": "application/json"}

REWARDS = textwrap.dedent("""
    import threading

    SCORED = [0]
    STARTED, GATE = threading.Event(), threading.Event()

    def counted(messages, response, meta):
        SCORED[0] += 1
        return float(len(response))

    def gated(messages, response, meta):
        STARTED.set()
        GATE.wait(30)  # the test opens it; the timeout only keeps a failed test from hanging the suite
        return 1.0

    def broken(messages, response, meta):
        raise RuntimeError("/srv/secret/weights.bin is corrupt")
""")


@pytest.fixture(scope="module")
def rewards(tmp_path_factory):
    path = tmp_path_factory.mktemp("limits") / "limit_rewards.py"
    path.write_text(REWARDS)
    return path


@pytest.fixture(scope="module")
def counting_server(rewards):
    with running_server(RewardConfig(kind="function", function=f"{rewards}:counted")) as url:
        yield url, load_code_reference(f"{rewards}:SCORED", "test")


# -- 415 -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("content_type", [
    "text/plain", "text/plain;charset=UTF-8", "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=----x", None,
])
@pytest.mark.parametrize("path, body", [("/score", SCORE_BODY), ("/get_reward", GET_REWARD_BODY)])
def test_bodies_that_are_not_declared_json_get_415_and_are_not_scored(counting_server, content_type, path, body):
    """What a web page can POST cross-site without a preflight: a JSON body sent as one of these types."""
    url, scored = counting_server
    before = scored[0]
    headers = {} if content_type is None else {"content-type": content_type}
    answer = httpx.post(url + path, content=json.dumps(body).encode(), headers=headers)
    assert answer.status_code == 415
    assert "Content-Type: application/json" in answer.json()["detail"]
    assert scored[0] == before


def test_a_browser_form_post_is_refused(counting_server):
    url, scored = counting_server
    before = scored[0]
    answer = httpx.post(f"{url}/score", data={"queries": json.dumps(SCORE_BODY["queries"])})
    assert answer.status_code == 415 and scored[0] == before


@pytest.mark.parametrize("content_type", ["application/json", "application/json; charset=utf-8", "Application/JSON"])
def test_json_with_parameters_or_any_case_is_accepted(counting_server, content_type):
    url, _ = counting_server
    answer = httpx.post(f"{url}/score", content=json.dumps(SCORE_BODY).encode(), headers={"content-type": content_type})
    assert answer.status_code == 200 and answer.json()["results"][0]["scores"] == [5.0, 4.0]


# -- nesting ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path, body", [
    ("/score", b"[" * 2000 + b"]" * 2000),
    ("/get_reward", b"[" * 1100 + b"]" * 1100),
    ("/score", b'{"a":' * 3000 + b"1" + b"}" * 3000),
    ("/get_reward", b'{"query": ["a"], "labels": [' + b"[" * 100_000),  # unterminated, as an attacker sends it
    ("/score", b'{"queries": [{"messages": [{"role": "user", "content": "x"}], "responses": ["a"], "meta": '
               + b'{"k": ' * 40 + b"1" + b"}" * 40 + b"}]}"),
])
def test_deep_nesting_is_a_400_with_one_line(counting_server, path, body):
    url, scored = counting_server
    before = scored[0]
    answer = httpx.post(url + path, content=body, headers=JSON)
    assert answer.status_code == 400
    assert answer.json()["detail"] == "JSON nested more than 32 levels deep (the server's max_json_depth)"
    assert scored[0] == before
    assert httpx.post(f"{url}/score", json=SCORE_BODY).status_code == 200


def test_brackets_inside_strings_do_not_count(counting_server):
    url, _ = counting_server
    response = '[[[{{{"\\' * 2000  # code-like text a policy may well write
    body = {"queries": [{"messages": PROMPT, "responses": [response]}]}
    answer = httpx.post(f"{url}/score", json=body)
    assert answer.status_code == 200 and answer.json()["results"][0]["scores"] == [float(len(response))]


def test_the_depth_limit_is_a_config_field(rewards):
    cfg = RewardConfig(kind="function", function=f"{rewards}:counted", server=ServerConfig(max_json_depth=6))

    def with_meta(levels: int) -> dict:  # meta nested `levels` deep sits 3 levels down in the body
        meta = {}
        for _ in range(levels - 1):
            meta = {"k": meta}
        return {"queries": [{"messages": PROMPT, "responses": ["a"], "meta": meta}]}

    with running_server(cfg) as url:
        assert httpx.post(f"{url}/score", json=with_meta(3)).status_code == 200
        answer = httpx.post(f"{url}/score", json=with_meta(4))
        assert answer.status_code == 400 and "more than 6 levels" in answer.json()["detail"]


def nesting_of(value) -> int:
    if isinstance(value, (list, dict)):
        children = value.values() if isinstance(value, dict) else value
        return 1 + max((nesting_of(child) for child in children), default=0)
    return 0


def random_json(rng: random.Random, depth: int = 0):
    characters = '[]{}"\\ ab\n\t\u00e9\u6c34\ud800'  # brackets, quotes, escapes, non-ASCII and a lone surrogate
    text = "".join(rng.choice(characters) for _ in range(rng.randint(0, 6)))
    roll = rng.random()
    if depth > 10 or roll < 0.3:
        return rng.choice([text, 1, -2.5, None, True])
    if roll < 0.65:
        return [random_json(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return {text: random_json(rng, depth + 1) for _ in range(rng.randint(0, 3))}


def test_json_depth_agrees_with_the_parsed_value():
    rng = random.Random(0)
    for _ in range(3000):
        value = random_json(rng)
        for ascii_only in (True, False):
            body = json.dumps(value, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")
            assert json_depth(body) == nesting_of(value), body


@pytest.mark.parametrize("body, depth", [
    (b'["\\\\", ["x"]]', 2),  # an escaped backslash ends the string: the next bracket counts
    (b'["\\"[[[", 1]', 1),  # an escaped quote does not end it: the brackets after it do not count
    (b'["\\\\\\"[[["]', 1),  # backslash pair, then an escaped quote
    (b"", 0),
    (b"[[]][", 2),
])
def test_json_depth_reads_escapes_as_the_parser_does(body, depth):
    assert json_depth(body) == depth


# -- overload --------------------------------------------------------------------------------------------------

def test_a_full_queue_gets_503_with_retry_after(rewards):
    cfg = RewardConfig(kind="function", function=f"{rewards}:gated", batch_size=1,
                       server=ServerConfig(max_queued_requests=1, retry_after_s=7))
    started, gate = (load_code_reference(f"{rewards}:{name}", "test") for name in ("STARTED", "GATE"))
    started.clear()
    gate.clear()
    with running_server(cfg) as url, ThreadPoolExecutor(max_workers=2) as pool:
        try:
            body = {"queries": [{"messages": PROMPT, "responses": ["a"]}]}
            scoring = pool.submit(httpx.post, f"{url}/score", json=body, timeout=60)
            assert started.wait(30)  # the only replica is now busy with the first request
            queued = pool.submit(httpx.post, f"{url}/score", json=body, timeout=60)
            deadline = time.monotonic() + 30
            while httpx.get(f"{url}/info").json()["queued"] < 1 and time.monotonic() < deadline:
                time.sleep(0.01)  # until the second one waits in the queue, which is then full
            refused = httpx.post(f"{url}/score", json=body)
            assert refused.status_code == 503 and refused.headers["retry-after"] == "7"
            assert refused.json()["detail"].startswith("the server is overloaded: retry later (request id ")
            refused = httpx.post(f"{url}/get_reward", json={"query": ["P: a"], "prompts": ["P: "]})
            assert refused.status_code == 503 and refused.headers["retry-after"] == "7"
        finally:
            gate.set()
        assert [scoring.result().status_code, queued.result().status_code] == [200, 200]
        assert httpx.post(f"{url}/score", json=body).status_code == 200  # and it recovers


# -- 5xx bodies ------------------------------------------------------------------------------------------------

def test_a_crash_answers_500_with_a_request_id_and_logs_the_details(rewards, caplog):
    cfg = RewardConfig(kind="function", function=f"{rewards}:broken")
    with running_server(cfg) as url, caplog.at_level(logging.ERROR, logger="reward.server"):
        answers = [httpx.post(f"{url}/score", json=SCORE_BODY), httpx.post(f"{url}/get_reward", json=GET_REWARD_BODY)]
    for answer in answers:
        assert answer.status_code == 500
        request_id = answer.headers["x-request-id"]
        expected = f"scoring failed (request id {request_id}; the server's log has the details)"
        assert answer.json() == {"detail": expected}
        for secret in ("secret", "weights", "RuntimeError", "Traceback", "/srv", ".py"):
            assert secret not in answer.text
        logged = [r for r in caplog.records if request_id in r.getMessage()]
        assert len(logged) == 1 and "/srv/secret/weights.bin is corrupt" in str(logged[0].exc_info[1])


def test_a_timeout_answers_504_with_a_request_id(rewards):
    cfg = RewardConfig(kind="function", function=f"{rewards}:gated", server=ServerConfig(request_timeout_s=0.2))
    gate = load_code_reference(f"{rewards}:GATE", "test")
    with running_server(cfg) as url:
        try:
            gate.clear()
            answer = httpx.post(f"{url}/score", json={"queries": [{"messages": PROMPT, "responses": ["a"]}]})
        finally:
            gate.set()
    assert answer.status_code == 504
    assert answer.json()["detail"] == (f"scoring took longer than 0.2 s (request id {answer.headers['x-request-id']}; "
                                       "the server's log has the details)")


# -- config ----------------------------------------------------------------------------------------------------

def test_server_limits_are_checked():
    cfg = RewardConfig(kind="function", function="f.py:g",
                       server=ServerConfig(max_json_depth=3, max_queued_requests=0, request_timeout_s=0))
    assert reward_config_problems(cfg) == [
        "reward.server.request_timeout_s must be > 0, got 0",
        "reward.server.max_json_depth must be >= 4, got 3",
        "reward.server.max_queued_requests must be >= 1, got 0",
    ]
