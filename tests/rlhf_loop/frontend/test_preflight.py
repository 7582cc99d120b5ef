"""preflight: a bad path, column or tokenizer is a UserError naming the key before anything starts, on tiny local
models and local jsonl files."""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil

import pytest

from rlhf_loop.config import load_config
from rlhf_loop.common.errors import UserError
from rlhf_loop.frontend.preflight import preflight

pytestmark = pytest.mark.usefixtures("no_network", "no_gpu_here")

REWARDS = "def length(messages, response, meta):\n    return float(len(response))\n"


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture
def files(tmp_path):
    directory = tmp_path / "inputs"
    directory.mkdir()
    (directory / "rewards.py").write_text(REWARDS)
    write_jsonl(directory / "prompts.jsonl", [{"prompt": f"Name {i} fruits.", "answer": "apple"} for i in range(4)])
    write_jsonl(directory / "questions.jsonl", [{"question": f"Name {i} fruits."} for i in range(4)])
    write_jsonl(directory / "eval.jsonl", [{"prompt": "Name two animals."}, {"prompt": "Name three colors."}])
    conversation = [{"role": "user", "content": "Name a fruit."}]
    write_jsonl(directory / "pairs.jsonl", [{"chosen": [*conversation, {"role": "assistant", "content": "apple"}],
                                             "rejected": [*conversation, {"role": "assistant", "content": "car"}]}])
    write_jsonl(directory / "not_pairs.jsonl", [{"prompt": "Name a fruit.", "chosen": "apple", "worse": "car"}])
    write_jsonl(directory / "sft.jsonl", [{"conversation": [*conversation, {"role": "assistant", "content": "fig"}]}])
    return directory


@pytest.fixture
def config(tmp_path, files, tiny_policy_dir):
    def load(text: str = "", policy=tiny_policy_dir, prompts="prompts.jsonl", policy_extra=""):
        path = tmp_path / "run.yaml"
        path.write_text(f"device: cpu\npolicy:\n  model_path: {policy}\n{policy_extra}"
                        f"reward:\n  kind: function\n  function: {files / 'rewards.py'}:length\n"
                        f"data:\n  prompts: [{files / prompts}]\n  max_prompt_tokens: 64\n" + text)
        return load_config(path)

    return load


def snapshot(directory):
    return {str(p.relative_to(directory)): p.stat().st_mtime_ns for p in directory.rglob("*")}


def test_a_good_online_config_passes_and_writes_nothing(config, files, tmp_path):
    cfg = config(f"eval:\n  prompts: {files / 'eval.jsonl'}\n  gold_reward: {files / 'rewards.py'}:length\n")
    before = snapshot(tmp_path)
    preflight(cfg)
    assert snapshot(tmp_path) == before


def spy(monkeypatch, module, name):
    """Record what `module.name` returns while the test runs: what preflight really read."""
    real, results = getattr(module, name), []

    def recorded(*args, **kwargs):
        results.append(real(*args, **kwargs))
        return results[-1]

    monkeypatch.setattr(module, name, recorded)
    return results


def test_a_good_offline_config_passes(config, files, tmp_path, monkeypatch, capsys):
    from rlhf_loop.driver import data

    read = spy(monkeypatch, data, "load_preference_rows")
    cfg = config(f"pairs:\n  dataset: {files / 'pairs.jsonl'}\niterations: 1\n")
    before = snapshot(tmp_path)
    preflight(cfg)
    assert [[row["chosen"][-1]["content"] for row in rows] for rows in read] == [["apple"]]  # the dataset was read
    assert snapshot(tmp_path) == before and capsys.readouterr().err == ""  # nothing written, nothing to warn of


def test_a_missing_prompt_column_names_the_key(config):
    with pytest.raises(UserError, match=r"data\.prompt_column") as error:
        preflight(config(prompts="questions.jsonl"))
    assert "question" in str(error.value)  # the columns that are there


def test_a_missing_eval_prompt_column_names_the_key(config, files):
    with pytest.raises(UserError, match=r"eval\.prompt_column"):
        preflight(config(f"eval:\n  prompts: {files / 'questions.jsonl'}\n  prompt_column: prompt\n"))


@pytest.mark.parametrize("path", ["{tmp}/no_such_model", "nobody-here/no-such-model-xyz"])
def test_a_missing_model_path_names_the_key(config, tmp_path, path):
    with pytest.raises(UserError, match=r"policy\.model_path"):
        preflight(config(policy=path.format(tmp=tmp_path)))


