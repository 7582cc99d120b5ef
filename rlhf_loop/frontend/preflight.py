"""Checks that a run can start, done before anything is written: a bad path or column costs seconds, not a cluster
start-up (`rlhf-loop run` starts Ray and the actors beside them, and stops them when a check fails)."""

from __future__ import annotations

from rlhf_loop.config import RunConfig
from rlhf_loop.common.console import say
from rlhf_loop.common.errors import UserError
from rlhf_loop.common.hf_models import load_tokenizer


def ensure_inputs(cfg: RunConfig) -> None:
    """Build what the config names but nobody has made yet: the toy task's models and data, the converted
    SmolLM2 model (once per cache). The actors load them, so this comes before they start."""
    if cfg.toy_task.enabled:
        from rlhf_loop.toy.assets import ensure_toy_assets

        ensure_toy_assets(cfg.toy_task)
    if cfg.smollm2.enabled:
        from rlhf_loop.toy.smollm2 import ensure_smollm2

        ensure_smollm2(cfg.smollm2)


def preflight(cfg: RunConfig) -> None:
    ensure_inputs(cfg)
    from rlhf_loop.frontend.plan import plan_report, truncation_warnings

    # Resources first: a GPU request the cluster cannot meet would leave Ray waiting forever, with no error.
    report = plan_report(cfg)
    if report.problems:
        raise UserError(f"{report.problems[0]} (`rlhf-loop plan CONFIG` shows the whole plan)")
    for warning in truncation_warnings(cfg):  # the run goes on, cutting: said once, counted every iteration
        say(f"rlhf-loop: warning: {warning}")
    check_model(cfg.policy.model_path, "policy.model_path", cfg.policy.trust_remote_code)
    if cfg.online:
        from reward.registry import check_model_files

        check_model_files(cfg.reward)  # custom code without trust_remote_code, no score head: before any write
    key = "policy.tokenizer_path" if cfg.policy.tokenizer_path else "policy.model_path"
    tokenizer = load_tokenizer(cfg.policy.tokenizer_source, cfg.policy.trust_remote_code, key)

    from rlhf_loop.driver.data import evaluation_prompts, iteration_prompts, load_preference_rows, load_sft_conversations
    from rlhf_loop.driver.stages import load_gold

    if cfg.online:
        for iteration in range(1, len(cfg.data.prompts) + 1):
            iteration_prompts(cfg.data, iteration, tokenizer, cfg.seed, cfg.environment.factory)
        evaluation_prompts(cfg, tokenizer)
    else:
        load_preference_rows(cfg.pairs.dataset, cfg.pairs.dataset_split)
    load_gold(cfg.eval)
    if cfg.sft.enabled:
        load_sft_conversations(cfg.sft)


def check_model(path: str, key: str, trust_remote_code: bool) -> None:
    """The model's config loads (a local directory, or a hub id in the local cache / online)."""
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as e:  # OSError, ValueError, HF hub errors: all mean "cannot use this path"
        raise UserError(f"{key} {path!r} cannot be loaded ({str(e).splitlines()[0][:160]}); "
                        f"give a local model directory or a hub id") from None
