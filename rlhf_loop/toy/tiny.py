"""Tiny Llama-architecture models built locally: the default demo and the tests run with no download.

Shapes follow what vLLM's CPU attention accepts (head size 32). The tokenizer is a byte-level BPE trained on local
text and carries the Llama-3 chat template, so prompts render exactly as they would for a real Llama-3 policy.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

BEGIN_OF_TEXT = "<|begin_of_text|>"
START_HEADER = "<|start_header_id|>"
END_HEADER = "<|end_header_id|>"
END_OF_TURN = "<|eot_id|>"
PAD = "<|pad|>"
SPECIAL_TOKENS = [BEGIN_OF_TEXT, START_HEADER, END_HEADER, END_OF_TURN, PAD]

LLAMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def build_tokenizer(corpus: Iterable[str], vocab_size: int = 1024):
    """A byte-level BPE tokenizer trained on `corpus`, with Llama-3 special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BEGIN_OF_TEXT,
        eos_token=END_OF_TURN,
        pad_token=PAD,
        chat_template=LLAMA3_CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )


def tiny_llama_config(tokenizer, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 2, **overrides):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 4,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        **overrides,
    )


def build_tiny_policy(tokenizer, out_dir: str | Path, seed: int = 0, **shape) -> Path:
    """A randomly initialised tiny Llama causal LM saved with its tokenizer; returns the directory."""
    import torch
    from transformers import GenerationConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(tokenizer, **shape))
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def build_tiny_reward_model(tokenizer, out_dir: str | Path, seed: int = 0, **shape) -> Path:
    """A randomly initialised tiny Llama sequence classifier with one label (a Bradley-Terry reward model)."""
    import torch
    from transformers import LlamaForSequenceClassification

    torch.manual_seed(seed)
    model = LlamaForSequenceClassification(tiny_llama_config(tokenizer, num_labels=1, **shape))
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
