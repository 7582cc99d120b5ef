"""The run configuration: typed dataclasses hold every default; YAML files and `key=value` overrides merge over them.

    cfg = load_config("configs/tiny.yaml", ["rollout.samples_per_prompt=4"])

A YAML file may build on another with a top-level `base: other.yaml` (path relative to the file); its own keys win.

Unknown keys, wrong types and values out of range raise `ConfigError` naming the key and the file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from policy.config import EnvironmentConfig, PolicyConfig, RolloutConfig, SFTConfig, TrainConfig, failed
from reward.config import RewardConfig, reward_config_problems
from rlhf_loop.common.config_files import structured_config, yaml_layers
from rlhf_loop.common.errors import ConfigError
from rlhf_loop.toy.assets import ToyTaskConfig
from rlhf_loop.toy.smollm2 import SmolLM2Config


@dataclass
class DataConfig:
    # One dataset used by every iteration, or one per iteration (RLHFlow draws fresh prompts each round).
    # Each is a HF hub dataset name or a local .json/.jsonl/.parquet file.
    prompts: list[str] = field(default_factory=list)
    split: str = "train"  # dataset split, for hub datasets
    prompt_column: str = "prompt"  # a list of chat messages, or a plain string (made into one user turn)
    prompts_per_iteration: int | None = None  # with one dataset: iteration i takes the i-th slice of this size
    max_prompt_tokens: int = 512  # prompts longer than this (after the chat template) are skipped and counted
    shuffle: bool = True  # shuffle the prompt set once, with the run seed, before slicing


# The names pair selection (rlhf_loop/driver/pairs.py) implements, here so the config checks them without importing
# the driver: max_min (best vs worst), max_random, random; and the ways of picking several pairs per prompt.
PAIR_STRATEGIES = ("max_min", "max_random", "random")
PAIR_MULTI = ("best_vs_worst", "top_vs_bottom")


@dataclass
class PairsConfig:
    strategy: str = "max_min"  # one of PAIR_STRATEGIES; see rlhf_loop/driver/pairs.py
    min_margin: float = 0.0  # keep a pair only if chosen beats rejected by more than this (so ties are dropped)
    per_prompt: int = 1  # pairs per prompt; above 1 they are picked by pairs.multi (strategy stays max_min)
    # with per_prompt N > 1: best_vs_worst (the best response against each of the N worst) | top_vs_bottom (the i-th
    # best against the i-th worst, i = 1..N; needs 2N <= K)
    multi: str = "best_vs_worst"
    # Offline DPO: train on this preference dataset (hub name or local file with chosen/rejected conversations)
    # instead of generating and scoring; then no rollout engine or reward model is started.
    dataset: str | None = None
    dataset_split: str = "train"  # split of pairs.dataset
    export_format: str = "none"  # also write each iteration's pairs as a DPO dataset: none | disk | parquet
    export_test_fraction: float = 0.02  # share of exported pairs held out as the "test" split
    push_to_hub: str | None = None  # a hub repo id to push the exported pairs dataset to
    push_to_hub_private: bool = True  # create that repo private; set false to publish the pairs

    def problems(self) -> list[str]:
        """Checks of this section alone; how many pairs K responses allow is RunConfig's (it needs rollout)."""
        return failed([
            (self.strategy in PAIR_STRATEGIES,
             f"pairs.strategy {self.strategy!r} is unknown; use one of {sorted(PAIR_STRATEGIES)}"),
            (self.min_margin >= 0, f"pairs.min_margin must be >= 0, got {self.min_margin}"),
            (self.per_prompt >= 1, f"pairs.per_prompt must be >= 1, got {self.per_prompt}"),
            (self.multi in PAIR_MULTI, f"pairs.multi {self.multi!r} is unknown; use one of {list(PAIR_MULTI)}"),
            (self.per_prompt == 1 or self.strategy == "max_min",
             f"pairs.per_prompt > 1 picks pairs by pairs.multi; leave pairs.strategy at max_min (got {self.strategy})"),
            (self.export_format in ("none", "disk", "parquet"),
             f"pairs.export_format must be none, disk or parquet, got {self.export_format!r}"),
            (0 <= self.export_test_fraction < 1,
             f"pairs.export_test_fraction must be in [0, 1), got {self.export_test_fraction}"),
        ])


