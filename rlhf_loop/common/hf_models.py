"""What every role that loads a Hugging Face model shares: dtype names and their resolution, and tokenizer loading.

A leaf module (it imports nothing of ours but `rlhf_loop.common.errors`), so the policy, the reward models and the driver
all resolve "auto" and load tokenizers the same way. torch and transformers are imported inside the functions:
config validation imports this module and must stay fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rlhf_loop.common.errors import UserError

if TYPE_CHECKING:
    import torch

# "auto" is float32 on CPU (bfloat16 matmuls are slow or missing there) and bfloat16 on CUDA.
DTYPE_NAMES = ("auto", "float32", "bfloat16", "float16")


def dtype_name(dtype: str, device: str) -> str:
    """A dtype setting as a concrete dtype name, "auto" resolved for `device` ("cpu", "cuda", "cuda:1", ...)."""
    if dtype == "auto":
        return "bfloat16" if device.startswith("cuda") else "float32"
    if dtype not in DTYPE_NAMES:
        raise ValueError(f"dtype {dtype!r} is unknown; use one of {', '.join(DTYPE_NAMES)}")
    return dtype


def torch_dtype(dtype: str, device: str) -> torch.dtype:
    import torch

    return getattr(torch, dtype_name(dtype, device))


def load_tokenizer(path: str, trust_remote_code: bool, key: str | None = None):
    """The tokenizer at `path`. With `key` (the config key that named the path), a tokenizer that cannot be loaded or
    has no chat template is a UserError naming that key; without it, errors pass through (the path was checked)."""
    from transformers import AutoTokenizer

    if key is None:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(f"{key} {path!r}: cannot load its tokenizer ({str(e).splitlines()[0][:160]})") from None
    if not tokenizer.chat_template:
        raise UserError(f"{key} {path!r}: the tokenizer has no chat template, so conversations cannot be rendered "
                        f"the way the model was trained; use a chat model or add chat_template to its "
                        f"tokenizer_config.json")
    return tokenizer
