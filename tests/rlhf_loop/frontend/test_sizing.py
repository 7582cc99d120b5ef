"""Parameter counts without building the model: the Llama-shaped formula must give what transformers builds."""

import pytest
from transformers import LlamaConfig, MistralConfig

from rlhf_loop.frontend.sizing import built_parameters, count_parameters, llama_parameters

SMALL = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4)


@pytest.mark.parametrize("config", [
    LlamaConfig(**SMALL),
    LlamaConfig(**SMALL, tie_word_embeddings=True),
    LlamaConfig(**SMALL, num_key_value_heads=2, head_dim=32, attention_bias=True, mlp_bias=True),
    MistralConfig(**SMALL, num_key_value_heads=1),
], ids=["llama", "tied", "gqa-bias-head-dim", "mistral"])
@pytest.mark.parametrize("head", ["causal_lm", "sequence_classification", "backbone"])
def test_the_formula_counts_what_transformers_builds(config, head):
    assert llama_parameters(config, head) == built_parameters(config, head)


def test_other_architectures_are_built_and_counted():
    from transformers import GPT2Config

    config = GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=100, n_positions=64)
    assert count_parameters(config, "causal_lm") == built_parameters(config, "causal_lm") > 0