@dataclass
class EvalConfig:
    prompts: str | None = None  # held-out prompt dataset (hub name or local file); None: no evaluation
    prompt_column: str = "${data.prompt_column}"  # like data.prompt_column
    split: str = "train"  # dataset split, for hub datasets
    num_prompts: int = 64  # at most this many held-out prompts
    samples_per_prompt: int = 1  # responses sampled per prompt: more samples, less noise in every eval/ mean
    temperature: float = 1.0  # of the eval/ samples (with rollout.top_p); kl/ref samples at 1 and top_p 1 anyway
    max_tokens: int = "${rollout.max_tokens}"  # type: ignore[assignment]
    gold_reward: str | None = None  # "module:attr" of a gold scorer (toy tasks): fn(messages, response, meta) -> float

    def problems(self) -> list[str]:
        return failed([
            (self.num_prompts >= 1, f"eval.num_prompts must be >= 1, got {self.num_prompts}"),
            (self.samples_per_prompt >= 1, f"eval.samples_per_prompt must be >= 1, got {self.samples_per_prompt}"),
        ])


@dataclass
class WandbConfig:
    mode: str = "disabled"  # disabled | offline | online
    project: str | None = None  # wandb project; None: $WANDB_PROJECT, else rlhf-loop
    entity: str | None = None  # wandb team or user; None: $WANDB_ENTITY, else your default
    name: str | None = None  # default: the run directory's name
    tags: list[str] = field(default_factory=list)  # wandb tags

    @property
    def resolved_project(self) -> str:
        return self.project or os.environ.get("WANDB_PROJECT") or "rlhf-loop"

    @property
    def resolved_entity(self) -> str | None:
        return self.entity or os.environ.get("WANDB_ENTITY")

    def problems(self) -> list[str]:
        return failed([(self.mode in ("disabled", "offline", "online"),
                        f"wandb.mode must be disabled, offline or online, got {self.mode!r}")])


PLACEMENT_STRATEGIES = ("pack", "spread", "strict_pack", "strict_spread")  # Ray's, in lower case


@dataclass
class RolePlacement:
    """Where one role's actors go on the Ray cluster (each actor gets one bundle of a placement group)."""

    # a custom resource that marks the nodes this role may use (a node started with
    # `ray start --resources='{"gpu_node_a": 1}'` has gpu_node_a); None: any node
    resource: str | None = None
    strategy: str = "pack"  # how the role's actors spread over those nodes: pack | spread | strict_pack | strict_spread


@dataclass
class PlacementConfig:
    rollout: RolePlacement = field(default_factory=RolePlacement)  # the rollout engines
    learner: RolePlacement = field(default_factory=RolePlacement)  # the DPO learner's ranks
    reward: RolePlacement = field(default_factory=RolePlacement)  # the reward actor
    # every role's actors are reserved before any starts; a layout not placed within this stops the run naming the role
    timeout_s: float = 60.0

    def problems(self) -> list[str]:
        checks = [(self.timeout_s > 0, f"cluster.placement.timeout_s must be > 0, got {self.timeout_s}")]
        for role in ("rollout", "learner", "reward"):
            strategy = getattr(self, role).strategy
            checks.append((strategy in PLACEMENT_STRATEGIES, f"cluster.placement.{role}.strategy must be one of "
                                                             f"{', '.join(PLACEMENT_STRATEGIES)}, got {strategy!r}"))
        return failed(checks)


