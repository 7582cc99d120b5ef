"""`rlhf-loop plan`: what a config will ask of the cluster, worked out before anything starts.

    report = plan_report(load_config("configs/recipes/rlhflow_iterative_dpo_llama3_8b.yaml"))
    print(describe_plan(report))

It reads at most each model's config.json (a local directory, or the Hugging Face cache: never the network), so it
runs offline in seconds. Model sizes and memory estimates come from `rlhf_loop.frontend.sizing`; this module adds the checks
and the text.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from policy.losses import LOSSES
from rlhf_loop.common.arithmetic import ceil_div
from rlhf_loop.config import RunConfig, to_yaml
from rlhf_loop.cluster.placement import COLOCATED, CPU_SHARE, Layout, colocation_problems, describe_layout, role_layout
from rlhf_loop.frontend.sizing import (
    GIB,
    ModelSize,
    RolePlan,
    human_bytes,
    learner_role,
    looks_local,
    model_size,
    params,
    reward_models,
    reward_role,
    rollout_role,
    sft_role,
)

# Without a visible GPU the estimates are set against an 80 GiB card (A100/H100 80GB, the recipes' usual hardware).
ASSUMED_GPU_BYTES = 80 * GIB


@dataclass
class PlanReport:
    """Everything `rlhf-loop plan` prints; `problems` non-empty means the run would fail as configured."""

    config_yaml: str  # the resolved config
    device: str  # cuda | cpu, "auto" resolved on this machine
    roles: list[RolePlan]
    global_batch_size: int
    global_batch_formula: str  # micro_batch_size x gradient_accumulation_steps x num_workers, with the numbers
    offline_dpo: bool  # pairs come from pairs.dataset: no prompts, no rollouts
    trains: bool  # train.enabled: a DPO step each iteration
    prompts_per_iteration: int | None  # None: every prompt of the dataset, count unknown until loaded
    responses_per_iteration: int | None
    max_steps_per_iteration: int | None  # upper bound: epochs x ceil(pairs / global batch), at most one pair a prompt
    pair_source: str
    training: str
    models: list[ModelSize]
    gpu_bytes: int  # GPU size the estimates are checked against
    gpu_bytes_source: str
    layout: Layout  # the placement groups the driver reserves before any actor starts
    problems: list[str] = field(default_factory=list)  # the run would fail: fix these first
    warnings: list[str] = field(default_factory=list)  # worth a look

    @property
    def total_gpus(self) -> float:
        """The placement groups' GPUs (colocated roles share theirs), and the SFT warm start's."""
        sft = sum(role.actors * role.gpus_per_actor for role in self.roles if role.role == "sft")
        return sft + sum(bundle.get("GPU", 0.0) for group in self.layout.groups for bundle in group.bundles)



# ---- the report -------------------------------------------------------------------------------------------------

def plan_report(cfg: RunConfig) -> PlanReport:
    from rlhf_loop.cluster.ray_cluster import resolve_device

    device = resolve_device(cfg.device)
    gpu_bytes, gpu_source = gpu_memory(device)
    offline_dpo = not cfg.online
    policy = model_size(cfg.policy.model_path, cfg.policy.trust_remote_code, "causal_lm")
    models = [policy]
    roles = []
    if not offline_dpo:
        roles.append(rollout_role(cfg, device, policy, gpu_bytes))
        rewards = reward_models(cfg.reward)
        models += [size for size, _ in rewards]
        roles.append(reward_role(cfg, device, rewards))
    if cfg.train.enabled:
        roles.append(learner_role(cfg, device, policy))
    if cfg.sft.enabled:
        roles.insert(0, sft_role(cfg, device, policy))
    prompts = None if offline_dpo else cfg.data.prompts_per_iteration
    train = cfg.train
    report = PlanReport(
        config_yaml=to_yaml(cfg),
        device=device,
        roles=roles,
        global_batch_size=train.global_batch_size,
        global_batch_formula=(f"micro_batch_size {train.micro_batch_size} x gradient_accumulation_steps "
                              f"{train.gradient_accumulation_steps} x num_workers {train.num_workers}"),
        offline_dpo=offline_dpo,
        trains=train.enabled,
        prompts_per_iteration=prompts,
        responses_per_iteration=None if prompts is None else prompts * cfg.rollout.samples_per_prompt,
        max_steps_per_iteration=(None if prompts is None or not train.enabled
                                 else train.epochs * ceil_div(prompts * cfg.pairs.per_prompt,
                                                                train.global_batch_size)),
        pair_source=pair_source(cfg),
        training=training_summary(cfg),
        models=models,
        gpu_bytes=gpu_bytes,
        gpu_bytes_source=gpu_source,
        layout=role_layout(cfg, device),
    )
    report.problems += colocation_problems(cfg, device) + path_problems(cfg) + gpu_problems(cfg, device)
    report.problems += local_gpu_problems(cfg, report)
    report.problems += export_problems(cfg)
    report.warnings += gpu_warnings(cfg, device, report) + memory_warnings(report) + data_warnings(cfg)
    report.warnings += truncation_warnings(cfg)
    return report


def pair_source(cfg: RunConfig) -> str:
    if not cfg.online:
        return (f"the preference dataset {cfg.pairs.dataset} (split {cfg.pairs.dataset_split}): offline DPO, "
                f"no generation and no reward model")
    return (f"generation: K={cfg.rollout.samples_per_prompt} samples a prompt scored by {cfg.reward.kind}, "
            + (f"pairs by {cfg.pairs.strategy} (at most one a prompt)" if cfg.pairs.per_prompt == 1
               else f"pairs by {cfg.pairs.multi} (at most {cfg.pairs.per_prompt} a prompt)"))


def training_summary(cfg: RunConfig) -> str:
    train = cfg.train
    if not train.enabled:
        return "no (train.enabled is false): pairs are built and exported only"
    reference = "pi_0, the initial policy" if train.reference == "initial" else "the previous iteration's policy"
    if not LOSSES[train.loss_type].uses_reference:
        reference = "none (reference-free loss)"
    return (f"DPO {train.loss_type}, beta {train.beta}, lr {train.learning_rate:g} {train.lr_schedule}, "
            f"{train.epochs} epoch(s) an iteration, ZeRO-{train.zero_stage}, reference {reference}"
            + (f", LoRA r={train.lora.r} alpha={train.lora.alpha:g}" if train.lora.enabled else ""))


# ---- checks -------------------------------------------------------------------------------------------------------

def path_problems(cfg: RunConfig) -> list[str]:
    """Paths that look local but do not exist. Hub ids are not checked here (that would need the network)."""
    paths = [("policy.model_path", cfg.policy.model_path), ("policy.tokenizer_path", cfg.policy.tokenizer_path),
             ("sft.dataset", cfg.sft.dataset if cfg.sft.enabled else None), ("pairs.dataset", cfg.pairs.dataset),
             ("eval.prompts", cfg.eval.prompts)]
    if cfg.online:
        paths += [(f"data.prompts[{i}]", source) for i, source in enumerate(cfg.data.prompts)]
        paths += reward_paths(cfg.reward, "reward")
    built_later = tuple(section.dir for section in (cfg.toy_task, cfg.smollm2) if section.enabled)
    return [f"{key} {value!r} does not exist; fix the path (a hub id is written owner/name)"
            for key, value in paths
            if value is not None and looks_local(value) and not Path(value).expanduser().exists()
            and not (built_later and value.startswith(built_later))]


def reward_paths(reward, key: str) -> list[tuple[str, str | None]]:
    paths = [(f"{key}.model_path", reward.model_path)]
    if reward.kind == "function" and reward.function and ":" in reward.function:
        location = reward.function.rpartition(":")[0]
        if location.endswith(".py"):
            paths.append((f"{key}.function", location))
    for i, component in enumerate(reward.components):
        paths += reward_paths(component.reward, f"{key}.components[{i}].reward")
    return paths


def gpu_problems(cfg: RunConfig, device: str) -> list[str]:
    """GPU requests the actors cannot be placed with, on CUDA."""
    if device != "cuda":
        return []
    from reward.registry import uses_accelerator

    rollout, problems = cfg.rollout, []
    if cfg.online:
        if rollout.gpus_per_engine > 1 and not float(rollout.gpus_per_engine).is_integer():
            problems.append(f"rollout.gpus_per_engine {rollout.gpus_per_engine} is above 1 but not whole: an engine "
                            f"spans whole GPUs (tensor parallel); use 2, 4, ...")
        elif rollout.gpus_per_engine < 1:
            per_gpu = min(rollout.num_engines, math.floor(1 / rollout.gpus_per_engine))
            if per_gpu * rollout.gpu_memory_utilization > 1:
                problems.append(f"{per_gpu} engines share a GPU (rollout.gpus_per_engine {rollout.gpus_per_engine}) "
                                f"and each takes gpu_memory_utilization {rollout.gpu_memory_utilization} of it: more "
                                f"than the whole GPU; lower rollout.gpu_memory_utilization")
        if uses_accelerator(cfg.reward) and cfg.reward.num_gpus <= 0:
            problems.append("reward.num_gpus is 0 on CUDA: the reward actor would see no GPU; give it a share > 0")
    return problems


def local_gpu_problems(cfg: RunConfig, report: PlanReport) -> list[str]:
    """A local Ray cluster (no cluster.address) has this machine's GPUs only; actors asking for more never start."""
    if report.device != "cuda" or cfg.cluster.address is not None:
        return []
    import torch

    local = torch.cuda.device_count()
    if local and report.total_gpus > local:
        return [f"the actors ask for {report.total_gpus:g} GPUs but a local Ray cluster here has {local}; they would "
                f"wait forever: set cluster.address to a larger cluster or shrink the layout"]
    return []