def tokenizer_without_template(tiny_tokenizer, directory):
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = None
    tokenizer.save_pretrained(directory)
    return directory


def test_a_tokenizer_path_without_chat_template_names_the_key(config, tiny_tokenizer, tmp_path):
    directory = tokenizer_without_template(tiny_tokenizer, tmp_path / "plain_tokenizer")
    with pytest.raises(UserError, match=r"policy\.tokenizer_path .*chat template"):
        preflight(config(policy_extra=f"  tokenizer_path: {directory}\n"))


def test_a_model_whose_tokenizer_has_no_chat_template_names_the_key(config, tiny_policy_dir, tiny_tokenizer, tmp_path):
    model = tmp_path / "plain_model"
    shutil.copytree(tiny_policy_dir, model)
    for name in ("tokenizer_config.json", "tokenizer.json", "special_tokens_map.json", "chat_template.jinja"):
        (model / name).unlink(missing_ok=True)
    tokenizer_without_template(tiny_tokenizer, model)
    with pytest.raises(UserError, match=r"policy\.model_path .*chat template"):
        preflight(config(policy=model))


def test_a_pairs_dataset_without_chosen_and_rejected_names_the_key(config, files):
    with pytest.raises(UserError, match=r"pairs\.dataset .*rejected"):
        preflight(config(f"pairs:\n  dataset: {files / 'not_pairs.jsonl'}\niterations: 1\n"))


def test_a_missing_sft_messages_column_names_the_key(config, files):
    with pytest.raises(UserError, match=r"sft\.messages_column 'messages'") as error:
        preflight(config(f"sft:\n  enabled: true\n  dataset: {files / 'sft.jsonl'}\n"))
    assert "conversation" in str(error.value)


def test_an_sft_messages_column_that_is_there_passes(config, files, monkeypatch, capsys):
    from rlhf_loop.driver import data

    read = spy(monkeypatch, data, "load_sft_conversations")
    preflight(config(f"sft:\n  enabled: true\n  dataset: {files / 'sft.jsonl'}\n  messages_column: conversation\n"))
    assert [[turn["content"] for turn in conversation] for conversation in read[0]] == [["Name a fruit.", "fig"]]
    assert capsys.readouterr().err == ""


def test_a_missing_gold_reward_names_the_key(config, files):
    with pytest.raises(UserError, match=r"eval\.gold_reward"):
        preflight(config(f"eval:\n  prompts: {files / 'eval.jsonl'}\n  gold_reward: {files / 'rewards.py'}:nope\n"))


def with_reward(cfg, **fields):
    from reward.config import RewardConfig

    return dataclasses.replace(cfg, reward=RewardConfig(**fields))


def test_a_reward_model_without_a_score_head_is_refused_before_anything_is_written(config, tiny_policy_dir, tmp_path):
    cfg = with_reward(config(), kind="bradley_terry", model_path=str(tiny_policy_dir))  # a causal LM
    before = snapshot(tmp_path)
    with pytest.raises(UserError, match=r"reward\.model_path .* has no score head"):
        preflight(cfg)
    assert snapshot(tmp_path) == before


def test_custom_reward_code_without_trust_remote_code_is_refused(config, tiny_reward_dir, tmp_path):
    custom = tmp_path / "custom_rm"
    shutil.copytree(tiny_reward_dir, custom)
    settings = json.loads((custom / "config.json").read_text())
    (custom / "config.json").write_text(json.dumps({**settings, "auto_map": {"AutoModel": "modeling.Model"}}))
    with pytest.raises(UserError, match=r"ships custom modeling code .* reward\.trust_remote_code=true"):
        preflight(with_reward(config(), kind="bradley_terry", model_path=str(custom)))
    with pytest.raises(UserError, match=r"kind armorm runs the model's own modeling code"):
        preflight(with_reward(config(), kind="armorm", model_path=str(tiny_reward_dir)))


def test_a_combined_reward_checks_its_components(config, tiny_policy_dir, tiny_reward_dir):
    from reward.config import RewardComponent, RewardConfig

    good = RewardComponent(name="rm", reward=RewardConfig(kind="bradley_terry", model_path=str(tiny_reward_dir)))
    bad = RewardComponent(name="lm", reward=RewardConfig(kind="bradley_terry", model_path=str(tiny_policy_dir)))
    preflight(with_reward(config(), kind="combined", components=[good]))
    with pytest.raises(UserError, match=r"reward\.components\[1\]\.reward\.model_path"):
        preflight(with_reward(config(), kind="combined", components=[good, bad]))
