"""Preference losses for the DPO learner, keyed by `train.loss_type` (docs/algorithms.md says when to use which).

Every loss compares, per pair, a score of the chosen response with a score of the rejected one. The score is the
policy-vs-reference log-ratio
    log pi(y | x) - log ref(y | x)
summed over response tokens, or averaged over them when the loss says so (`average_log_probs`); a reference-free
loss (SimPO) scores the policy's own log-probability instead, and then no reference model is needed at all.

torch is imported inside the functions: `policy.config` imports this registry to validate configs, and config
code must import fast.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class LossSettings:
    """The loss hyperparameters of `train` (TrainConfig.loss_settings)."""

    beta: float
    label_smoothing: float = 0.0  # the logistic losses: assumed probability that a preference label is flipped
    simpo_gamma: float = 0.0  # simpo: target reward margin
    rpo_alpha: float = 0.0  # rpo: weight of the chosen response's negative log-likelihood

@dataclass(frozen=True)
class LossFn:
    """A per-pair preference loss and what its scores are made of."""

    per_pair: Callable[[torch.Tensor, torch.Tensor, LossSettings], torch.Tensor]  # on chosen and rejected scores
    average_log_probs: bool  # True: log-probs are averaged over response tokens; False: summed
    uses_reference: bool = True  # False: a response's score is log pi alone, and no reference model is loaded
    chosen_nll: bool = False  # adds rpo_alpha x the chosen response's mean token negative log-likelihood
    label_smoothing: bool = False  # whether train.label_smoothing means anything to it

    def __call__(self, chosen_score: torch.Tensor, rejected_score: torch.Tensor, settings: LossSettings
                 ) -> torch.Tensor:
        """Per-pair losses (shape [pairs]) of the preference term alone; the caller takes the mean."""
        return self.per_pair(chosen_score, rejected_score, settings)

    def pair_losses(
        self, policy: torch.Tensor, reference: torch.Tensor | None, lengths: torch.Tensor, settings: LossSettings
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per pair: the loss, and the implicit rewards of chosen and rejected (beta x the summed log-ratio; SimPO:
        beta x the mean log pi).

        `policy`, `reference` (None for a reference-free loss) and `lengths` hold the summed log-probabilities and
        the token counts of the chosen responses, then of the rejected ones, pair by pair.
        """
        log_probs = policy - reference if self.uses_reference else policy
        scores = log_probs / lengths.clamp(min=1) if self.average_log_probs else log_probs
        chosen, rejected = scores.chunk(2)
        losses = self(chosen, rejected, settings)
        if self.chosen_nll:
            chosen_log_probs, chosen_lengths = policy.chunk(2)[0], lengths.chunk(2)[0]
            losses = losses - settings.rpo_alpha * chosen_log_probs / chosen_lengths.clamp(min=1)
        rewards = settings.beta * (log_probs if self.uses_reference else scores).detach()
        chosen_rewards, rejected_rewards = rewards.chunk(2)
        return losses, chosen_rewards, rejected_rewards


def smoothed_logistic(logits: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """-log sigmoid(logits), with the label trusted with probability 1 - label_smoothing (cDPO)."""
    from torch.nn.functional import logsigmoid

    return -(1 - label_smoothing) * logsigmoid(logits) - label_smoothing * logsigmoid(-logits)


def sigmoid_loss(chosen: torch.Tensor, rejected: torch.Tensor, settings: LossSettings) -> torch.Tensor:
    """DPO (Rafailov et al. 2023); with label_smoothing > 0, conservative DPO (cDPO). Also the preference term of
    length-normalised DPO (on mean log-ratios) and of RPO."""
    return smoothed_logistic(settings.beta * (chosen - rejected), settings.label_smoothing)


def ipo_loss(chosen: torch.Tensor, rejected: torch.Tensor, settings: LossSettings) -> torch.Tensor:
    """IPO (Azar et al. 2023, eq. 17): regress the log-ratio margin onto 1 / (2 beta). Defined on length-averaged
    log-probs (as the IPO authors and TRL do) so the target does not depend on response length."""
    return (chosen - rejected - 1 / (2 * settings.beta)) ** 2


def hinge_loss(chosen: torch.Tensor, rejected: torch.Tensor, settings: LossSettings) -> torch.Tensor:
    """SLiC-HF's hinge (Zhao et al. 2023): no gradient once the margin beta x (log-ratio gap) exceeds 1."""
    import torch

    return torch.relu(1 - settings.beta * (chosen - rejected))


def simpo_loss(chosen: torch.Tensor, rejected: torch.Tensor, settings: LossSettings) -> torch.Tensor:
    """SimPO (Meng et al. 2024, eq. 6): the mean log pi of chosen must beat rejected's by a margin simpo_gamma / beta;
    no reference model."""
    return smoothed_logistic(settings.beta * (chosen - rejected) - settings.simpo_gamma, settings.label_smoothing)


LOSSES: dict[str, LossFn] = {
    "sigmoid": LossFn(sigmoid_loss, average_log_probs=False, label_smoothing=True),
    "ipo": LossFn(ipo_loss, average_log_probs=True),
    "sigmoid_norm": LossFn(sigmoid_loss, average_log_probs=True, label_smoothing=True),
    "hinge": LossFn(hinge_loss, average_log_probs=False),
    "simpo": LossFn(simpo_loss, average_log_probs=True, uses_reference=False, label_smoothing=True),
    # RPO (Pang et al. 2024, iterative reasoning preference optimisation): DPO + alpha x NLL(chosen) / |chosen|
    "rpo": LossFn(sigmoid_loss, average_log_probs=False, chosen_nll=True, label_smoothing=True),
}