def gpu_warnings(cfg: RunConfig, device: str, report: PlanReport) -> list[str]:
    if device != "cuda":
        from policy.config import RolloutConfig, TrainConfig
        from reward.config import RewardConfig

        changed = [f"{key} {value}" for key, value, default in (
            ("rollout.gpus_per_engine", cfg.rollout.gpus_per_engine, RolloutConfig.gpus_per_engine),
            ("train.gpus_per_worker", cfg.train.gpus_per_worker, TrainConfig.gpus_per_worker),
            ("reward.num_gpus", cfg.reward.num_gpus, RewardConfig.num_gpus)) if value != default]
        return [f"device is {device}, so {', '.join(changed)} is ignored: every actor runs on CPU"] if changed else []
    import torch

    warnings = nccl_sync_warnings(cfg)
    if not torch.cuda.is_available():
        warnings.append(f"this machine has no CUDA GPU: the plan is for a cluster with {report.total_gpus:g} GPUs")
    return warnings


def nccl_sync_warnings(cfg: RunConfig) -> list[str]:
    """NCCL refuses two ranks of one communicator on the same GPU: the collective weight sync needs the learner's
    rank 0 and every engine on GPUs of their own, which shares below 1 do not promise."""
    shared = [f"{key} {value:g}" for key, value in (("rollout.gpus_per_engine", cfg.rollout.gpus_per_engine),
                                                    ("train.gpus_per_worker", cfg.train.gpus_per_worker)) if value < 1]
    if not (cfg.online and cfg.train.enabled and cfg.rollout.weight_sync == "collective" and shared):
        return []
    return [f"{', '.join(shared)}: Ray may put the learner and an engine on one GPU, where the NCCL weight sync "
            f"(rollout.weight_sync collective) cannot run; for shared GPUs set rollout.weight_sync=object_store"]


