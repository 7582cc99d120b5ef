"""Configuration of the reward model. Every default lives here; YAML overrides them.

The kinds (see reward/__init__.py) share one section; each reads the fields its comment names:

    reward: {kind: bradley_terry, model_path: sfairXC/FsfairX-LLaMA3-RM-v0.1}
    reward: {kind: function, function: my_rewards.py:exact_match}
    reward: {kind: remote, remote: {url: "http://10.0.0.5:8000"}}
"""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import MISSING

from rlhf_loop.common.hf_models import DTYPE_NAMES
from rlhf_loop.common.user_code import is_code_reference

# reward/registry.py builds each
KINDS = ("bradley_terry", "armorm", "pairwise", "function", "combined", "remote", "outcome")
MODEL_KINDS = frozenset({"bradley_terry", "armorm", "pairwise"})  # kinds that load a network (and want a GPU)
PAIRWISE_RANKINGS = ("all_pairs", "tournament")
NORMALIZATIONS = ("none", "zscore")
REMOTE_PROTOCOLS = ("rlhf_loop", "openrlhf")


@dataclass
class PairwiseConfig:
    """kind pairwise: a causal-LM judge that says which of two responses is better."""

    # all_pairs: every response meets every other, K(K-1)/2 comparisons, score = mean win probability;
    # tournament: a knockout bracket, K-1 comparisons, score = round reached (ties broken by the last match)
    ranking: str = "all_pairs"
    # what the judge reads as its user turn (RLHFlow's pair-preference format); {context} is the conversation
    template: str = "[CONTEXT] {context} [RESPONSE A] {response_a} [RESPONSE B] {response_b} \n"
    token_a: str = "A"  # the answer meaning "response A is better"; token_a and token_b must each be one token
    token_b: str = "B"  # the answer meaning "response B is better"
    temperature: float = 1.0  # softmax temperature over the logits of token_a and token_b


@dataclass
class RemoteConfig:
    """kind remote: an HTTP reward server (`rlhf-loop serve-reward`, or one speaking OpenRLHF's protocol)."""

    url: str | None = None  # the server's base URL, e.g. http://10.0.0.5:8000 (no path)
    # rlhf_loop: POST /score with messages and responses | openrlhf: POST /get_reward with rendered text, which needs
    # reward.model_path: the tokenizer whose chat template renders the prompt and response into one string
    protocol: str = "rlhf_loop"
    label_column: str | None = None  # openrlhf: the prompt's dataset column sent as `labels`; None sends nulls
    token_env: str = "RLHF_LOOP_REWARD_TOKEN"  # environment variable holding the bearer token (kept out of configs)
    concurrency: int = 4  # requests in flight at once
    # per request; our server's own limit (server.request_timeout_s, read from its /info) stretches it when longer
    timeout_s: float = 120.0
    max_retries: int = 3  # extra attempts after a connection error, a timeout, a 429 or a 5xx
    # wait before retry n: backoff_s * 2**(n-1), at least the server's Retry-After, times a random 1 to 1.5
    backoff_s: float = 1.0
    max_retry_after_s: float = 30.0  # a server's Retry-After longer than this is cut to it


@dataclass
class ServerConfig:
    """`rlhf-loop serve-reward`: limits that keep one bad client from hurting the others."""

    max_request_bytes: int = 8 * 1024 * 1024  # larger bodies get 413
    max_items_per_request: int = 1024  # responses (or OpenRLHF queries) per request
    max_text_chars: int = 200_000  # characters per string (message, response, query)
    # a request still unscored after this (queueing included) gets 504; below the clients' remote.timeout_s, so
    # they get the 504 and the request leaves the queue, instead of timing out while the server still works on it
    request_timeout_s: float = 90.0
    max_batch_wait_ms: float = 0.0  # how long a replica waits for more requests to fill its batch
    max_json_depth: int = 32  # bodies whose arrays and objects nest deeper get 400 (checked before parsing)
    max_queued_requests: int = 256  # requests waiting for a replica; beyond this new ones get 503 with Retry-After
    retry_after_s: int = 1  # the Retry-After (seconds) a 503 carries


