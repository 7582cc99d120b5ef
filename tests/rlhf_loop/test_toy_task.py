"""The toy task: the gold rule, deterministic data, and the asset cache (built once, reused, rebuilt on change)."""

from __future__ import annotations

import json
import random
import threading

import pytest

from rlhf_loop.toy_task import (
    CATEGORIES,
    FILLERS,
    AnswerNoise,
    ToyTaskConfig,
    edit_answer,
    ensure_toy_assets,
    gold_reward,
    make_preference_pairs,
    make_prompts,
    make_sft_examples,
    read_jsonl,
    recipe_key,
    sample_answer,
    toy_assets,
)

FRUITS = {"category": "fruits", "count": 3}
PROMPT = [{"role": "user", "content": "Name three fruits."}]


@pytest.mark.parametrize(
    "response, expected",
    [
        ("apple, banana, cherry", 1.0),
        ("Apple,banana;  CHERRY.", 1.0),  # case and punctuation do not matter
        ("apple, banana", 2 / 3),  # too few
        ("apple, banana, cherry, grape", 3 / 4),  # too many dilutes, even with good words
        ("apple, banana, cherry, grape, lemon, mango", 3 / 6),
        ("apple, stuff, cherry", 2 / 3),  # a filler
        ("apple, tiger, cherry", 2 / 3),  # another category
        ("apple, apple, apple", 1 / 3),  # a repeat counts once
        ("", 0.0),
        ("tiger, wolf, bear", 0.0),
    ],
)
def test_gold_is_the_fraction_of_a_perfect_answer(response, expected):
    assert gold_reward(PROMPT, response, FRUITS) == pytest.approx(expected)


def test_gold_cannot_be_raised_by_length():
    words = list(CATEGORIES["fruits"])
    golds = [gold_reward(PROMPT, ", ".join(words[:length]), FRUITS) for length in range(3, 12)]
    assert golds[0] == 1.0
    assert all(later < earlier for earlier, later in zip(golds, golds[1:]))


def test_prompts_are_disjoint_deterministic_and_carry_their_answer_key():
    train, held_out = make_prompts(seed=0, num_train=300, num_eval=40)
    assert (train, held_out) == make_prompts(seed=0, num_train=300, num_eval=40)
    assert make_prompts(seed=1, num_train=300, num_eval=40)[0] != train
    texts = [row["prompt"][0]["content"] for row in train + held_out]
    assert len(set(texts)) == len(texts) == 340
    for row in train[:20]:
        assert row["category"] in row["prompt"][0]["content"] and row["count"] in (2, 3, 4, 5)
    with pytest.raises(ValueError, match="num_train_prompts"):
        make_prompts(seed=0, num_train=10**6, num_eval=1)


def test_sft_answers_are_on_task_but_imperfect_and_deterministic():
    train, _ = make_prompts(seed=0, num_train=200, num_eval=10)
    noise = AnswerNoise(filler_rate=0.3, off_category_rate=0.1, count_miss_rate=0.0)
    examples = make_sft_examples(seed=0, prompts=train, num_examples=400, noise=noise)
    assert examples == make_sft_examples(seed=0, prompts=train, num_examples=400, noise=noise)
    rows = {row["prompt"][0]["content"]: row for row in train}
    golds = [gold_reward(e["messages"][:1], e["messages"][1]["content"], rows[e["messages"][0]["content"]])
             for e in examples]
    assert [m["role"] for m in examples[0]["messages"]] == ["user", "assistant"]
    assert 0.5 < sum(golds) / len(golds) < 0.7  # about 1 - 0.3 - 0.1 of the words are right
    assert min(golds) < 0.5 and max(golds) == 1.0


def test_answer_noise_rates_show_in_the_answers():
    rng = random.Random(0)
    answers = [sample_answer(rng, "animals", 4, AnswerNoise(0.5, 0.0, 0.0)) for _ in range(500)]
    words = [word for answer in answers for word in answer.split(", ")]
    assert len(words) == 2000  # no count misses asked for
    assert 0.45 < sum(word in FILLERS for word in words) / len(words) < 0.55
    short = [sample_answer(rng, "animals", 2, AnswerNoise(0.0, 0.0, 1.0, count_miss_size=3)) for _ in range(200)]
    assert "" in short and any(len(answer.split(", ")) == 5 for answer in short)


def test_an_edit_changes_one_word_at_most():
    rng = random.Random(0)
    for _ in range(200):
        answer = sample_answer(rng, "colors", 4, AnswerNoise(0.2, 0.2, 0.5))
        before, after = answer.split(", ") if answer else [], edit_answer(rng, answer, "colors")
        after = after.split(", ") if after else []
        assert abs(len(after) - len(before)) <= 1
        if len(after) == len(before):
            assert sum(a != b for a, b in zip(before, after)) <= 1


def test_preference_pairs_are_labelled_by_gold_and_deterministic():
    train, _ = make_prompts(seed=0, num_train=200, num_eval=10)
    pairs = make_preference_pairs(seed=0, prompts=train, num_pairs=300)
    assert pairs == make_preference_pairs(seed=0, prompts=train, num_pairs=300)
    rows = {row["prompt"][0]["content"]: row for row in train}
    for pair in pairs:
        row = rows[pair.prompt[0]["content"]]
        assert gold_reward(pair.prompt, pair.chosen, row) > gold_reward(pair.prompt, pair.rejected, row)
    category_only = make_preference_pairs(seed=0, prompts=train, num_pairs=50, edited_fraction=0.0,
                                          category_fraction=1.0)
    for pair in category_only:
        row = rows[pair.prompt[0]["content"]]
        assert gold_reward(pair.prompt, pair.chosen, row) == 1.0 and len(pair.rejected.split(", ")) == row["count"]


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


def test_a_second_call_is_a_cache_hit(built, monkeypatch):
    import rlhf_loop.toy_task as toy_task

    cfg, assets = built
    monkeypatch.setattr(toy_task, "_build_in_child_process", lambda *_: pytest.fail("rebuilt a valid cache"))
    assert ensure_toy_assets(cfg) == assets
    threads = [threading.Thread(target=ensure_toy_assets, args=(cfg,)) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def test_concurrent_callers_build_once_and_a_changed_recipe_replaces_the_cache(tmp_path, monkeypatch):
    import rlhf_loop.toy_task as toy_task

    builds = []

    def fake_build(config, staging):  # the real one is covered above; this checks the caching around it
        builds.append(config.seed)
        (staging / "made_by_seed").write_text(str(config.seed))
        (staging / "build.json").write_text(json.dumps({"recipe_key": recipe_key(config)}))

    monkeypatch.setattr(toy_task, "_build_in_child_process", fake_build)
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
    import rlhf_loop.toy_task as toy_task

    cfg = small_config(tmp_path / "toy_task")
    monkeypatch.setattr(toy_task, "_CHILD_BUILD", "raise SystemExit(3)")
    with pytest.raises(RuntimeError, match="building the toy task assets"):
        ensure_toy_assets(cfg)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".toy_task.lock"]
