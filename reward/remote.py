"""kind remote: score through an HTTP reward server, ours or one speaking OpenRLHF's /get_reward protocol.

Queries go out in requests of about `batch_size` responses (a prompt's K responses always travel together, so a
judge on the other side sees them all), `remote.concurrency` requests at a time. Connection errors, timeouts, 429
and 5xx are retried with exponential backoff, waiting at least as long as the server's Retry-After asks (up to
`remote.max_retry_after_s`) and a random 0-50% longer, so clients refused together do not return together; other
4xx answers are bugs a retry cannot fix and stop at once. When the retries run out the scoring stage stops with a
one-line RewardServerError; the run directory keeps every finished shard, so `rlhf-loop resume` continues from
there once the server is back.

Timeouts: our server answers 504 when a request is unscored after its `server.request_timeout_s`, by default below
this client's `remote.timeout_s`. The client reads that limit from /info and, if its own timeout is shorter, waits
the server's limit plus a margin instead: giving up first would resend work the server is still doing.
"""

from __future__ import annotations

import email.utils
import logging
import os
import random
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from reward.base import RewardQuery, RewardResult
from reward.config import RemoteConfig, RewardConfig
from reward.groups import check_finite, refuse_episodes
from rlhf_loop.common.chat import chat_text
from rlhf_loop.common.errors import UserError

log = logging.getLogger(__name__)

# Past the server's own limit: time for its 504 to travel back (and for parsing, which its limit does not count).
TIMEOUT_MARGIN_S = 10.0
JITTER = 0.5  # each wait is stretched by a random fraction up to this


class RewardServerError(UserError):
    """The reward server could not be reached or kept failing."""