@dataclass
class ClusterConfig:
    address: str | None = None  # an existing Ray cluster ("auto" or host:port; else $RAY_ADDRESS); None: a local one
    node_ip_address: str | None = None  # this machine's address in the cluster; None: the Ray node's on this machine
    connect_timeout_s: float = 10.0  # joining `address` (reaching it, then ray.init) ends within this, or one line
    num_cpus: int | None = None  # CPUs for a local Ray instance; None: all of them
    # torch threads of every actor (OMP_NUM_THREADS). None: on a local cluster, $OMP_NUM_THREADS if set, else
    # num_cpus (all cores: the stages take turns, so each may use them all); on a joined cluster, what its nodes give
    # (Ray: 1 for an actor that reserves less than a core). A number also reaches a joined cluster's actors.
    threads_per_actor: int | None = None
    max_actor_restarts: int = 3  # a dead rollout or reward actor is restarted this often, its work redone
    placement: PlacementConfig = field(default_factory=PlacementConfig)  # which nodes each role uses
    # CUDA only: each learner rank shares its GPU with one rollout engine (and GPU 0 with the reward model, when it
    # runs a network); the engines sleep (weights to host memory, KV cache dropped) while the learner trains
    colocate: bool = False
    # on a cluster the run joins (cluster.address): the rollout engines and the reward actor outlive the run, and the
    # next run with the same settings takes them over instead of starting its own (imports and model builds skipped);
    # `rlhf-loop cluster release` stops them (docs/cluster.md)
    keep_warm: bool = False

    def problems(self) -> list[str]:
        return failed([(not (self.keep_warm and self.colocate),
                        "cluster.keep_warm does not combine with cluster.colocate (the colocated engines share the "
                        "GPUs of a learner that ends with each run); set one of them to false"),
                       (self.max_actor_restarts >= 0,
                         f"cluster.max_actor_restarts must be >= 0, got {self.max_actor_restarts}"),
                        (self.connect_timeout_s > 0,
                         f"cluster.connect_timeout_s must be > 0, got {self.connect_timeout_s}"),
                        (self.threads_per_actor is None or self.threads_per_actor >= 1,
                         f"cluster.threads_per_actor must be >= 1 (or null for the default), got "
                         f"{self.threads_per_actor}")]) \
            + self.placement.problems()


