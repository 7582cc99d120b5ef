"""What the Hugging Face reward kinds share: loading checks, chat rendering, truncation and padded batches.

Every check that can fail on a bad model directory runs here, at start-up, so a run never dies mid-iteration on a
model it could have rejected before the first rollout.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from rlhf_loop.common.chat import assistant_turn, chat_token_ids
from rlhf_loop.common.errors import UserError
from rlhf_loop.common.hf_models import torch_dtype
from rlhf_loop.common.sequences import PaddedBatch, cut_prompt, padded_batches  # noqa: F401 (the reward kinds' batches)
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
    """The last max_length tokens of a scored conversation, and a leading BOS: the prompt is cut first and the
    response's end, which the score reads, always survives."""
    return cut_prompt(token_ids, max_length, head=int(bool(token_ids) and token_ids[0] == bos_token_id))


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