class RemoteReward:
    def __init__(self, cfg: RewardConfig, key: str = "reward") -> None:
        import httpx

        self.settings, self.batch_size = cfg.remote, cfg.batch_size
        self.url = cfg.remote.url.rstrip("/")
        self.random = random.Random()
        token = os.environ.get(cfg.remote.token_env)
        self.client = httpx.Client(
            timeout=cfg.remote.timeout_s,
            headers={"Authorization": f"Bearer {token}"} if token else {},
            limits=httpx.Limits(max_connections=cfg.remote.concurrency),
        )
        if cfg.remote.protocol == "openrlhf":
            from rlhf_loop.common.hf_models import load_tokenizer

            # OpenRLHF servers expose no /info: the first scoring request is their first contact.
            self.tokenizer = load_tokenizer(cfg.model_path, cfg.trust_remote_code, f"{key}.model_path")
            self.objectives: list[str] = []
        else:
            info = self._request("GET", "/info")
            if not isinstance(info, dict) or not isinstance(info.get("objectives"), list):
                raise RewardServerError(f"{self.url}/info is not an rlhf-loop reward server's answer; for an "
                                        f"OpenRLHF server set {key}.remote.protocol=openrlhf")
            self.objectives = [str(name) for name in info["objectives"]]
            self._wait_at_least(info.get("request_timeout_s"))

    def _wait_at_least(self, server_timeout_s: Any) -> None:
        """Stretch the client's timeout past the server's own, so the server's 504 comes before the client gives up."""
        if not isinstance(server_timeout_s, (int, float)):
            return  # an older server that does not say
        waited = server_timeout_s + TIMEOUT_MARGIN_S
        if waited <= self.settings.timeout_s:
            return
        log.warning("reward server %s may take up to %s s per request; waiting %s s instead of remote.timeout_s=%s",
                    self.url, server_timeout_s, waited, self.settings.timeout_s)
        self.client.timeout = waited

    def score(self, queries: Sequence[RewardQuery]) -> list[RewardResult]:
        refuse_episodes(queries, "remote")
        chunks = self._chunks(queries)
        send = self._score_openrlhf if self.settings.protocol == "openrlhf" else self._score_ours
        with ThreadPoolExecutor(max_workers=self.settings.concurrency) as pool:
            answers = list(pool.map(send, chunks))
        return [result for answer in answers for result in answer]

    def _chunks(self, queries: Sequence[RewardQuery]) -> list[list[RewardQuery]]:
        chunks: list[list[RewardQuery]] = []
        size = self.batch_size
        for query in queries:
            if size + len(query.responses) > self.batch_size:
                chunks.append([])
                size = 0
            chunks[-1].append(query)
            size += len(query.responses)
        return chunks

    def _score_ours(self, chunk: list[RewardQuery]) -> list[RewardResult]:
        body = {"queries": [{"messages": q.messages, "responses": q.responses, "meta": q.meta} for q in chunk]}
        answer = self._request("POST", "/score", body)
        try:
            results = [RewardResult(scores=[float(s) for s in r["scores"]],
                                    objectives={k: [float(x) for x in v] for k, v in r["objectives"].items()})
                       for r in answer["results"]]
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise RewardServerError(f"reward server {self.url} sent a malformed /score answer ({e!r})") from None
        if [len(r.scores) for r in results] != [len(q.responses) for q in chunk]:
            raise RewardServerError(f"reward server {self.url} returned scores that do not match the request")
        for query, result in zip(chunk, results):
            prompt = query.messages[-1]["content"][:40]
            check_finite(result.scores, lambda r: f"response {r} of the prompt {prompt!r}", f"reward server {self.url}")
        return results

    def _score_openrlhf(self, chunk: list[RewardQuery]) -> list[RewardResult]:
        prompts, texts, labels = [], [], []
        for query in chunk:
            prompt = chat_text(self.tokenizer, query.messages, add_generation_prompt=True)
            for response in query.responses:
                prompts.append(prompt)
                texts.append(prompt + response + self.tokenizer.eos_token)
                labels.append(query.meta.get(self.settings.label_column) if self.settings.label_column else None)
        answer = self._request("POST", "/get_reward", {"query": texts, "prompts": prompts, "labels": labels})
        try:
            rewards = [float(r) for r in answer["rewards"]]
        except (KeyError, TypeError, ValueError) as e:
            raise RewardServerError(f"reward server {self.url} sent a malformed /get_reward answer ({e!r})") from None
        if len(rewards) != len(texts):
            raise RewardServerError(f"reward server {self.url} returned {len(rewards)} rewards for {len(texts)} texts")
        check_finite(rewards, lambda i: f"text {i} ({texts[i][-40:]!r})", f"reward server {self.url}")
        results, start = [], 0
        for query in chunk:
            results.append(RewardResult(scores=rewards[start:start + len(query.responses)]))
            start += len(query.responses)
        return results

    def _request(self, method: str, path: str, body: Any = None) -> Any:
        import httpx

        attempts = self.settings.max_retries + 1
        problem = ""
        for attempt in range(attempts):
            retry_after = None
            try:
                response = self.client.request(method, self.url + path, json=body)
            except httpx.TransportError as e:
                problem = f"{type(e).__name__}: {e}"
            else:
                if response.status_code == 401:
                    raise RewardServerError(f"reward server {self.url} rejected the token: set the environment "
                                            f"variable {self.settings.token_env} to the server's --token")
                if response.status_code < 400:
                    return self._json(response, path)
                problem = f"HTTP {response.status_code}: {_detail(response)}"
                if response.status_code != 429 and response.status_code < 500:
                    raise RewardServerError(f"reward server {self.url}{path} refused the request ({problem})")
                retry_after = response.headers.get("retry-after")
            if attempt + 1 < attempts:
                wait = retry_wait(self.settings, attempt, retry_after, self.random)
                log.warning("reward server %s%s: %s; retry %d/%d in %.2f s", self.url, path, problem, attempt + 1,
                            self.settings.max_retries, wait)
                time.sleep(wait)
        raise RewardServerError(f"reward server {self.url}{path} failed {attempts} times (last: {problem}); "
                                "once it is back, `rlhf-loop resume` continues from the last finished shard")

    def _json(self, response, path: str) -> Any:
        try:
            return response.json()
        except ValueError:
            raise RewardServerError(f"reward server {self.url}{path} answered with something that is not JSON; "
                                    "is remote.url the server's base URL?") from None


def retry_wait(settings: RemoteConfig, attempt: int, retry_after: str | None, rng: random.Random) -> float:
    """Seconds before retry `attempt + 1`: exponential backoff, at least the server's Retry-After (cut to
    max_retry_after_s), then up to JITTER longer at random."""
    wait = settings.backoff_s * 2 ** attempt
    asked = retry_after_seconds(retry_after)
    if asked is not None:
        wait = max(wait, min(asked, settings.max_retry_after_s))
    return wait * (1 + rng.uniform(0, JITTER))


def retry_after_seconds(value: str | None) -> float | None:
    """A Retry-After header in seconds: delay-seconds or an HTTP date (RFC 9110 10.2.3); None if absent or bad."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:  # an HTTP date is always GMT; a date without a zone is not one
        return None
    return max(when.timestamp() - time.time(), 0.0)


def _detail(response) -> str:
    try:
        detail = response.json().get("detail", response.text)
    except (ValueError, AttributeError):
        detail = response.text
    return str(detail)[:200]
