"""Cutting and padding, shared by the learners and the reward models: a cut prompt keeps BOS, its system turn and its
end; a response keeps its start; the cuts are counted; batches are right-padded with the right masks."""

from __future__ import annotations

import torch

from rlhf_loop.common.sequences import PromptHead, count_cuts, cut_pair, cut_prompt, pad_pairs, padded_batches


def test_a_cut_keeps_the_prompt_end_and_the_response_start():
    prompt, response = cut_pair(list(range(10)), list(range(100, 110)), max_prompt_length=4, max_length=7)
    assert prompt == [6, 7, 8, 9] and response == [100, 101, 102]


def test_a_cut_prompt_keeps_its_head_and_its_last_tokens():
    assert cut_prompt(list(range(10)), 6, head=2) == [0, 1, 6, 7, 8, 9]
    assert cut_prompt(list(range(10)), 6, head=4) == [0, 5, 6, 7, 8, 9]  # a head over half the room: BOS only
    assert cut_prompt(list(range(5)), 6, head=2) == [0, 1, 2, 3, 4]  # nothing to cut


def test_the_head_is_bos_and_the_system_turn_of_the_tokenizer_s_own_template(tiny_tokenizer):
    head = PromptHead.of(tiny_tokenizer)
    system = [{"role": "system", "content": "You are brief."}]
    turns = [{"role": "user", "content": f"Question {i} about fruit, vegetables and more."} for i in range(6)]

    def rendered(messages):
        text = tiny_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return tiny_tokenizer(text, add_special_tokens=False)["input_ids"]

    with_system, system_only = rendered(system + turns), rendered(system)
    kept = head.length(with_system)
    system_turn = tiny_tokenizer.decode(with_system[:kept])
    assert "You are brief." in system_turn and "Question 0" not in system_turn
    cut = cut_prompt(with_system, len(with_system) - 20, kept)
    assert cut[:kept] == with_system[:kept] and cut[-10:] == with_system[-10:]
    assert kept < len(system_only)  # the system turn alone, not the generation prompt rendered after it
    without_system = rendered(turns)
    bos = tiny_tokenizer.bos_token_id
    assert head.length(without_system) == (1 if bos is not None and without_system[0] == bos else 0)


def test_cuts_are_counted_per_pair():
    pairs = [([1] * 3, [2] * 3, [3] * 3),  # fits
             ([1] * 8, [2] * 1, [3] * 1),  # prompt over 5
             ([1] * 3, [2] * 1, [3] * 9),  # rejected response over the rest of 10
             ([1] * 9, [2] * 9, [3] * 1)]  # both
    counts = count_cuts(pairs, max_prompt_length=5, max_length=10)
    assert (counts.prompts, counts.responses) == (2, 2)


def test_pairs_are_right_padded_with_their_responses_marked():
    batch = pad_pairs([([5, 6], [7]), ([5], [8, 9, 10])], pad_token_id=0, device="cpu")
    assert batch.input_ids.tolist() == [[5, 6, 7, 0], [5, 8, 9, 10]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    assert batch.response_mask.tolist() == [[0, 0, 1, 0], [0, 1, 1, 1]]


def test_reward_batches_go_longest_first_and_point_at_each_row_s_last_token():
    batches = list(padded_batches([[1], [1, 2, 3], [1, 2]], batch_size=2, pad_id=0, device="cpu"))
    assert [b.indices for b in batches] == [[1, 2], [0]]
    assert batches[0].input_ids.tolist() == [[1, 2, 3], [1, 2, 0]]
    assert torch.equal(batches[0].last_positions, torch.tensor([2, 1]))


def test_episode_rows_mark_only_their_loss_mask_and_a_cut_keeps_its_start():
    batch = pad_pairs([([1, 2], [3, 4, 5, 6]), ([7], [8, 9]), ([1], [2, 3, 4])], pad_token_id=0, device="cpu",
                      loss_masks=[[1, 0, 0, 1], None, [1, 1, 0, 0, 1]])  # the last row's response was cut to 3
    assert batch.response_mask.tolist() == [[0, 0, 1, 0, 0, 1], [0, 1, 1, 0, 0, 0], [0, 1, 1, 0, 0, 0]]
    assert batch.attention_mask.tolist() == [[1] * 6, [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0]]
