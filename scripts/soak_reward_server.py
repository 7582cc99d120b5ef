"""Loopback soak of `rlhf-loop serve-reward`: many concurrent clients, every answer checked against its own texts.

    .venv/bin/python scripts/soak_reward_server.py [--clients 64] [--requests 10000] [--replicas 2]

The server scores with a cheap function reward, a checksum of the prompt and the response, so a score tells which
texts it belongs to: a request answered with scores that are not its own is misattributed, one without a 200 answer
is lost. Requests alternate between /score and /get_reward and carry 1 to 4 responses each. The server runs in this
process (uvicorn in a thread), so clients and server share one interpreter: the latencies are upper bounds.
tests/reward/test_server_load.py runs a short version in the suite. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from reward.config import RewardConfig, ServerConfig

REWARD_SOURCE = '''
import zlib


def fingerprint(messages, response, meta):
    return float(zlib.crc32((messages[-1]["content"] + "\\x00" + response).encode()))
'''
WORDS = "apple banana cherry one two three blue green red sea moon wave [ ] { } \" \\ é 水".split()


@dataclass
class SoakRequest:
    path: str
    body: dict
    prompt: str
    responses: list[str]


@dataclass
class LoadReport:
    clients: int
    requests: int
    ok: int = 0
    lost: int = 0  # no 200 answer (an error status or a transport error)
    misattributed: int = 0  # a 200 answer whose scores are not those of the request's own texts
    statuses: Counter = field(default_factory=Counter)
    latencies_s: list[float] = field(default_factory=list)
    seconds: float = 0.0

    def percentile_ms(self, q: int) -> float:
        return statistics.quantiles(self.latencies_s, n=100, method="inclusive")[q - 1] * 1000


def write_reward_file(directory: str | Path) -> str:
    """The checksum reward as a file; returns its `file.py:name` reference for reward.function."""
    path = Path(directory) / "soak_reward.py"
    path.write_text(REWARD_SOURCE)
    return f"{path}:fingerprint"


def server_config(function: str, max_queued_requests: int = 256) -> RewardConfig:
    # A small batch and a short wait for more requests make replicas merge requests from different clients: what
    # can misattribute scores if slicing is wrong.
    return RewardConfig(kind="function", function=function, batch_size=16,
                        server=ServerConfig(max_batch_wait_ms=1.0, max_queued_requests=max_queued_requests))


def make_requests(count: int, seed: int) -> list[SoakRequest]:
    rng = random.Random(seed)
    requests = []
    for i in range(count):
        prompt = f"request {i}: " + " ".join(rng.choices(WORDS, k=rng.randint(1, 8)))
        responses = [" ".join(rng.choices(WORDS, k=rng.randint(0, 12))) for _ in range(rng.randint(1, 4))]
        if i % 2:
            body = {"query": [prompt + r for r in responses], "prompts": [prompt] * len(responses)}
            requests.append(SoakRequest("/get_reward", body, prompt, responses))
        else:
            body = {"queries": [{"messages": [{"role": "user", "content": prompt}], "responses": responses}]}
            requests.append(SoakRequest("/score", body, prompt, responses))
    return requests


def run_load(url: str, requests: list[SoakRequest], clients: int,
             expected_score: Callable[[list[dict], str, dict], float]) -> LoadReport:
    """Send `requests` from `clients` threads (one keep-alive connection each) and check every answer."""
    report, lock, sessions = LoadReport(clients, len(requests)), threading.Lock(), []
    local = threading.local()

    def send(request: SoakRequest) -> None:
        if not hasattr(local, "session"):
            local.session = httpx.Client(timeout=120)
            with lock:
                sessions.append(local.session)
        start = time.perf_counter()
        try:
            answer = local.session.post(url + request.path, json=request.body)
            status = answer.status_code
        except httpx.TransportError as e:
            answer, status = None, type(e).__name__
        elapsed = time.perf_counter() - start
        scores = None
        if status == 200:
            payload = answer.json()
            scores = payload["rewards"] if request.path == "/get_reward" else payload["results"][0]["scores"]
        expected = [expected_score([{"role": "user", "content": request.prompt}], r, {}) for r in request.responses]
        with lock:
            report.statuses[status] += 1
            report.latencies_s.append(elapsed)
            if scores is None:
                report.lost += 1
            elif scores != expected:
                report.misattributed += 1
            else:
                report.ok += 1

    start = time.perf_counter()
    try:
        with ThreadPoolExecutor(max_workers=clients) as pool:
            list(pool.map(send, requests))
    finally:
        for session in sessions:
            session.close()
    report.seconds = time.perf_counter() - start
    return report


def table(reports: list[LoadReport]) -> str:
    lines = ["| clients | requests | ok | lost | misattributed | p50 ms | p99 ms | requests/s | statuses |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in reports:
        statuses = ", ".join(f"{status}: {n}" for status, n in sorted(r.statuses.items(), key=str))
        lines.append(f"| {r.clients} | {r.requests} | {r.ok} | {r.lost} | {r.misattributed} | "
                     f"{r.percentile_ms(50):.1f} | {r.percentile_ms(99):.1f} | {r.requests / r.seconds:,.0f} | "
                     f"{statuses} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=64, help="concurrent clients")
    parser.add_argument("--requests", type=int, default=10_000, help="requests in all")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from reward.function import load_code_reference
    from reward.server import running_server

    with tempfile.TemporaryDirectory() as tmp:
        function = write_reward_file(tmp)
        with running_server(server_config(function), replicas=args.replicas) as url:
            report = run_load(url, make_requests(args.requests, args.seed), args.clients,
                              load_code_reference(function, "soak"))
    print(table([report]))
    return 0 if report.ok == report.requests else 1


if __name__ == "__main__":
    sys.exit(main())
