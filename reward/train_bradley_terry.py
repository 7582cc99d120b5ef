"""Train a sequence-classification reward model on preference pairs with the Bradley-Terry loss.

Each pair is rendered twice with the model's own chat template (prompt + chosen, prompt + rejected), exactly as the
scorers in reward/classifier.py render and cut what they score; the loss is -log sigmoid(r_chosen - r_rejected).
Plain torch on one device, deterministic for a given seed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from rlhf_loop.common.records import Messages


@dataclass(frozen=True)
class PreferencePair:
    """One labelled comparison: for `prompt`, `chosen` is the better response."""

    prompt: Messages
    chosen: str
    rejected: str


@dataclass(frozen=True)
class BradleyTerryMetrics:
    train_loss: float  # mean Bradley-Terry loss over the last epoch
    train_accuracy: float  # fraction of training pairs ranked correctly during the last epoch
    eval_loss: float | None  # on the held-out pairs after training; None when none were given
    eval_accuracy: float | None  # fraction of held-out pairs with r_chosen > r_rejected


def train_bradley_terry(
    model_dir: str | Path,
    pairs: list[PreferencePair],
    out_dir: str | Path,
    epochs: int = 1,
    lr: float = 1e-4,
    batch_size: int = 16,
    max_length: int = 512,
    seed: int = 0,
    eval_pairs: list[PreferencePair] = (),
) -> BradleyTerryMetrics:
    """Fine-tune the model at `model_dir` (a reward model, or a causal LM whose backbone gets a fresh score head)
    on `pairs`, save it with its tokenizer to `out_dir`, and return its metrics."""
    import torch
    from tqdm import tqdm
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if not pairs:
        raise ValueError("train_bradley_terry got no preference pairs; pass at least one")
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    order_rng = random.Random(seed)
    order = list(range(len(pairs)))

    model.train()
    progress = tqdm(total=epochs * _num_batches(len(pairs), batch_size), desc="reward model (Bradley-Terry)")
    for _ in range(epochs):
        order_rng.shuffle(order)
        losses, correct = [], 0
        for start in range(0, len(order), batch_size):
            batch = [pairs[i] for i in order[start : start + batch_size]]
            margins = _margins(model, tokenizer, batch, max_length)
            loss = -torch.nn.functional.logsigmoid(margins).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item() * len(batch))
            correct += int((margins > 0).sum())
            progress.update()
            progress.set_postfix(loss=f"{loss.item():.3f}")
    progress.close()

    eval_loss, eval_accuracy = _evaluate(model, tokenizer, list(eval_pairs), batch_size, max_length)
    model.eval()
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return BradleyTerryMetrics(
        train_loss=sum(losses) / len(pairs),
        train_accuracy=correct / len(pairs),
        eval_loss=eval_loss,
        eval_accuracy=eval_accuracy,
    )


def _evaluate(model, tokenizer, pairs: list[PreferencePair], batch_size: int, max_length: int):
    import torch

    if not pairs:
        return None, None
    model.eval()
    losses, correct = [], 0
    with torch.no_grad():
        for start in range(0, len(pairs), batch_size):
            batch = pairs[start : start + batch_size]
            margins = _margins(model, tokenizer, batch, max_length)
            losses.append(-torch.nn.functional.logsigmoid(margins).sum().item())
            correct += int((margins > 0).sum())
    model.train()
    return sum(losses) / len(pairs), correct / len(pairs)


def _margins(model, tokenizer, batch: list[PreferencePair], max_length: int):
    """r(prompt, chosen) - r(prompt, rejected) for each pair, from one forward pass over both halves."""
    from reward.hf import render

    sequences = [render(tokenizer, pair.prompt, pair.chosen) for pair in batch]
    sequences += [render(tokenizer, pair.prompt, pair.rejected) for pair in batch]
    input_ids, attention_mask = _pad_right(tokenizer, sequences, max_length)
    rewards = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0]
    return rewards[: len(batch)] - rewards[len(batch) :]


def _pad_right(tokenizer, sequences: list[list[int]], max_length: int):
    """Right-padded tensors; over-long sequences lose prompt tokens from the left, as the scorers cut them."""
    import torch

    from reward.hf import truncate_left

    sequences = [truncate_left(ids, max_length, tokenizer.bos_token_id) for ids in sequences]
    width = max(len(ids) for ids in sequences)
    input_ids = torch.full((len(sequences), width), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, ids in enumerate(sequences):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
    return input_ids, attention_mask


def _num_batches(size: int, batch_size: int) -> int:
    return (size + batch_size - 1) // batch_size
