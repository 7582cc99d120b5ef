"""The reward server: right scores under concurrency, 4xx for bad input while it keeps serving, tokens, limits,
OpenRLHF's /get_reward, and the config loader. Every server binds 127.0.0.1 and is stopped by its context manager.
"""

from __future__ import annotations

import dataclasses
import json
import textwrap
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from reward.base import RewardQuery
from reward.config import RewardConfig, ServerConfig
from reward.registry import build_reward_model
from reward.server import load_reward_config, running_server
from rlhf_loop.common.errors import ConfigError, UserError

PROMPT = [{"role": "user", "content": "Name three fruits."}]
JSON = {"content-type": "application/json"}


def score_body(responses, messages=PROMPT):
    return {"queries": [{"messages": messages, "responses": responses}]}


@pytest.fixture(scope="module")
def bt_config(tiny_reward_dir):
    return RewardConfig(model_path=str(tiny_reward_dir), batch_size=8,
                        server=ServerConfig(max_items_per_request=64, max_text_chars=2000, max_request_bytes=200_000))


@pytest.fixture(scope="module")
def bt_local(bt_config):
    return build_reward_model(bt_config, "cpu")


@pytest.fixture(scope="module")
def bt_server(bt_config):
    with running_server(bt_config, replicas=2) as url:
        yield url


def test_health_and_info(bt_server, bt_config):
    assert httpx.get(f"{bt_server}/health").json() == {"status": "ok"}
    info = httpx.get(f"{bt_server}/info").json()
    assert info["kind"] == "bradley_terry" and info["model"] == bt_config.model_path
    assert info["objectives"] == [] and info["replicas"] == 2 and info["max_items_per_request"] == 64


def test_scores_match_in_process(bt_server, bt_local):
    responses = ["apple banana cherry", "", "no idea"]
    answer = httpx.post(f"{bt_server}/score", json=score_body(responses)).json()
    expected = bt_local.score([RewardQuery(PROMPT, responses)])[0].scores
    assert answer["results"][0]["scores"] == pytest.approx(expected, abs=1e-5)


BAD_REQUESTS = [
    # (raw body, status, words of the message)
    (b"{not json", 400, "malformed JSON"),
    (b"\xff\xfe\x00garbage", 400, "not valid UTF-8"),
    (json.dumps({"queries": []}).encode(), 400, "queries: List should have at least 1 item"),
    (json.dumps({"queries": [{"messages": PROMPT}]}).encode(), 400, "queries.0.responses: Field required"),
    (json.dumps({"queries": [{"messages": PROMPT, "responses": [1]}]}).encode(), 400, "Input should be a valid string"),
    (json.dumps({"queries": [{"messages": [{"role": "", "content": "x"}], "responses": ["a"]}]}).encode(), 400,
     "role: String should have at least 1 character"),
    (json.dumps({"queries": [{"messages": PROMPT, "responses": ["a"], "extra": 1}]}).encode(), 400,
     "extra: Extra inputs are not permitted"),
    (json.dumps(score_body(["a"] * 65)).encode(), 413, "65 items in one request; the limit is 64"),
    (json.dumps(score_body(["x" * 2001])).encode(), 413, "text of 2001 characters exceeds"),
    (b'{"queries": [{"messages": [{"role": "user", "content": "\\ud800"}], "responses": ["a"]}]}', 400,
     "lone surrogate"),
    (json.dumps(score_body(["y" * 1500] * 60)).encode() + b" " * 120_000, 413, "exceeds the limit of 200000 bytes"),
    (b"[1, 2]", 400, "Input should be a valid dictionary"),
]


@pytest.mark.parametrize("body, status, message", BAD_REQUESTS)
def test_bad_requests_get_a_4xx_with_a_message_and_the_server_keeps_serving(bt_server, body, status, message):
    answer = httpx.post(f"{bt_server}/score", content=body, headers=JSON)
    assert answer.status_code == status
    assert message in answer.json()["detail"]
    assert httpx.post(f"{bt_server}/score", json=score_body(["still fine"])).status_code == 200


def test_oversized_body_without_content_length_is_cut_off(bt_server):
    def chunks():
        yield b'{"queries": [{"messages": [], "responses": ["'
        for _ in range(30):
            yield b"z" * 10_000

    answer = httpx.post(f"{bt_server}/score", content=chunks(), headers=JSON)
    assert answer.status_code == 413 and "exceeds the limit of 200000 bytes" in answer.json()["detail"]


