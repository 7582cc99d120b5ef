"""`rlhf-loop serve-reward CONFIG`: any reward kind behind HTTP, with dynamic batching across requests.

Endpoints
    GET  /health      {"status": "ok"}; never needs the token (for load balancers)
    GET  /info        kind, model, objectives, replicas, limits
    POST /score       {"queries": [{"messages": [{"role", "content"}], "responses": [str], "meta": {}}]}
                      -> {"results": [{"scores": [float], "objectives": {name: [float]}}]}
    POST /get_reward  OpenRLHF's protocol: {"query": [str], "prompts": [str], "labels": [...]}
                      -> {"rewards": [float], "scores": [float], "extra_logs": {name: [float]}}

Why FastAPI + uvicorn and not Ray Serve: one process that starts in about a second, needs no Ray cluster, and is
what OpenRLHF's own reward server uses; the two things Ray Serve would add, replicas and request batching, are a
thread per model copy and a shared queue here (reward/batcher.py), which also lets replicas merge requests from
different clients. A token is required whenever the server listens beyond loopback.

Hardening (docs/rewards.md, "The reward server"): scoring requests must be `Content-Type: application/json` (else
415: browsers send the other types cross-site without asking first); bodies nested deeper than
`server.max_json_depth` get 400 before they are parsed; at most `server.max_queued_requests` requests wait for a
replica, beyond that 503 with Retry-After; a 5xx says only what kind of failure and a request id, the log the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import secrets
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictStr, ValidationError

from reward.base import NamedRewardModel, RewardQuery, RewardResult
from reward.batcher import Job, QueueFull, ReplicaPool
from reward.config import RewardConfig, ServerConfig, reward_config_problems
from rlhf_loop.common.errors import ConfigError, UserError
from rlhf_loop.common.network import is_loopback

log = logging.getLogger(__name__)


@runtime_checkable
class TextRewardModel(Protocol):
    """Models that can score already-rendered conversations, as OpenRLHF's clients send them."""

    def score_texts(self, texts: Sequence[str]) -> RewardResult: ...