@dataclass
class RewardComponent:
    """One term of kind combined: weight x (normalised) score of a reward of any kind."""

    name: str = MISSING  # names its scores in the logged objectives
    weight: float = 1.0
    reward: RewardConfig = MISSING


@dataclass
class RewardConfig:
    # bradley_terry | armorm | pairwise | function | combined | remote (docs/rewards.md) | outcome (an episode's
    # environment outcome, docs/environments.md)
    kind: str = "bradley_terry"
    model_path: str | None = None  # HF hub id or local directory of the reward model (or judge, or tokenizer)
    trust_remote_code: bool = False  # required (and only honoured) for models with custom modeling code
    batch_size: int = 16  # (prompt, response) sequences per forward pass; responses per request for remote
    # tokens per rendered sequence; longer ones keep their last max_length tokens (the first one, BOS, stays):
    # the prompt is cut from the left, and the end of the response, where the score is read, always survives
    max_length: int = 2048
    dtype: str = "auto"  # auto (bfloat16 on CUDA, float32 on CPU) | float32 | bfloat16 | float16
    num_gpus: float = 1.0  # GPUs reserved for the reward actor when running on CUDA (ignored on CPU)
    shard_size: int = 64  # prompts per scoring shard: the unit of work that a crash can cost
    call_timeout_s: float = 3600.0  # scoring one shard taking longer stops the run as hung
    objectives: list[str] = field(default_factory=list)  # armorm: names of the per-objective outputs, in order
    # function: "path/to/file.py:name" or "package.module:name" (the last ":" splits the attribute off)
    function: str | None = None
    # function: false: fn(messages, response, meta) -> float per sample; true: fn(list of messages, list of
    # responses, list of metas) -> list of floats for a whole batch of batch_size samples
    function_batched: bool = False
    components: list[RewardComponent] = field(default_factory=list)  # combined: the weighted terms
    missing_outcome: float = 0.0  # outcome: the score of an episode its environment gave no outcome
    normalize: str = "none"  # combined: none | zscore (each term standardised across the K responses of a prompt)
    pairwise: PairwiseConfig = field(default_factory=PairwiseConfig)
    remote: RemoteConfig = field(default_factory=RemoteConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    # multi-objective models (armorm, combined, ...): the score becomes sum of weight x objective score over these
    # objectives (objective name -> weight), in place of the model's own aggregate; empty keeps the model's score
    objective_weights: dict[str, float] = field(default_factory=dict)
    # score -= length_penalty x response tokens (of an episode, the policy's own) where the loop scores its rollouts
    # (pairs and eval see the penalised score; the raw one is kept beside it); 0 is off
    length_penalty: float = 0.0


def reward_config_problems(cfg: RewardConfig, key: str = "reward") -> list[str]:
    """Value checks for the reward section; each names the key and a fix."""
    checks = [
        (cfg.kind in KINDS, f"{key}.kind {cfg.kind!r} is unknown; use one of {sorted(KINDS)}"),
        (cfg.batch_size >= 1, f"{key}.batch_size must be >= 1, got {cfg.batch_size}"),
        (cfg.shard_size >= 1, f"{key}.shard_size must be >= 1, got {cfg.shard_size}"),
        (cfg.max_length >= 8, f"{key}.max_length must be >= 8, got {cfg.max_length}"),
        (cfg.dtype in DTYPE_NAMES, f"{key}.dtype must be one of {list(DTYPE_NAMES)}, got {cfg.dtype!r}"),
        (cfg.num_gpus >= 0, f"{key}.num_gpus must be >= 0, got {cfg.num_gpus}"),
        (cfg.call_timeout_s > 0, f"{key}.call_timeout_s must be > 0, got {cfg.call_timeout_s}"),
        (cfg.kind not in MODEL_KINDS or cfg.model_path is not None,
         f"{key}.model_path is required for kind {cfg.kind}; give a local directory or a hub id"),
        (cfg.kind != "function" or is_code_reference(cfg.function),
         f"{key}.function must be 'file.py:name' or 'package.module:name' for kind function, got {cfg.function!r}"),
        (cfg.kind != "combined" or len(cfg.components) >= 1,
         f"{key}.components is empty; kind combined needs at least one component"),
        (len({c.name for c in cfg.components}) == len(cfg.components),
         f"{key}.components have repeated names; give each a unique name"),
        (cfg.normalize in NORMALIZATIONS,
         f"{key}.normalize must be one of {list(NORMALIZATIONS)}, got {cfg.normalize!r}"),
        (cfg.length_penalty >= 0, f"{key}.length_penalty must be >= 0, got {cfg.length_penalty}"),
        (key == "reward" or (cfg.length_penalty == 0 and not cfg.objective_weights),
         f"{key} sets length_penalty or objective_weights, which apply to the whole reward only; set them on reward"),
    ]
    problems = [message for ok, message in checks if not ok]
    if cfg.kind == "pairwise":
        problems += _pairwise_problems(cfg.pairwise, f"{key}.pairwise")
    if cfg.kind == "remote":
        problems += _remote_problems(cfg, key)
    problems += _server_problems(cfg.server, f"{key}.server")
    for i, component in enumerate(cfg.components):
        problems += reward_config_problems(component.reward, f"{key}.components[{i}].reward")
    return problems


def _pairwise_problems(cfg: PairwiseConfig, key: str) -> list[str]:
    checks = [
        (cfg.ranking in PAIRWISE_RANKINGS,
         f"{key}.ranking must be one of {list(PAIRWISE_RANKINGS)}, got {cfg.ranking!r}"),
        (cfg.temperature > 0, f"{key}.temperature must be > 0, got {cfg.temperature}"),
        (cfg.token_a != cfg.token_b, f"{key}.token_a and token_b must differ, both are {cfg.token_a!r}"),
    ]
    problems = [message for ok, message in checks if not ok]
    for placeholder in ("{context}", "{response_a}", "{response_b}"):
        if placeholder not in cfg.template:
            problems.append(f"{key}.template lacks {placeholder}; it needs {{context}}, {{response_a}}, {{response_b}}")
    return problems


def _remote_problems(cfg: RewardConfig, parent: str) -> list[str]:
    remote, key = cfg.remote, f"{parent}.remote"
    checks = [
        (remote.url is not None and remote.url.startswith(("http://", "https://")),
         f"{key}.url must be an http:// or https:// base URL for kind remote, got {remote.url!r}"),
        (remote.protocol in REMOTE_PROTOCOLS,
         f"{key}.protocol must be one of {list(REMOTE_PROTOCOLS)}, got {remote.protocol!r}"),
        (remote.protocol != "openrlhf" or cfg.model_path is not None,
         f"{key}.protocol openrlhf sends rendered text: set {parent}.model_path to the tokenizer that renders it"),
        (remote.concurrency >= 1, f"{key}.concurrency must be >= 1, got {remote.concurrency}"),
        (remote.timeout_s > 0, f"{key}.timeout_s must be > 0, got {remote.timeout_s}"),
        (remote.max_retries >= 0, f"{key}.max_retries must be >= 0, got {remote.max_retries}"),
        (remote.backoff_s >= 0, f"{key}.backoff_s must be >= 0, got {remote.backoff_s}"),
        (remote.max_retry_after_s >= 0, f"{key}.max_retry_after_s must be >= 0, got {remote.max_retry_after_s}"),
    ]
    return [message for ok, message in checks if not ok]


def _server_problems(server: ServerConfig, key: str) -> list[str]:
    checks = [
        (server.request_timeout_s > 0, f"{key}.request_timeout_s must be > 0, got {server.request_timeout_s}"),
        # {"queries": [{"messages": [{...}]}]} is 4 levels deep: a smaller limit would refuse every request
        (server.max_json_depth >= 4, f"{key}.max_json_depth must be >= 4, got {server.max_json_depth}"),
        (server.max_queued_requests >= 1,
         f"{key}.max_queued_requests must be >= 1, got {server.max_queued_requests}"),
        (server.retry_after_s >= 0, f"{key}.retry_after_s must be >= 0, got {server.retry_after_s}"),
    ]
    return [message for ok, message in checks if not ok]
