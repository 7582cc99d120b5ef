"""Scores per second of a tiny Bradley-Terry reward model, in-process and through `rlhf-loop serve-reward`.

    .venv/bin/python scripts/bench_reward.py [--requests-64 20] [--repeats 3]

Each request is one prompt with `batch` responses. In-process, one caller scores the requests one after another;
through the server (its own process, as in production), 1 or 8 clients send the same requests concurrently.
Overhead is the server's extra time over in-process, with one client. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import multiprocessing
import random
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import httpx

from reward.base import RewardQuery
from reward.config import RewardConfig
from rlhf_loop.common.network import free_port

BATCHES = (1, 16, 64)
CLIENTS = (1, 8)
WORDS = ("the quick brown fox jumps over the lazy dog apples bananas cherries are fruits hello how are you "
         "today write a short poem about the sea waves roll in and out under the moon").split()


def make_requests(batch: int, count: int, seed: int) -> list[RewardQuery]:
    """`count` prompts with `batch` responses of 10-60 words each."""
    rng = random.Random(seed)
    return [
        RewardQuery([{"role": "user", "content": " ".join(rng.choices(WORDS, k=12))}],
                    [" ".join(rng.choices(WORDS, k=rng.randint(10, 60))) for _ in range(batch)])
        for _ in range(count)
    ]


def timed(work: Callable[[], None]) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def fastest_interleaved(works: dict[str, Callable[[], None]], repeats: int) -> dict[str, float]:
    """Each way of scoring runs once to warm up, then all run in turn `repeats` times; the fastest run of each
    counts. Interleaving and taking the minimum keep other load on the machine from favouring one side."""
    for work in works.values():
        work()
    times: dict[str, list[float]] = {name: [] for name in works}
    for _ in range(repeats):
        for name, work in works.items():
            times[name].append(timed(work))
    return {name: min(values) for name, values in times.items()}


def through_server(url: str, requests: list[RewardQuery], clients: int) -> Callable[[], None]:
    bodies = [{"queries": [{"messages": q.messages, "responses": q.responses}]} for q in requests]
    sessions = [httpx.Client(timeout=120) for _ in range(clients)]

    def send(indexed):
        index, body = indexed
        answer = sessions[index % clients].post(f"{url}/score", json=body)
        answer.raise_for_status()

    def work():
        with ThreadPoolExecutor(max_workers=clients) as pool:
            list(pool.map(send, enumerate(bodies)))

    return work


def serve_in_child(cfg: RewardConfig, port: int, threads: int) -> None:
    import torch

    from reward.server import serve

    torch.set_num_threads(threads)
    serve(cfg, host="127.0.0.1", port=port, replicas=1, device="cpu")


def wait_until_healthy(url: str, process, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not process.is_alive():
            raise RuntimeError("the reward server process exited during start-up")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the reward server at {url} did not become healthy in {timeout_s} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests-64", type=int, default=8, help="requests at batch 64 (more at smaller batches)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads, the same in-process and in the server")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)

    from rlhf_loop.toy.tiny import build_tiny_reward_model, build_tokenizer
    from reward.registry import build_reward_model

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = build_tokenizer([" ".join(WORDS)] * 50, vocab_size=512)
        cfg = RewardConfig(model_path=str(build_tiny_reward_model(tokenizer, f"{tmp}/rm")), batch_size=64)
        # The same number of scores per batch size, except batch 1 (a quarter: 1-response requests are slow).
        workloads = {b: make_requests(b, args.requests_64 * 64 // b // (4 if b == 1 else 1), seed=b) for b in BATCHES}

        local = build_reward_model(cfg, "cpu")
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        server = multiprocessing.get_context("spawn").Process(target=serve_in_child, args=(cfg, port, args.threads),
                                                             daemon=True)
        server.start()
        try:
            wait_until_healthy(url, server)
            seconds = {}
            for b, reqs in workloads.items():
                works = {"in-process": lambda reqs=reqs: [local.score([q]) for q in reqs]}
                works.update({f"server x{c}": through_server(url, reqs, c) for c in CLIENTS})
                seconds[b] = fastest_interleaved(works, args.repeats)
        finally:
            server.terminate()
            server.join(timeout=30)

    print("| batch | requests | in-process scores/s | server, 1 client scores/s | server overhead (1 client) "
          "| server, 8 clients scores/s |")
    print("|---:|---:|---:|---:|---:|---:|")
    for b, reqs in workloads.items():
        scores, t = b * len(reqs), seconds[b]
        overhead = (t["server x1"] - t["in-process"]) / t["in-process"]
        print(f"| {b} | {len(reqs)} | {scores / t['in-process']:,.0f} | {scores / t['server x1']:,.0f} | "
              f"{overhead:+.1%} | {scores / t['server x8']:,.0f} |")


if __name__ == "__main__":
    main()