@dataclass
class RunConfig:
    iterations: int = 3  # rounds of generate -> score -> pair -> train -> sync
    seed: int = 0  # one seed drives prompt order, sampling, pair choice and training order
    device: str = "auto"  # auto (cuda when available) | cpu | cuda
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    environment: EnvironmentConfig = field(default_factory=EnvironmentConfig)  # multi-turn episodes; off by default
    reward: RewardConfig = field(default_factory=RewardConfig)
    pairs: PairsConfig = field(default_factory=PairsConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    toy_task: ToyTaskConfig = field(default_factory=ToyTaskConfig)  # builds the bundled toy task's assets (demo)
    smollm2: SmolLM2Config = field(default_factory=SmolLM2Config)  # converts SmolLM2-135M-Instruct (demo-real)

    @property
    def online(self) -> bool:
        """Online DPO samples and scores its pairs; offline DPO (pairs.dataset set) trains on a given preference
        dataset and starts no rollout engine and no reward model."""
        return self.pairs.dataset is None

    @property
    def max_model_len(self) -> int:
        """The engines' context: rollout.max_model_len, or the longest prompt plus the longest response any stage
        asks for (with an environment, the longest episode)."""
        longest = max(self.rollout.max_tokens, self.eval.max_tokens)
        if self.environment.enabled:
            longest = max(longest, self.environment.max_episode_tokens)
        return self.rollout.max_model_len or self.data.max_prompt_tokens + longest

    @property
    def evaluates(self) -> bool:
        """Evaluation needs held-out prompts (eval.prompts), sampled responses and a learner for the KL estimate."""
        return self.online and self.train.enabled and self.eval.prompts is not None

    def policy_version(self, iteration: int) -> int:
        """The iteration whose trained weights sample `iteration`'s responses (0: pi_0): the one before it, or under
        rollout.max_staleness 1 the one before that. Without train.enabled nothing moves: pi_0 throughout."""
        return max(iteration - 1 - self.rollout.max_staleness, 0) if self.train.enabled else 0

    @property
    def sync_block_prompts(self) -> int | None:
        """train.sync_every_steps (semi-online): the prompts sampled for each block of s steps, s x the global batch
        over pairs.per_prompt (a prompt whose responses all tie gives no pair, so a block may train fewer steps);
        None without it."""
        steps = self.train.sync_every_steps
        return None if steps is None else steps * self.train.global_batch_size // self.pairs.per_prompt

    def problems(self) -> list[str]:
        """Value checks the type system cannot express, each naming the key and a fix: the run's own and those
        across sections here, then each section's (beside its dataclass)."""
        run = failed([
            (self.iterations >= 1, f"iterations must be >= 1, got {self.iterations}"),
            (self.device in ("auto", "cpu", "cuda"), f"device must be auto, cpu or cuda, got {self.device!r}"),
            (len(self.data.prompts) >= 1 or not self.online,
             "data.prompts is empty; give at least one dataset name or file (or pairs.dataset for offline DPO)"),
            (self.online or self.iterations == 1,
             f"pairs.dataset (offline DPO) runs one iteration; set iterations: 1 (got {self.iterations})"),
            (len(self.data.prompts) in (0, 1, self.iterations),
             f"data.prompts has {len(self.data.prompts)} entries; give one, or one per iteration ({self.iterations})"),
        ])
        sections = [self.policy, self.rollout, self.environment, self.pairs, self.train, self.sft, self.eval,
                    self.wandb, self.cluster, self.toy_task]
        across = failed([
            (self.pairs.per_prompt <= max_pairs_per_prompt(self),
             f"pairs.per_prompt {self.pairs.per_prompt} is more than {self.pairs.multi} can pick from "
             f"rollout.samples_per_prompt {self.rollout.samples_per_prompt}; use at most {max_pairs_per_prompt(self)}"),
            (self.train.enabled or self.online,
             "pairs.dataset (offline DPO) needs train.enabled: true; there is nothing else to do with its pairs"),
            (not (self.cluster.keep_warm and self.sft.enabled),
             "cluster.keep_warm keeps engines that were built from pi_0 for the next run, and sft.enabled makes a new "
             "pi_0 in every run directory; set one of them to false"),
            (not self.environment.enabled or self.online,
             "environment.factory runs episodes, which offline DPO (pairs.dataset) never samples; unset one of them"),
            (not self.environment.enabled
             or self.environment.max_episode_tokens >= max(self.rollout.max_tokens, self.eval.max_tokens),
             f"environment.max_episode_tokens ({self.environment.max_episode_tokens}) leaves no room for one turn of "
             f"rollout.max_tokens / eval.max_tokens ({max(self.rollout.max_tokens, self.eval.max_tokens)}); raise it"),
        ])
        if self.train.sync_every_steps is not None:
            semi_online = "train.sync_every_steps (semi-online) syncs the engines within an iteration"
            across += failed([
                (self.online and self.train.enabled,
                 f"{semi_online}: it needs sampled pairs and training; unset it with pairs.dataset or train.enabled "
                 "false"),
                (self.rollout.max_staleness == 0,
                 f"{semi_online}, from the weights just trained; set rollout.max_staleness: 0"),
                (self.sync_block_prompts >= 1 or self.train.sync_every_steps < 1,  # that one: train's own check
                 f"{semi_online} every s x global batch pairs, fewer than pairs.per_prompt {self.pairs.per_prompt} "
                 "gives each block no prompt; raise train.sync_every_steps"),
            ])
        # Offline DPO starts no reward model, so its reward section is not checked.
        reward = reward_config_problems(self.reward) if self.online else []
        return run + [problem for section in sections for problem in section.problems()] + across + reward


def load_config(path: str | os.PathLike, overrides: list[str] = ()) -> RunConfig:
    """Merge a YAML file and `key=value` overrides over the defaults, then validate."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass a YAML file such as configs/tiny.yaml")
    for override in overrides:
        if "=" not in override:
            raise ConfigError(f"override {override!r} is not key=value; write e.g. rollout.samples_per_prompt=4")
    return structured_config(RunConfig, yaml_layers(path), overrides, path, RunConfig.problems)


def max_pairs_per_prompt(cfg: RunConfig) -> int:
    """How many pairs pairs.multi can pick among K responses: the best against K - 1 others, or K // 2 disjoint."""
    samples = cfg.rollout.samples_per_prompt
    return samples // 2 if cfg.pairs.multi == "top_vs_bottom" else samples - 1


def to_yaml(cfg: RunConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