def memory_warnings(report: PlanReport) -> list[str]:
    """Actors whose estimate does not fit the memory they get (on CUDA: their GPU share of `report.gpu_bytes`)."""
    warnings = [f"{role.role}: {role.memory.shortfall}" for role in report.roles if role.memory.shortfall]
    if report.device != "cuda":
        return warnings
    warnings += shared_gpu_warnings(report)
    for role in report.roles:
        needed = role.memory.bytes_per_actor
        if needed is None or role.gpus_per_actor <= 0 or role.role == "rollout":  # vLLM sizes itself to its share
            continue
        available = report.gpu_bytes * role.gpus_per_actor
        if needed > available:
            warnings.append(f"{role.role}: about {human_bytes(needed)} an actor before activations, more than its "
                            f"{human_bytes(available)} of GPU ({report.gpu_bytes_source}); use more workers, a "
                            f"higher ZeRO stage, or more GPUs")
    return warnings


def shared_gpu_warnings(report: PlanReport) -> list[str]:
    """Roles with GPU shares below 1 may be packed onto one GPU by Ray; then their memory adds up (vLLM's is its
    gpu_memory_utilization of the whole GPU)."""
    colocated = {role for group in report.layout.groups if group.name == COLOCATED for role in group.roles}
    sharing = [role for role in report.roles
               if role.role in colocated or (0 < role.gpus_per_actor < 1 and role.role != "sft")]
    sizes = [role.memory.bytes_per_actor for role in sharing]
    if len(sharing) < 2 or None in sizes or sum(sizes) <= report.gpu_bytes:
        return []
    parts = " + ".join(f"{role.role} {human_bytes(bytes_)}" for role, bytes_ in zip(sharing, sizes, strict=True))
    why = ("share a GPU (cluster.colocate; the learner keeps its memory while the engines generate)" if colocated
           else "take GPU shares below 1, so Ray may put one of each on the same GPU")
    return [f"{', '.join(role.role for role in sharing)} {why}: {parts} = {human_bytes(sum(sizes))}, more than "
            f"{human_bytes(report.gpu_bytes)} "
            f"({report.gpu_bytes_source}); lower rollout.gpu_memory_utilization or give the roles whole GPUs"]


