"""Preference losses for the DPO learner, keyed by `train.loss_type`.

Every loss sees, per pair, the policy-vs-reference log-ratios of the chosen and the rejected response:
    chosen_logratio   = log pi(chosen | x)   - log ref(chosen | x)
    rejected_logratio = log pi(rejected | x) - log ref(rejected | x)
summed over response tokens, or averaged over them when the loss says so (IPO).

torch is imported inside the functions: `rlhf_loop.config` imports this registry to validate configs, and config
code must import fast.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class LossFn:
    """A per-pair preference loss and the kind of log-probabilities it is defined on."""

    per_pair: Callable[[torch.Tensor, torch.Tensor, float, float], torch.Tensor]
    average_log_probs: bool  # True: log-probs are averaged over response tokens; False: summed

    def __call__(
        self, chosen_logratio: torch.Tensor, rejected_logratio: torch.Tensor, beta: float, label_smoothing: float
    ) -> torch.Tensor:
        """Per-pair losses (shape [pairs]); the caller takes the mean."""
        return self.per_pair(chosen_logratio, rejected_logratio, beta, label_smoothing)


def sigmoid_loss(
    chosen_logratio: torch.Tensor, rejected_logratio: torch.Tensor, beta: float, label_smoothing: float
) -> torch.Tensor:
    """DPO (Rafailov et al. 2023); with label_smoothing > 0, conservative DPO (cDPO): the label is trusted with
    probability 1 - label_smoothing."""
    from torch.nn.functional import logsigmoid

    logits = beta * (chosen_logratio - rejected_logratio)
    return -(1 - label_smoothing) * logsigmoid(logits) - label_smoothing * logsigmoid(-logits)


def ipo_loss(
    chosen_logratio: torch.Tensor, rejected_logratio: torch.Tensor, beta: float, label_smoothing: float
) -> torch.Tensor:
    """IPO (Azar et al. 2023, eq. 17): regress the log-ratio margin onto 1 / (2 beta). Defined on length-averaged
    log-probs (as the IPO authors and TRL do) so the target does not depend on response length."""
    del label_smoothing  # IPO has no label noise model
    return (chosen_logratio - rejected_logratio - 1 / (2 * beta)) ** 2


LOSSES: dict[str, LossFn] = {
    "sigmoid": LossFn(sigmoid_loss, average_log_probs=False),
    "ipo": LossFn(ipo_loss, average_log_probs=True),
}