class BadRequest(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.headers = status, headers


# -- config ----------------------------------------------------------------------------------------------------

_REFERENCE = "docs/rewards.md"  # where config errors point for the valid reward keys


@dataclass
class _RewardFile:
    """What the server reads of a config file: its reward: section (a whole run config works)."""

    reward: RewardConfig = field(default_factory=RewardConfig)


def load_reward_config(path: str | Path, overrides: Sequence[str] = ()) -> RewardConfig:
    """The `reward:` section of a YAML file (a whole run config works) with `reward.key=value` overrides."""
    from omegaconf import DictConfig, OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from rlhf_loop.common.config_files import describe_config_error, structured_config, yaml_layers

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass a YAML file with a reward: section")
    raw = OmegaConf.merge(*yaml_layers(path))  # a file may build on another (`base:`), as run configs do
    if not isinstance(raw, DictConfig) or not isinstance(raw.get("reward"), DictConfig):
        raise ConfigError(f"{path} has no reward: section; put the reward settings under a top-level reward: key")
    for override in overrides:
        if "=" not in override or not override.startswith("reward."):
            raise ConfigError(f"override {override!r} is not reward.key=value; write e.g. reward.batch_size=32")
    try:
        # Resolved within the whole file, so ${toy_task.dir}-style references to other sections work.
        section = {"reward": OmegaConf.to_container(raw.reward, resolve=True)}
    except OmegaConfBaseException as e:
        raise ConfigError(f"{path}: {describe_config_error(e, _REFERENCE)}") from None
    loaded = structured_config(_RewardFile, [section], overrides, path,
                               lambda file: reward_config_problems(file.reward), _REFERENCE)
    return loaded.reward


# -- request validation ----------------------------------------------------------------------------------------

class Message(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    role: StrictStr = Field(min_length=1)
    content: StrictStr  # may be empty: datasets carry empty system turns


class Query(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    messages: list[Message] = Field(min_length=1)
    responses: list[StrictStr] = Field(min_length=1)  # a response may be empty: a policy may stop at once
    meta: dict[str, Any] = Field(default_factory=dict)


class ScoreRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    queries: list[Query] = Field(min_length=1)


class GetRewardRequest(BaseModel):
    """OpenRLHF's request; some of its versions send more fields (datasources, token ids): they are ignored."""

    model_config = ConfigDict(extra="ignore", strict=True)
    query: list[StrictStr] = Field(min_length=1)
    prompts: list[StrictStr] | None = None
    labels: list[Any] | None = None


_SKELETON = b'[]{}"'
_NOT_SKELETON = bytes(b for b in range(256) if b not in _SKELETON)
_DEPTH_STEP = np.zeros(256, np.int8)
_DEPTH_STEP[list(b"[{")], _DEPTH_STEP[list(b"]}")] = 1, -1


def json_depth(body: bytes) -> int:
    """How deep the arrays and objects of a JSON body nest, found without parsing it (the parser recurses, so a
    deep enough body would exhaust the stack), in time linear in its length. Invalid JSON gets some number.

    Escaped backslashes and then escaped quotes are dropped (a run of backslashes pairs up from its left, exactly
    as the parser reads it), so every quote left opens or closes a string; a bracket counts when an even number of
    quotes precede it.
    """
    skeleton = body.replace(b"\\\\", b"").replace(b'\\"', b"").translate(None, _NOT_SKELETON)
    codes = np.frombuffer(skeleton, np.uint8)
    outside_strings = ~np.logical_xor.accumulate(codes == ord('"'))
    return int(np.cumsum(_DEPTH_STEP[codes[outside_strings]], dtype=np.int32).max(initial=0))


class RequestParser:
    def __init__(self, limits: ServerConfig) -> None:
        self.limits = limits

    async def read_json(self, request: Request) -> Any:
        media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
        if media_type != "application/json":
            raise BadRequest(415, f"content type {media_type[:60] or 'missing'!r} is not accepted: send the body "
                                  "as JSON with 'Content-Type: application/json'")
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limits.max_request_bytes:
            raise BadRequest(413, f"request body of {declared} bytes exceeds the limit of "
                                 f"{self.limits.max_request_bytes} bytes")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > self.limits.max_request_bytes:
                raise BadRequest(413, f"request body exceeds the limit of {self.limits.max_request_bytes} bytes")
        limit = self.limits.max_json_depth
        # Counting brackets is cheap; the exact scan runs only when there are enough of them to nest too deep.
        if body.count(b"[") + body.count(b"{") > limit and json_depth(bytes(body)) > limit:
            raise BadRequest(400, f"JSON nested more than {limit} levels deep (the server's max_json_depth)")
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as e:
            raise BadRequest(400, f"request body is not valid UTF-8 (byte {e.start})") from None
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise BadRequest(400, f"malformed JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
        except ValueError:  # Python refuses integers of over 4,300 digits (sys.get_int_max_str_digits)
            raise BadRequest(400, "malformed JSON: a number has too many digits") from None

    def validate(self, schema: type[BaseModel], data: Any) -> Any:
        try:
            return schema.model_validate(data)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(part) for part in first["loc"]) or "body"
            raise BadRequest(400, f"{where}: {first['msg']}") from None

    def score_queries(self, data: Any) -> list[RewardQuery]:
        request = self.validate(ScoreRequest, data)
        queries = [
            RewardQuery(messages=[m.model_dump() for m in q.messages], responses=list(q.responses), meta=q.meta)
            for q in request.queries
        ]
        message_texts = [text for q in queries for m in q.messages for text in m.values()]
        self._check_sizes([r for q in queries for r in q.responses], message_texts)
        return queries

    def openrlhf_request(self, data: Any) -> GetRewardRequest:
        request = self.validate(GetRewardRequest, data)
        n = len(request.query)
        for name, values in (("prompts", request.prompts), ("labels", request.labels)):
            if values is not None and len(values) != n:
                raise BadRequest(400, f"{name} has {len(values)} items but query has {n}")
        if any(not q for q in request.query):
            raise BadRequest(400, f"query[{[bool(q) for q in request.query].index(False)}] is empty")
        self._check_sizes(request.query, request.prompts or [])
        return request

    def _check_sizes(self, items: Sequence[str], other_texts: Sequence[str]) -> None:
        if len(items) > self.limits.max_items_per_request:
            raise BadRequest(413, f"{len(items)} items in one request; the limit is "
                                  f"{self.limits.max_items_per_request}: split it")
        for text in (*items, *other_texts):
            if len(text) > self.limits.max_text_chars:
                raise BadRequest(413, f"a text of {len(text)} characters exceeds the limit of "
                                      f"{self.limits.max_text_chars}")
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise BadRequest(400, f"a text is not valid UTF-8 (lone surrogate in {text[:40]!r})") from None


def queries_from_openrlhf(request: GetRewardRequest) -> list[RewardQuery]:
    """OpenRLHF's (prompt + response, prompt) strings as our queries, the rendered prompt as one user turn and the
    label as meta["label"]. Consecutive samples of one prompt become one query, so judges compare them."""
    if request.prompts is None:
        raise BadRequest(400, "this server's reward kind needs the conversation: send 'prompts' with 'query'")
    queries: list[RewardQuery] = []
    labels = request.labels or [None] * len(request.query)
    for i, (text, prompt, label) in enumerate(zip(request.query, request.prompts, labels)):
        if not text.startswith(prompt):
            raise BadRequest(400, f"query[{i}] does not start with prompts[{i}]")
        meta = {} if label is None else {"label": label}
        if queries and queries[-1].messages[0]["content"] == prompt and queries[-1].meta == meta:
            queries[-1].responses.append(text[len(prompt):])
        else:
            queries.append(RewardQuery([{"role": "user", "content": prompt}], [text[len(prompt):]], meta))
    return queries


# -- the app ---------------------------------------------------------------------------------------------------

def build_app(pool: ReplicaPool, model: NamedRewardModel, cfg: RewardConfig, replicas: int,
              token: str | None) -> FastAPI:
    """The FastAPI app over a replica pool; `model` is one replica, asked what it can do."""
    app = FastAPI(title="rlhf-loop reward server", docs_url=None, redoc_url=None, openapi_url=None)
    parser = RequestParser(cfg.server)
    text_capable = isinstance(model, TextRewardModel)
    info = {
        "kind": cfg.kind,
        "model": cfg.model_path or cfg.function or cfg.remote.url or [c.name for c in cfg.components],
        "objectives": list(model.objectives),
        "replicas": replicas,
        "batch_size": cfg.batch_size,
        "max_items_per_request": cfg.server.max_items_per_request,
        "max_text_chars": cfg.server.max_text_chars,
        "max_request_bytes": cfg.server.max_request_bytes,
        "max_json_depth": cfg.server.max_json_depth,
        "max_queued_requests": cfg.server.max_queued_requests,
        "request_timeout_s": cfg.server.request_timeout_s,  # clients wait at least this long (reward/remote.py)
    }

    def error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
        headers = {**(headers or {}), **({"WWW-Authenticate": "Bearer"} if status == 401 else {})}
        return JSONResponse({"detail": message}, status_code=status, headers=headers)

    def server_error(status: int, what: str, headers: dict[str, str] | None = None) -> JSONResponse:
        """A 5xx that names the kind of failure and a request id to find the details in the log, and nothing else:
        exception texts carry paths and internals that are no business of the client."""
        request_id = secrets.token_hex(8)
        if status == 500:
            log.exception("request %s: %s", request_id, what)
        else:  # overload and timeouts: no traceback to keep
            log.warning("request %s: %s", request_id, what)
        return error(status, f"{what} (request id {request_id}; the server's log has the details)",
                     {**(headers or {}), "X-Request-ID": request_id})

    def authorized(request: Request) -> bool:
        if token is None:
            return True
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(given.encode(), token.encode())

    async def scored(job: Job):
        try:
            future = pool.submit(job)
        except QueueFull:
            raise BadRequest(503, "the server is overloaded: retry later",
                             {"Retry-After": str(cfg.server.retry_after_s)}) from None
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), cfg.server.request_timeout_s)
        except asyncio.TimeoutError:  # cancels the job too, if no replica has taken it yet
            raise BadRequest(504, f"scoring took longer than {cfg.server.request_timeout_s} s") from None

    async def handle(request: Request, answer) -> JSONResponse:
        """Auth, parsing and error mapping shared by the scoring endpoints; `answer(data)` does the rest."""
        if not authorized(request):
            return error(401, "missing or wrong bearer token: send 'Authorization: Bearer <token>'")
        try:
            return JSONResponse(await answer(await parser.read_json(request)))
        except BadRequest as e:
            if e.status >= 500:
                return server_error(e.status, str(e), e.headers)
            return error(e.status, str(e), e.headers)
        except UserError as e:  # e.g. a user function's NaN: the sample's fault, not the server's
            return error(422, str(e))
        except Exception:
            return server_error(500, "scoring failed")

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/info")
    async def get_info(request: Request):
        if not authorized(request):
            return error(401, "missing or wrong bearer token: send 'Authorization: Bearer <token>'")
        return {**info, "queued": pool.waiting}

    @app.post("/score")
    async def score(request: Request):
        async def answer(data):
            results = await scored(Job(queries=parser.score_queries(data)))
            return {"results": [{"scores": r.scores, "objectives": r.objectives} for r in results]}
        return await handle(request, answer)

    @app.post("/get_reward")
    async def get_reward(request: Request):
        async def answer(data):
            openrlhf = parser.openrlhf_request(data)
            if text_capable:
                result = await scored(Job(texts=list(openrlhf.query)))
                rewards, extra = result.scores, result.objectives
            else:
                results = await scored(Job(queries=queries_from_openrlhf(openrlhf)))
                rewards = [s for r in results for s in r.scores]
                extra = {name: [v for r in results for v in r.objectives[name]] for name in model.objectives}
            return {"rewards": rewards, "scores": rewards, "extra_logs": extra}
        return await handle(request, answer)

    return app


# -- running it ------------------------------------------------------------------------------------------------

def _start(cfg: RewardConfig, host: str, replicas: int, token: str | None, device: str):
    """Check the exposure rule, then load the replicas (start-up errors surface here) and build the app."""
    from reward.registry import build_reward_model

    if replicas < 1:
        raise UserError(f"--replicas must be >= 1, got {replicas}")
    if token is not None and not token:
        raise UserError("the token is empty; give a long random string")
    if token is None and not is_loopback(host):
        raise UserError(f"serving on {host} (beyond loopback) needs a bearer token: set RLHF_LOOP_REWARD_TOKEN "
                        "(e.g. to `python -c 'import secrets; print(secrets.token_urlsafe(32))'`)")
    models = [build_reward_model(cfg, device_for(device, i)) for i in range(replicas)]
    pool = ReplicaPool(models, cfg.batch_size, cfg.server.max_batch_wait_ms / 1000, cfg.server.max_queued_requests)
    return pool, build_app(pool, models[0], cfg, replicas, token)


def device_for(device: str, replica: int) -> str:
    """"auto": CUDA when available; replicas go round-robin over the visible GPUs."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and torch.cuda.device_count() > 1:
        return f"cuda:{replica % torch.cuda.device_count()}"
    return device


def serve(cfg: RewardConfig, host: str = "127.0.0.1", port: int = 8000, replicas: int = 1,
          token: str | None = None, device: str = "auto", access_log: bool = False) -> None:
    """Serve `cfg` until interrupted (blocking). A token is required when `host` is not a loopback address.

    The access log is off by default: a busy loop sends thousands of small requests, and errors are logged anyway.
    """
    import uvicorn

    pool, app = _start(cfg, host, replicas, token, device)
    try:
        uvicorn.run(app, host=host, port=port, log_level="info", access_log=access_log, timeout_graceful_shutdown=5)
    finally:
        pool.close()


@contextlib.contextmanager
def running_server(cfg: RewardConfig, host: str = "127.0.0.1", port: int = 0, replicas: int = 1,
                   token: str | None = None, device: str = "cpu") -> Iterator[str]:
    """The server in a background thread for tests and benchmarks; yields its base URL, stops it on exit."""
    pool, app = _start(cfg, host, replicas, token, device)
    try:
        with background(app, host, port) as url:
            yield url
    finally:
        pool.close()


@contextlib.contextmanager
def background(app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Any ASGI app served by uvicorn in a thread (port 0: a free one); yields the base URL."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, name="reward-server", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start on {host}:{port}")
            time.sleep(0.01)
        yield f"http://{host}:{server.servers[0].sockets[0].getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