def data_warnings(cfg: RunConfig) -> list[str]:
    if not cfg.train.enabled and cfg.pairs.export_format == "none":
        return ["train.enabled is false and pairs.export_format is none: the pairs stay as pairs.jsonl in the run "
                "directory only; set pairs.export_format to disk or parquet for a DPO dataset"]
    return []


def truncation_warnings(cfg: RunConfig) -> list[str]:
    """Where the configured lengths let DPO cut what was sampled: a prompt data.max_prompt_tokens lets in but
    train.max_prompt_length cuts (its BOS, system turn and end are kept), or a prompt plus a full response over
    train.max_length (the response loses its end, EOS included). Each run counts them: pairs/truncated_prompt and
    pairs/truncated_response."""
    if not cfg.train.enabled:
        return []
    train, warnings = cfg.train, []
    longest_prompt = cfg.data.max_prompt_tokens
    if longest_prompt > train.max_prompt_length:
        warnings.append(f"prompts of up to {longest_prompt} tokens (data.max_prompt_tokens) are cut to "
                        f"train.max_prompt_length {train.max_prompt_length} for DPO (BOS, system turn and the last "
                        f"turn kept); raise train.max_prompt_length to keep them whole")
    if cfg.online:
        longest = min(longest_prompt, train.max_prompt_length) + cfg.rollout.max_tokens
        if longest > train.max_length:
            warnings.append(f"a prompt of {min(longest_prompt, train.max_prompt_length)} tokens and a response of "
                            f"rollout.max_tokens {cfg.rollout.max_tokens} make {longest}, over train.max_length "
                            f"{train.max_length}: long responses lose their end (EOS included) in DPO; raise "
                            f"train.max_length or lower rollout.max_tokens")
    return warnings


def export_problems(cfg: RunConfig) -> list[str]:
    if cfg.pairs.push_to_hub is not None and cfg.pairs.export_format == "none":
        return [f"pairs.push_to_hub {cfg.pairs.push_to_hub!r} is set but pairs.export_format is none, so nothing "
                f"would be pushed; set pairs.export_format to disk or parquet"]
    return []


def gpu_memory(device: str) -> tuple[int, str]:
    if device == "cuda":
        import torch

        if torch.cuda.is_available():
            properties = torch.cuda.get_device_properties(0)
            return properties.total_memory, f"this machine's {properties.name}"
    return ASSUMED_GPU_BYTES, f"an assumed {human_bytes(ASSUMED_GPU_BYTES)} GPU"



# ---- text -------------------------------------------------------------------------------------------------------

def describe_plan(report: PlanReport) -> str:
    unit = "GPU" if report.device == "cuda" else "host RAM"
    lines = ["# resolved config", report.config_yaml.rstrip(), "", "# Ray resources",
             f"device: {report.device}" + ("" if report.device == "cuda" else
                                           f" (no GPUs; every actor books {CPU_SHARE:g} CPU)")]
    for role in report.roles:
        lines.append(f"  {role.role:8s} {role.actors} actor(s) x {role.gpus_per_actor:g} GPU  {role.what}")
    lines.append(f"  total GPUs: {report.total_gpus:g}")
    lines += ["", "# placement (placement groups, reserved before any actor starts; one bundle an actor)"]
    lines += describe_layout(report.layout)
    lines += ["", "# derived"]
    if not report.offline_dpo:
        responses = ("K x the dataset's prompt count" if report.responses_per_iteration is None
                     else f"{report.responses_per_iteration:,} = prompts x K")
        lines += [f"  prompts per iteration: {count_or_all(report.prompts_per_iteration)}",
                  f"  responses per iteration: {responses}"]
    lines += [f"  pairs from: {report.pair_source}", f"  training: {report.training}"]
    if report.trains:
        lines.append(f"  global batch: {report.global_batch_size} pairs = {report.global_batch_formula}")
        lines.append("  optimizer steps per iteration: " + (
            "as many as the dataset's pairs need" if report.max_steps_per_iteration is None else
            f"at most {report.max_steps_per_iteration} = epochs x ceil(prompts / global batch)"))
    lines += ["", "# models"]
    lines += [f"  {size.path}: " + (f"{params(size.parameters)} params, " if size.parameters else "") + size.source
              for size in report.models]
    lines += ["", f"# memory per actor ({unit}; weights, KV cache and optimizer state, activations not counted)"]
    for role in report.roles:
        lines.append(f"  {role.role}: {role.memory.formula}")
    lines += ["", "# checks"]
    lines += [f"  problem: {problem}" for problem in report.problems]
    lines += [f"  warning: {warning}" for warning in report.warnings]
    if not report.problems and not report.warnings:
        lines.append("  ok")
    return "\n".join(lines)


def count_or_all(count: int | None) -> str:
    return "all of the dataset's (counted when it is loaded)" if count is None else f"{count:,}"