def test_concurrent_valid_and_malformed_requests(bt_server, bt_local):
    """Dynamic batching merges concurrent requests; each valid one must still get exactly its own scores."""
    valid = [[f"answer {i} " + "word " * (i % 5), f"other {i}"] for i in range(24)]
    malformed = [b"{oops", json.dumps(score_body([3])).encode(), json.dumps(score_body(["z"] * 65)).encode()] * 4
    expected = [r.scores for r in bt_local.score([RewardQuery(PROMPT, responses) for responses in valid])]

    def send(item):
        if isinstance(item, bytes):
            return httpx.post(f"{bt_server}/score", content=item, headers=JSON, timeout=60)
        return httpx.post(f"{bt_server}/score", json=score_body(item), timeout=60)

    mixed = [item for pair in zip(valid, malformed + [None] * len(valid)) for item in pair if item is not None]
    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(send, mixed))
    got = [a.json()["results"][0]["scores"] for item, a in zip(mixed, answers) if not isinstance(item, bytes)]
    assert all(a.status_code in (400, 413) for item, a in zip(mixed, answers) if isinstance(item, bytes))
    assert len(got) == len(expected)
    for scores, reference in zip(got, expected):
        assert scores == pytest.approx(reference, abs=1e-5)


def test_get_reward_speaks_openrlhf_for_classifiers(bt_server, bt_local):
    tokenizer = bt_local.tokenizer
    prompt = tokenizer.apply_chat_template(PROMPT, tokenize=False, add_generation_prompt=True)
    responses = ["apple banana cherry", "no"]
    # As OpenRLHF decodes them: response, EOS, then right padding.
    queries = [prompt + r + tokenizer.eos_token + tokenizer.pad_token * 3 for r in responses]
    answer = httpx.post(f"{bt_server}/get_reward", json={"query": queries, "prompts": [prompt] * 2,
                                                         "labels": ["", ""], "datasources": ["x", "y"]}).json()
    expected = bt_local.score([RewardQuery(PROMPT, responses)])[0].scores
    assert answer["rewards"] == pytest.approx(expected, abs=1e-5)
    assert answer["scores"] == answer["rewards"] and answer["extra_logs"] == {}


@pytest.mark.parametrize("body, message", [
    ({"query": []}, "query: List should have at least 1 item"),
    ({"query": ["a", ""]}, "query[1] is empty"),
    ({"query": ["a"], "prompts": ["a", "b"]}, "prompts has 2 items but query has 1"),
    ({"queries": ["a"]}, "query: Field required"),
])
def test_get_reward_bad_input(bt_server, body, message):
    answer = httpx.post(f"{bt_server}/get_reward", json=body)
    assert answer.status_code == 400 and message in answer.json()["detail"]


USER_REWARDS = textwrap.dedent("""
    import math, time

    def matches_label(messages, response, meta):
        return float(response.strip() == str(meta.get("label")))

    def nan_for_bad(messages, response, meta):
        return math.nan if response == "bad" else float(len(response))

    def slow(messages, response, meta):
        time.sleep(1.0)
        return 1.0
""")


@pytest.fixture(scope="module")
def rewards_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("user") / "server_rewards.py"
    path.write_text(USER_REWARDS)
    return path


def test_get_reward_for_a_function_uses_prompts_and_labels(rewards_file):
    cfg = RewardConfig(kind="function", function=f"{rewards_file}:matches_label")
    with running_server(cfg) as url:
        body = {"query": ["P: 2+2? 4", "P: 2+2? 5", "Q: 3+3? 6"], "prompts": ["P: 2+2? ", "P: 2+2? ", "Q: 3+3? "],
                "labels": ["4", "4", "6"]}
        assert httpx.post(f"{url}/get_reward", json=body).json()["rewards"] == [1.0, 0.0, 1.0]
        answer = httpx.post(f"{url}/get_reward", json={"query": ["P: 4"]})
        assert answer.status_code == 400 and "send 'prompts'" in answer.json()["detail"]
        answer = httpx.post(f"{url}/get_reward", json={"query": ["P: 4"], "prompts": ["Q"]})
        assert answer.status_code == 400 and "does not start with prompts[0]" in answer.json()["detail"]


