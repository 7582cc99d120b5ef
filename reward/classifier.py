"""Reward models that read one (prompt, response) sequence and output a score: Bradley-Terry and ArmoRM-style.

Both render the conversation with the reward model's own chat template, keep the last `max_length` tokens of
over-long sequences (see reward/hf.py), and score right-padded batches sorted by length.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from reward import hf
from reward.base import RewardQuery, RewardResult
from reward.config import RewardConfig
from reward.groups import check_finite, describe, regroup, ungroup
from rlhf_loop.common.errors import UserError
from rlhf_loop.common.hf_models import load_tokenizer


class SequenceRewardModel:
    """Loading, rendering and batching; subclasses say how a model's output becomes scores."""

    objectives: list[str]

    def __init__(self, cfg: RewardConfig, device: str, key: str = "reward") -> None:
        from transformers import AutoModelForSequenceClassification

        self.key, self.path = key, cfg.model_path
        self.batch_size, self.max_length = cfg.batch_size, cfg.max_length
        self.device = torch.device(device)
        self.check_files(cfg, key)
        self.tokenizer = load_tokenizer(cfg.model_path, cfg.trust_remote_code, f"{key}.model_path")
        self.model = hf.load_model(AutoModelForSequenceClassification, cfg, device, key, "a sequence classifier",
                                   "has no trained score head", "reward model")
        self.pad_id = hf.pad_token_id(self.model.config, self.tokenizer, cfg.model_path)
        self.model.config.pad_token_id = self.pad_id

    @classmethod
    def check_files(cls, cfg: RewardConfig, key: str) -> None:
        """What config.json alone tells (custom code allowed, the right head), before any weight is loaded: run at
        start-up and by the pre-run checks, before anything is written. Raises UserError."""
        cls.check_config(hf.read_model_config(cfg.model_path, cfg.trust_remote_code, key), key, cfg.model_path)

    @classmethod
    def check_config(cls, raw_config: dict[str, Any], key: str, path: str) -> None:
        """Checks on config.json of a kind; raise UserError."""

    def outputs_to_scores(self, output: Any, batch: hf.PaddedBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(scores [B], objectives name -> [B]) from one forward pass."""
        raise NotImplementedError

    def score(self, queries: Sequence[RewardQuery]) -> list[RewardResult]:
        samples = ungroup(queries)
        sequences = [hf.render(self.tokenizer, s.messages, s.response) for s in samples]
        scores, objectives = self.score_token_ids(sequences)
        check_finite(scores, lambda i: describe(samples[i]), f"reward model {self.path}")
        return regroup(queries, scores, objectives)

    def score_texts(self, texts: Sequence[str]) -> RewardResult:
        """Scores for already-rendered conversations, as OpenRLHF's /get_reward sends them: padding tokens around a
        text are dropped and it is made to end in exactly one EOS, the way its chat template ends a turn."""
        sequences = [self.tokenizer(self._normalized(text), add_special_tokens=False)["input_ids"] for text in texts]
        scores, objectives = self.score_token_ids(sequences)
        check_finite(scores, lambda i: f"text {i} ({texts[i][-40:]!r})", f"reward model {self.path}")
        return RewardResult(scores=scores, objectives=objectives)

    def _normalized(self, text: str) -> str:
        pad, eos = self.tokenizer.pad_token, self.tokenizer.eos_token
        if pad:
            while text.startswith(pad):
                text = text[len(pad):]
            while text.endswith(pad):
                text = text[:-len(pad)]
        while eos and text.endswith(eos):
            text = text[:-len(eos)]
        return text + (eos or "")

    def score_token_ids(self, sequences: Sequence[list[int]]) -> tuple[list[float], dict[str, list[float]]]:
        sequences = [hf.truncate_left(ids, self.max_length, self.tokenizer.bos_token_id) for ids in sequences]
        scores = [0.0] * len(sequences)
        objectives = {name: [0.0] * len(sequences) for name in self.objectives}
        with torch.inference_mode():
            for batch in hf.padded_batches(sequences, self.batch_size, self.pad_id, self.device):
                output = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
                batch_scores, batch_objectives = self.outputs_to_scores(output, batch)
                for row, index in enumerate(batch.indices):
                    scores[index] = float(batch_scores[row])
                    for name, values in batch_objectives.items():
                        objectives[name][index] = float(values[row])
        return scores, objectives


class BradleyTerryReward(SequenceRewardModel):
    """Any AutoModelForSequenceClassification with one label: the score is its logit at the last real token."""

    objectives: list[str] = []

    @classmethod
    def check_config(cls, raw_config: dict[str, Any], key: str, path: str) -> None:
        if "id2label" not in raw_config and "num_labels" not in raw_config:
            raise UserError(f"{key}.model_path {path!r} has no score head (its config.json defines no "
                            "labels: a causal LM?); kind bradley_terry needs a sequence classifier with num_labels=1")
        num_labels = len(raw_config.get("id2label") or {}) or raw_config["num_labels"]
        if num_labels != 1:
            raise UserError(f"{key}.model_path {path!r} has {num_labels} output labels; a Bradley-Terry "
                            "reward model has one score head (num_labels=1); use kind armorm for multi-objective "
                            "models")

    def outputs_to_scores(self, output: Any, batch: hf.PaddedBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return output.logits[:, 0].float().cpu(), {}


class ArmoRMReward(SequenceRewardModel):
    """Multi-objective models whose custom output carries `.score` [B] (the gated preference score), `.rewards`
    [B, objectives] and `.gating_output` [B, gates], such as RLHFlow/ArmoRM-Llama3-8B-v0.1.

    Objectives are reported as `<name>` (reward per objective) and `gating/<i>` (the gate's weights).
    """

    def __init__(self, cfg: RewardConfig, device: str, key: str = "reward") -> None:
        self.objectives = []
        super().__init__(cfg, device, key)
        self.objectives = self._probe_objectives(cfg.objectives)

    @classmethod
    def check_files(cls, cfg: RewardConfig, key: str) -> None:
        if not cfg.trust_remote_code:
            raise UserError(f"kind armorm runs the model's own modeling code: set {key}.trust_remote_code=true "
                            f"for {cfg.model_path!r} if you trust it")
        super().check_files(cfg, key)

    def _probe_objectives(self, names: list[str]) -> list[str]:
        """One forward pass at start-up: a model without `.score` fails here, not mid-run."""
        probe = hf.render(self.tokenizer, [{"role": "user", "content": "Hi"}], "Hello")
        batch = next(hf.padded_batches([probe], 1, self.pad_id, self.device))
        with torch.inference_mode():
            output = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        if getattr(output, "score", None) is None:
            raise UserError(f"{self.key}.model_path {self.path!r}: the model's output has no .score; kind armorm "
                            "needs custom modeling code returning .score (and .rewards, .gating_output)")
        rewards, gating = getattr(output, "rewards", None), getattr(output, "gating_output", None)
        count = 0 if rewards is None else rewards.shape[-1]
        if names and len(names) != count:
            raise UserError(f"{self.key}.objectives names {len(names)} objectives but {self.path!r} outputs {count}")
        self.objective_names = names or [f"objective_{i}" for i in range(count)]
        self.gate_names = [] if gating is None else [f"gating/{i}" for i in range(gating.shape[-1])]
        return [*self.objective_names, *self.gate_names]

    def outputs_to_scores(self, output: Any, batch: hf.PaddedBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        objectives = {}
        if self.objective_names:
            rewards = output.rewards.float().cpu()
            objectives.update({name: rewards[:, i] for i, name in enumerate(self.objective_names)})
        if self.gate_names:
            gating = output.gating_output.float().cpu()
            objectives.update({name: gating[:, i] for i, name in enumerate(self.gate_names)})
        return output.score.float().cpu().reshape(len(batch.indices)), objectives
