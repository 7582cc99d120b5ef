"""Property-based fuzzing of the reward server's scoring endpoints and its token check, with hypothesis.

    .venv/bin/python scripts/fuzz_reward_server.py [--examples 10000] [--seed 0]

Each generated request goes to /score or /get_reward of a loopback server that has a token: random JSON,
near-valid bodies of either protocol, deep nesting, huge numbers, raw bytes and invalid UTF-8, with a JSON or
another content type (or none), the right, a wrong or no token, and random extra headers. The properties: no answer
is a 5xx; a request without the right token gets 401 and one with another content type 415, and neither is scored
(the server's reward counts its calls). tests/reward/test_server_fuzz.py runs a short version in the suite. Prints
how many requests got each status, per endpoint.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from reward.config import RewardConfig

TOKEN = "fuzz-token-0123456789"
REWARD_SOURCE = '''
SCORED = [0]  # responses scored so far, read by the fuzzer


def counted(messages, response, meta):
    SCORED[0] += 1
    return float(len(response))
'''
# Headers the HTTP client manages itself; the fuzzer sets content-type and authorization on purpose.
MANAGED_HEADERS = {"host", "content-length", "transfer-encoding", "connection", "content-type", "authorization",
                   "upgrade", "te", "trailer", "keep-alive"}
JSON_TYPES = ["application/json", "application/json; charset=utf-8", "Application/JSON", "application/json ;x=y"]
OTHER_TYPES = ["text/plain", "text/plain; charset=utf-8", "application/x-www-form-urlencoded",
               "multipart/form-data; boundary=x", "application/jsonx", "application/json-patch+json", "", None]
AUTHORIZATIONS = {  # header value -> whether it carries the right token
    f"Bearer {TOKEN}": True, f"bearer {TOKEN}": True, None: False, "Bearer wrong": False, TOKEN: False,
    f"Basic {TOKEN}": False, "Bearer": False, f"Bearer {TOKEN}x": False, f"Bearer  {TOKEN}": False,
}


@dataclass
class FuzzRequest:
    path: str
    body: bytes
    content_type: str | None
    authorization: str | None
    extra_headers: dict[str, str]

    @property
    def authorized(self) -> bool:
        return AUTHORIZATIONS.get(self.authorization, False)

    @property
    def json_content_type(self) -> bool:
        return (self.content_type or "").partition(";")[0].strip().lower() == "application/json"

    def headers(self) -> dict[str, str]:
        named = {"content-type": self.content_type, "authorization": self.authorization}
        return {**self.extra_headers, **{k: v for k, v in named.items() if v is not None}}


def write_reward_file(directory: str | Path) -> Path:
    """The counting reward as a file: reward.function is `{path}:counted`, its count `{path}:SCORED`."""
    path = Path(directory) / "fuzz_reward.py"
    path.write_text(REWARD_SOURCE)
    return path


def server_config(reward_file: Path) -> RewardConfig:
    return RewardConfig(kind="function", function=f"{reward_file}:counted")


# -- what gets sent --------------------------------------------------------------------------------------------

# Half the time the characters include lone surrogates, which JSON can carry (\ud800) but UTF-8 cannot.
texts = st.text(max_size=30) | st.text(st.characters(exclude_categories=()), max_size=30)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | texts,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4),
    max_leaves=16,
)


def some(elements: st.SearchStrategy, max_size: int) -> st.SearchStrategy[list]:
    """Lists that are mostly non-empty, as the protocol wants, and sometimes empty."""
    return st.one_of(*[st.lists(elements, min_size=1, max_size=max_size)] * 3, st.just([]))


messages = some(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant"]) | texts,
                                       "content": texts}), max_size=3)
score_bodies = st.fixed_dictionaries(
    {"queries": some(st.fixed_dictionaries({"messages": messages, "responses": some(texts, max_size=4)},
                                           optional={"meta": json_values}), max_size=3)})


@st.composite
def get_reward_bodies(draw) -> dict:
    """OpenRLHF bodies, mostly consistent (each query starts with its prompt), sometimes not."""
    prompts = draw(some(texts, max_size=4))
    body = {"query": [prompt + draw(texts) for prompt in prompts]}
    if draw(st.integers(0, 3)):  # kinds that are not text classifiers need prompts
        body["prompts"] = prompts if draw(st.integers(0, 3)) else draw(st.lists(texts, max_size=4))
    if draw(st.booleans()):
        body["labels"] = draw(st.lists(json_values, min_size=len(prompts), max_size=len(prompts) + 1))
    return body


def encoded(value) -> st.SearchStrategy[bytes]:
    return st.booleans().map(lambda ascii_only: json.dumps(value, ensure_ascii=ascii_only)
                             .encode("utf-8", "surrogatepass"))


def nested(depth: int, opener: bytes) -> bytes:
    closer = {b"[": b"]", b'{"a":': b"}"}[opener]
    return opener * depth + b"1" + closer * depth


def damaged(body: bytes) -> st.SearchStrategy[bytes]:
    """The body cut short, with a stray byte, or with a run of brackets at some point."""
    return st.integers(0, len(body)).flatmap(
        lambda cut: st.sampled_from([body[:cut], body[:cut] + b"\xff" + body[cut:], body[:cut] + b"[" * 40]))


def bodies(path: str) -> st.SearchStrategy[bytes]:
    """Mostly the endpoint's own protocol, near-valid, then everything else."""
    own = score_bodies if path == "/score" else get_reward_bodies()
    return st.one_of(
        own.flatmap(encoded), own.flatmap(encoded),
        own.flatmap(encoded).flatmap(damaged),
        st.one_of(score_bodies, get_reward_bodies(), json_values).flatmap(encoded),
        st.builds(nested, st.integers(1, 5000), st.sampled_from([b"[", b'{"a":'])),
        st.integers(4000, 6000).map(lambda digits: b'{"query": [' + b"7" * digits + b"]}"),
        st.binary(max_size=200),
    )


