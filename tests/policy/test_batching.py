"""policy.batching.response_log_probs: the vocabulary projection only over the positions that predict response tokens,
the same log-probabilities and gradients as projecting at every position."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from policy.batching import response_log_probs
from rlhf_loop.common.sequences import PairBatch, pad_pairs

PAD = 0


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=PAD)
    return LlamaForCausalLM(config).float()


def batch_of(sequences) -> PairBatch:
    return pad_pairs(sequences, PAD, torch.device("cpu"))


# prompts of different lengths and responses of different lengths: the kept span starts at the shortest prompt's
# end and stops at the longest row's last token; rows are right-padded
SEQUENCES = [([5, 6, 7, 8, 9, 10], [11, 12]), ([5, 6], [13, 14, 15, 16, 17]), ([5, 6, 7], [18])]


def test_response_positions_give_every_position_log_probs_and_gradients():
    model = tiny_llama()
    batch = batch_of(SEQUENCES)
    fast, fast_counts = response_log_probs(model, batch)
    fast.sum().backward()
    fast_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    full, full_counts = response_log_probs(model, batch, every_position=True)
    full.sum().backward()
    assert fast_counts.tolist() == full_counts.tolist() == [2, 5, 1]
    torch.testing.assert_close(fast, full, rtol=0, atol=1e-5)
    for fast_grad, param in zip(fast_grads, model.parameters()):
        torch.testing.assert_close(fast_grad, param.grad, rtol=1e-4, atol=1e-6)


def test_log_probs_are_the_sum_over_response_tokens_of_the_models_own_log_softmax():
    model = tiny_llama()
    batch = batch_of(SEQUENCES)
    with torch.no_grad():
        log_probs, _ = response_log_probs(model, batch)
        for row, (prompt, response) in enumerate(SEQUENCES):
            ids = torch.tensor([prompt + response])
            logits = model(input_ids=ids).logits[0].log_softmax(-1)
            expected = sum(logits[len(prompt) - 1 + i, token] for i, token in enumerate(response))
            torch.testing.assert_close(log_probs[row], expected, rtol=0, atol=1e-5)


def test_logits_are_computed_only_over_the_response_span():
    model = tiny_llama()
    projected = []
    model.lm_head.register_forward_hook(lambda module, inputs, output: projected.append(inputs[0].shape[1]))
    batch = batch_of(SEQUENCES)
    with torch.no_grad():
        response_log_probs(model, batch)
        response_log_probs(model, batch, every_position=True)
    # the first response token is row 1's third (predicted at position 1), the last is row 0's eighth (position 6)
    assert projected == [6, 8]


def test_a_batch_without_response_tokens_scores_zero_and_keeps_the_graph():
    model = tiny_llama()
    batch = batch_of([([5, 6, 7], []), ([5, 6], [])])
    log_probs, counts = response_log_probs(model, batch)
    assert counts.tolist() == [0, 0]
    assert log_probs.tolist() == [0.0, 0.0]
    log_probs.sum().backward()  # a weight-0 micro batch must still run its backward (ZeRO's collectives)
