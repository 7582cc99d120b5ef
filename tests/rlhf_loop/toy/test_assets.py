"""The toy task's asset cache: built once, reused, rebuilt on change, never left half-built."""

from __future__ import annotations

import json
import threading

import pytest

import rlhf_loop.toy.assets as assets_module
from rlhf_loop.common.files import read_jsonl
from rlhf_loop.toy.assets import ToyTaskConfig, ensure_toy_assets, recipe_key, toy_assets

def test_recipe_key_ignores_where_the_cache_lives_but_not_the_recipe():
    base = ToyTaskConfig()
    assert recipe_key(base) == recipe_key(ToyTaskConfig(enabled=True, dir="/elsewhere"))
    assert recipe_key(base) != recipe_key(ToyTaskConfig(sft_epochs=base.sft_epochs + 1))


# A recipe small enough to build in seconds: it checks the plumbing, not the calibration.
def small_config(directory, **overrides) -> ToyTaskConfig:
    sizes = dict(num_train_prompts=64, num_eval_prompts=16, num_sft_examples=32, num_rm_category_pairs=16,
                 num_rm_pairs=16, num_rm_eval_pairs=16, sft_epochs=1, rm_category_epochs=1, rm_epochs=1)
    return ToyTaskConfig(enabled=True, dir=str(directory), **{**sizes, **overrides})


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cfg = small_config(tmp_path_factory.mktemp("cache") / "toy_task")
    return cfg, ensure_toy_assets(cfg)


@pytest.mark.integration  # builds the assets: SFT on DeepSpeed in a child process
def test_ensure_builds_every_asset_with_the_documented_layout(built):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    cfg, assets = built
    assert assets == toy_assets(cfg.dir)
    assert assets.sft_policy.name == "sft_policy" and assets.train_prompts.name == "train_prompts.jsonl"
    assert len(read_jsonl(assets.train_prompts)) == 64 and len(read_jsonl(assets.eval_prompts)) == 16
    assert read_jsonl(assets.sft_data)[0]["messages"][-1]["role"] == "assistant"
    assert {"chosen", "rejected", "prompt"} == set(read_jsonl(assets.rm_pairs)[0])
    AutoModelForCausalLM.from_pretrained(assets.base_policy)
    AutoModelForCausalLM.from_pretrained(assets.sft_policy)
    reward_model = AutoModelForSequenceClassification.from_pretrained(assets.reward_model)
    assert reward_model.config.num_labels == 1
    assert AutoTokenizer.from_pretrained(assets.sft_policy).chat_template
    stamp = json.loads(assets.stamp.read_text())
    assert stamp["recipe_key"] == recipe_key(cfg) and 0 <= stamp["reward_model"]["eval_accuracy"] <= 1
    leftovers = [p.name for p in assets.stamp.parent.parent.iterdir() if p.name.startswith(".toy_task.")]
    assert leftovers == [".toy_task.lock"]  # no staging or retired directories left behind


@pytest.mark.integration  # builds the assets: SFT on DeepSpeed in a child process
def test_a_second_call_is_a_cache_hit(built, monkeypatch):
    cfg, assets = built
    monkeypatch.setattr(assets_module, "_build_in_child_process", lambda *_: pytest.fail("rebuilt a valid cache"))
    assert ensure_toy_assets(cfg) == assets
    threads = [threading.Thread(target=ensure_toy_assets, args=(cfg,)) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def test_concurrent_callers_build_once_and_a_changed_recipe_replaces_the_cache(tmp_path, monkeypatch):
    builds = []

    def fake_build(config, staging):  # the real one is covered above; this checks the caching around it
        builds.append(config.seed)
        (staging / "made_by_seed").write_text(str(config.seed))
        (staging / "build.json").write_text(json.dumps({"recipe_key": recipe_key(config)}))

    monkeypatch.setattr(assets_module, "_build_in_child_process", fake_build)
    directory = tmp_path / "toy_task"
    for seed in (0, 1):
        threads = [threading.Thread(target=ensure_toy_assets, args=(small_config(directory, seed=seed),))
                   for _ in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert (directory / "made_by_seed").read_text() == str(seed)
    assert builds == [0, 1]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".toy_task.lock", "toy_task"]


def test_a_failed_build_leaves_the_cache_as_it_was(tmp_path, monkeypatch):
    cfg = small_config(tmp_path / "toy_task")
    monkeypatch.setattr(assets_module, "_CHILD_BUILD", "raise SystemExit(3)")
    with pytest.raises(RuntimeError, match="building the toy task assets"):
        ensure_toy_assets(cfg)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".toy_task.lock"]