header_names = st.from_regex(r"[A-Za-z][A-Za-z0-9-]{0,20}", fullmatch=True).filter(
    lambda name: name.lower() not in MANAGED_HEADERS)
header_values = st.from_regex(r"[ -~]{0,40}", fullmatch=True).map(str.strip)  # HTTP allows no outer spaces
fuzz_requests = st.sampled_from(["/score", "/get_reward"]).flatmap(lambda path: st.builds(
    FuzzRequest,
    path=st.just(path),
    body=bodies(path),
    # Valid choices are weighted up, so a fair share of requests gets past the token and content-type checks.
    content_type=st.one_of(st.sampled_from(JSON_TYPES), st.sampled_from(JSON_TYPES), st.sampled_from(OTHER_TYPES),
                           header_values),
    authorization=st.sampled_from([f"Bearer {TOKEN}"] * 12 + list(AUTHORIZATIONS)),
    extra_headers=st.dictionaries(header_names, header_values, max_size=3),
))


# -- the properties --------------------------------------------------------------------------------------------

def fuzz(url: str, scored: Callable[[], int], examples: int, random_seed: int | None = None,
         shrink: bool = True) -> Counter:
    """Send `examples` generated requests to the server at `url` (token TOKEN) and check each answer; returns the
    count of each (path, status). `scored()` is how many responses the server's reward has scored so far.
    shrink=False reports a failing request as found, without reducing it to a minimal one first (faster)."""
    statuses: Counter = Counter()
    phases = list(Phase) if shrink else [phase for phase in Phase if phase != Phase.shrink]

    with httpx.Client(timeout=60) as client:
        @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck),
                  phases=phases)
        @given(fuzz_requests)
        def check(request: FuzzRequest) -> None:
            before = scored()
            answer = client.post(url + request.path, content=request.body, headers=request.headers())
            statuses[request.path, answer.status_code] += 1
            assert answer.status_code < 500, f"{answer.status_code} {answer.text[:300]!r}"
            if not request.authorized:
                assert answer.status_code == 401, f"no right token but {answer.status_code}"
            elif not request.json_content_type:
                assert answer.status_code == 415, f"content type {request.content_type!r} but {answer.status_code}"
            if not (request.authorized and request.json_content_type):
                assert scored() == before, "scored a request without the right token or a JSON content type"

        (seed(random_seed)(check) if random_seed is not None else check)()
    return statuses


def table(statuses: Counter) -> str:
    codes = sorted({status for _, status in statuses})
    lines = ["| endpoint | requests | " + " | ".join(str(code) for code in codes) + " |",
             "|---|---:|" + "---:|" * len(codes)]
    for path in sorted({path for path, _ in statuses}):
        row = [statuses[path, code] for code in codes]
        lines.append(f"| {path} | {sum(row)} | " + " | ".join(str(n) for n in row) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=10_000, help="generated requests")
    parser.add_argument("--seed", type=int, default=None, help="hypothesis seed (default: random)")
    args = parser.parse_args()

    from reward.function import load_code_reference
    from reward.server import running_server

    with tempfile.TemporaryDirectory() as tmp:
        reward_file = write_reward_file(tmp)
        counter = load_code_reference(f"{reward_file}:SCORED", "fuzz")
        with running_server(server_config(reward_file), token=TOKEN) as url:
            statuses = fuzz(url, lambda: counter[0], args.examples, args.seed)
    print(table(statuses))
    print(f"\n{sum(statuses.values())} requests, {sum(n for (_, s), n in statuses.items() if s >= 500)} 5xx, "
          f"{counter[0]} responses scored")
    return 0


if __name__ == "__main__":
    sys.exit(main())