def test_nan_from_a_user_function_is_a_422_naming_the_sample_and_spares_the_others(rewards_file):
    cfg = RewardConfig(kind="function", function=f"{rewards_file}:nan_for_bad", batch_size=64,
                       server=ServerConfig(max_batch_wait_ms=50))
    with running_server(cfg) as url:
        bodies = [score_body(["ok", "bad"]), *[score_body(["x" * i]) for i in range(1, 6)]]
        with ThreadPoolExecutor(max_workers=6) as pool:
            answers = list(pool.map(lambda body: httpx.post(f"{url}/score", json=body), bodies))
        assert answers[0].status_code == 422
        assert "returned nan for query 0 response 1" in answers[0].json()["detail"]
        assert [a.json()["results"][0]["scores"] for a in answers[1:]] == [[float(i)] for i in range(1, 6)]


def test_slow_requests_time_out_with_504(rewards_file):
    cfg = RewardConfig(kind="function", function=f"{rewards_file}:slow",
                       server=ServerConfig(request_timeout_s=0.3))
    with running_server(cfg) as url:
        answer = httpx.post(f"{url}/score", json=score_body(["a"]), timeout=30)
        assert answer.status_code == 504 and "longer than 0.3 s" in answer.json()["detail"]
        assert httpx.get(f"{url}/health").status_code == 200


def test_token_is_required_when_set(rewards_file):
    cfg = RewardConfig(kind="function", function=f"{rewards_file}:matches_label")
    with running_server(cfg, token="s3cret") as url:
        assert httpx.get(f"{url}/health").status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            for answer in (httpx.get(f"{url}/info", headers=headers),
                           httpx.post(f"{url}/score", json=score_body(["a"]), headers=headers),
                           httpx.post(f"{url}/get_reward", json={"query": ["a"]}, headers=headers)):
                assert answer.status_code == 401 and answer.headers["www-authenticate"] == "Bearer"
        good = {"Authorization": "Bearer s3cret"}
        assert httpx.post(f"{url}/score", json=score_body(["a"]), headers=good).status_code == 200


def test_binding_beyond_loopback_needs_a_token(rewards_file):
    cfg = RewardConfig(kind="function", function=f"{rewards_file}:matches_label")
    with pytest.raises(UserError, match="beyond loopback\\) needs a bearer token"):
        with running_server(cfg, host="0.0.0.0"):
            pass


def test_bad_model_fails_at_start_up(tmp_path):
    with pytest.raises(UserError, match="is not a directory"):
        with running_server(RewardConfig(model_path=str(tmp_path / "missing"))):
            pass


# -- load_reward_config --------------------------------------------------------------------------------------

def test_a_run_config_works_as_the_server_config(tmp_path, tiny_reward_dir):
    path = tmp_path / "run.yaml"
    path.write_text(f"iterations: 2\nassets: {{dir: {tiny_reward_dir.parent}}}\npolicy: {{model_path: x}}\n"
                    f"reward:\n  model_path: ${{assets.dir}}/{tiny_reward_dir.name}\n"
                    "  batch_size: 4\n  server: {request_timeout_s: 10}\n")
    cfg = load_reward_config(path, ["reward.batch_size=32"])
    assert cfg == dataclasses.replace(RewardConfig(model_path=str(tiny_reward_dir), batch_size=32),
                                      server=ServerConfig(request_timeout_s=10.0))


@pytest.mark.parametrize("text, overrides, message", [
    ("reward:\n  kindd: function\n", [], "unknown key 'reward.kindd'"),
    ("reward:\n  batch_size: many\n", [], "'reward.batch_size'"),
    ("reward:\n  kind: nope\n", [], "reward.kind 'nope' is unknown"),
    ("policy: {model_path: x}\n", [], "has no reward: section"),
    ("reward: {kind: function, function: f.py:g}\n", ["batch_size=3"], "is not reward.key=value"),
    ("reward: {kind: function, function: f.py:g}\n", ["reward.nope=3"], "unknown key 'reward.nope'"),
    ("reward: [1\n", [], "cannot parse YAML"),
    ("reward:\n  batch_size: ${nowhere.x}\n", [], "'reward.batch_size': Interpolation key 'nowhere.x' not found"),
])
def test_config_errors_name_key_and_file(tmp_path, text, overrides, message):
    path = tmp_path / "reward.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as error:
        load_reward_config(path, overrides)
    assert "\n" not in str(error.value)
    if not overrides:
        assert str(path) in str(error.value)
