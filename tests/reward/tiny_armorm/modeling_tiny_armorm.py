"""A tiny ArmoRM-style reward model (a test asset, our own code): custom modeling code whose output carries
`.score`, `.rewards` (one per objective) and `.gating_output`, the structure of RLHFlow/ArmoRM-Llama3-8B-v0.1.

Saved with `save_pretrained`, this file travels with the weights and config.json gets an `auto_map`, so loading it
needs `trust_remote_code=True`, exactly like the real model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import LlamaConfig, LlamaModel, LlamaPreTrainedModel
from transformers.utils import ModelOutput


class TinyArmoConfig(LlamaConfig):
    model_type = "tiny_armorm"

    def __init__(self, num_objectives: int = 3, **kwargs):
        self.num_objectives = num_objectives
        super().__init__(**kwargs)


@dataclass
class ArmoOutput(ModelOutput):
    rewards: torch.FloatTensor | None = None  # [batch, objectives]
    gating_output: torch.FloatTensor | None = None  # [batch, objectives], rows sum to 1
    score: torch.FloatTensor | None = None  # [batch]: the gated sum of the rewards


class TinyArmoRM(LlamaPreTrainedModel):
    config_class = TinyArmoConfig

    def __init__(self, config: TinyArmoConfig):
        super().__init__(config)
        self.model = LlamaModel(config)
        self.regression_layer = nn.Linear(config.hidden_size, config.num_objectives, bias=False)
        self.gating = nn.Linear(config.hidden_size, config.num_objectives, bias=False)
        self.post_init()

    def forward(self, input_ids, attention_mask=None, **kwargs) -> ArmoOutput:
        hidden = self.model(input_ids, attention_mask=attention_mask).last_hidden_state
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        last = attention_mask.sum(dim=-1) - 1  # right padding: the last real token, as ArmoRM reads it
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        rewards = self.regression_layer(pooled)
        gating = torch.softmax(self.gating(pooled), dim=-1)
        return ArmoOutput(rewards=rewards, gating_output=gating, score=(rewards * gating).sum(dim=-1))
