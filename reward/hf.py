"""What the Hugging Face reward kinds share: loading checks, chat rendering, truncation and padded batches.

Every check that can fail on a bad model directory runs here, at start-up, so a run never dies mid-iteration on a
model it could have rejected before the first rollout.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from rlhf_loop.common.chat import assistant_turn, chat_token_ids
from rlhf_loop.common.errors import UserError
from rlhf_loop.common.hf_models import torch_dtype
from rlhf_loop.common.records import Messages

log = logging.getLogger(__name__)

def read_model_config(path: str, trust_remote_code: bool, key: str) -> dict[str, Any]:
    """config.json as a dict, read without running any code it points to; refuses custom code not allowed.

    `key` is the config section ("reward", "reward.components[0].reward") that errors name.
    """
    from transformers import PretrainedConfig

    if path.startswith(("/", ".", "~")) and not os.path.isdir(os.path.expanduser(path)):
        raise UserError(f"{key}.model_path {path!r} is not a directory; give a model directory or a hub id")
    try:
        config, _ = PretrainedConfig.get_config_dict(os.path.expanduser(path))
    except (OSError, ValueError) as e:
        raise UserError(f"{key}.model_path {path!r}: cannot read its config.json ({_first_line(e)}); "
                        "give a local model directory or a hub id available offline") from None
    if config.get("auto_map") and not trust_remote_code:
        raise UserError(f"{key}.model_path {path!r} ships custom modeling code (auto_map in config.json); "
                        f"set {key}.trust_remote_code=true if you trust that code")
    return config


def load_model(model_class: Any, cfg: Any, device: str, key: str, loaded_as: str, untrained: str, trained: str):
    """cfg.model_path as `model_class` (an AutoModel class), in eval mode on `device`. A checkpoint that does not load
    as `loaded_as` ("a sequence classifier"), or lacks weights the class needs (`untrained`: "has no trained score
    head"), is refused at start-up naming `key` and asking for a trained `trained` ("reward model")."""
    try:
        model, loading = model_class.from_pretrained(cfg.model_path, dtype=torch_dtype(cfg.dtype, device),
                                                     trust_remote_code=cfg.trust_remote_code, output_loading_info=True)
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"{key}.model_path {cfg.model_path!r}: cannot load it as {loaded_as} ({_first_line(e)})") \
            from None
    missing = sorted(loading["missing_keys"])
    if missing:
        raise UserError(f"{key}.model_path {cfg.model_path!r} {untrained} (weights missing from the checkpoint: "
                        f"{', '.join(missing[:3])}); point it at a trained {trained}")
    return model.to(torch.device(device)).eval()


def pad_token_id(model_config: Any, tokenizer: Any, path: str) -> int:
    """The id used for right padding; sequence classifiers pool at the last token that is not this id."""
    for candidate in (model_config.pad_token_id, tokenizer.pad_token_id):
        if candidate is not None:
            return int(candidate)
    log.warning("%s defines no pad token; padding with EOS, so the score is read before any trailing EOS", path)
    return int(tokenizer.eos_token_id)


def render(tokenizer: Any, messages: Messages, response: str) -> list[int]:
    """Token ids of the conversation with the response as the last assistant turn, in the model's own template."""
    return chat_token_ids(tokenizer, [*messages, assistant_turn(response)])


def truncate_left(token_ids: list[int], max_length: int, bos_token_id: int | None) -> list[int]:
    """Keep the last max_length tokens, and a leading BOS: the prompt is cut first and the end always survives."""
    if len(token_ids) <= max_length:
        return token_ids
    if bos_token_id is not None and token_ids[0] == bos_token_id:
        return [token_ids[0], *token_ids[len(token_ids) - max_length + 1:]]
    return token_ids[len(token_ids) - max_length:]


@dataclass(frozen=True)
class PaddedBatch:
    indices: list[int]  # positions of these rows in the caller's list of sequences
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    last_positions: torch.Tensor  # index of each row's last real token


def padded_batches(
    sequences: Sequence[list[int]], batch_size: int, pad_id: int, device: torch.device | str
) -> Iterator[PaddedBatch]:
    """Right-padded batches of similar length (longest first), so padding is small and the order deterministic.

    Right padding keeps every real token at the position it has when scored alone: with causal attention the
    pads after it cannot change it, so a score does not depend on what else is in the batch.
    """
    order = sorted(range(len(sequences)), key=lambda i: (-len(sequences[i]), i))
    for start in range(0, len(order), batch_size):
        indices = order[start:start + batch_size]
        width = len(sequences[indices[0]])
        input_ids = torch.full((len(indices), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(indices), width), dtype=torch.long)
        for row, index in enumerate(indices):
            ids = sequences[index]
            input_ids[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, :len(ids)] = 1
        yield PaddedBatch(
            indices=indices,
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            last_positions=(attention_mask.sum(dim=1) - 1).to(device),
        )


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
