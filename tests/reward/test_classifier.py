"""Bradley-Terry and ArmoRM-style scorers on tiny local models."""

from __future__ import annotations

import json
import math

import pytest
import torch

from reward.base import RewardQuery
from reward.config import RewardConfig
from reward.hf import render, truncate_left
from reward.registry import build_reward_model
from rlhf_loop.common.errors import UserError


@pytest.fixture(scope="module")
def queries(tiny_messages):
    return [
        RewardQuery(tiny_messages[0], ["apple, banana, cherry", "no", ""]),
        RewardQuery(tiny_messages[1], ["one two three four five " * 4, "five"]),
        RewardQuery(tiny_messages[2], ["The waves roll in and out under the moon."]),
    ]


@pytest.fixture(scope="module")
def bt(tiny_reward_dir):
    return build_reward_model(RewardConfig(model_path=str(tiny_reward_dir), batch_size=4), "cpu")


def reference_scores(model_dir, tokenizer, queries, max_length=10_000):
    """Each sample scored alone by plain transformers: what batching must not change."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    scores = []
    with torch.inference_mode():
        for query in queries:
            for response in query.responses:
                ids = truncate_left(render(tokenizer, query.messages, response), max_length, tokenizer.bos_token_id)
                scores.append(model(torch.tensor([ids])).logits[0, 0].item())
    return scores


def test_bradley_terry_matches_unbatched_forward(bt, queries, tiny_reward_dir):
    results = bt.score(queries)
    assert [len(r.scores) for r in results] == [3, 2, 1]
    flat = [s for r in results for s in r.scores]
    assert flat == pytest.approx(reference_scores(tiny_reward_dir, bt.tokenizer, queries), abs=1e-5)
    assert len(set(flat)) == len(flat)  # different responses, different scores: the head is really read
    assert all(r.objectives == {} for r in results)


def test_bradley_terry_is_deterministic_and_batch_independent(bt, queries, tiny_reward_dir):
    one_at_a_time = build_reward_model(RewardConfig(model_path=str(tiny_reward_dir), batch_size=1), "cpu")
    first, again = bt.score(queries), bt.score(queries)
    assert [r.scores for r in first] == [r.scores for r in again]
    assert [s for r in first for s in r.scores] == pytest.approx(
        [s for r in one_at_a_time.score(queries) for s in r.scores], abs=1e-5)


def test_over_long_inputs_keep_their_end(tiny_reward_dir, tiny_messages):
    long_prompt = [{"role": "user", "content": "Count to five: one two three four five. " * 40}]
    query = [RewardQuery(long_prompt, ["one two three four five"])]
    model = build_reward_model(RewardConfig(model_path=str(tiny_reward_dir), max_length=32), "cpu")
    full = render(model.tokenizer, long_prompt, "one two three four five")
    assert len(full) > 32
    kept = truncate_left(full, 32, model.tokenizer.bos_token_id)
    assert len(kept) == 32 and kept[0] == full[0] and kept[1:] == full[-31:]
    expected = reference_scores(tiny_reward_dir, model.tokenizer, query, max_length=32)
    assert model.score(query)[0].scores == pytest.approx(expected, abs=1e-5)


def test_score_texts_scores_rendered_conversations(bt, queries):
    query = queries[0]
    texts = [bt.tokenizer.apply_chat_template([*query.messages, {"role": "assistant", "content": r}], tokenize=False)
             for r in query.responses]
    assert bt.score_texts(texts).scores == pytest.approx(bt.score([query])[0].scores, abs=1e-6)


def test_causal_lm_is_rejected_at_start_up(tiny_policy_dir):
    with pytest.raises(UserError, match="has no score head"):
        build_reward_model(RewardConfig(model_path=str(tiny_policy_dir)), "cpu")


def test_classifier_with_untrained_head_is_rejected(tiny_policy_dir, tmp_path):
    """A causal LM whose config claims one label: transformers would make a random head; we refuse."""
    import shutil

    shutil.copytree(tiny_policy_dir, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["id2label"], config["label2id"] = {"0": "LABEL_0"}, {"LABEL_0": 0}
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="no trained score head"):
        build_reward_model(RewardConfig(model_path=str(tmp_path / "m")), "cpu")


def test_missing_directory_is_one_clear_line(tmp_path):
    with pytest.raises(UserError, match="is not a directory") as error:
        build_reward_model(RewardConfig(model_path=str(tmp_path / "nope")), "cpu")
    assert "\n" not in str(error.value)


def test_tokenizer_without_chat_template_is_rejected(tiny_reward_dir, tmp_path):
    import shutil

    shutil.copytree(tiny_reward_dir, tmp_path / "m")
    for name in ("tokenizer_config.json",):
        config = json.loads((tmp_path / "m" / name).read_text())
        config.pop("chat_template", None)
        (tmp_path / "m" / name).write_text(json.dumps(config))
    (tmp_path / "m" / "chat_template.jinja").unlink(missing_ok=True)
    with pytest.raises(UserError, match="no chat template"):
        build_reward_model(RewardConfig(model_path=str(tmp_path / "m")), "cpu")


def test_nan_scores_name_the_sample(tiny_reward_dir, queries):
    model = build_reward_model(RewardConfig(model_path=str(tiny_reward_dir)), "cpu")
    with torch.no_grad():
        model.model.score.weight.fill_(math.nan)
    with pytest.raises(UserError, match=r"returned nan for query 0 response 0 \(prompt 'Name three fruits.'"):
        model.score(queries)


# -- ArmoRM-style: custom modeling code with .score, .rewards, .gating_output ------------------------------------

OBJECTIVES = ["helpfulness", "correctness", "verbosity"]


@pytest.fixture(scope="module")
def tiny_armorm_dir(tiny_tokenizer, tmp_path_factory):
    """Our tiny ArmoRM-style model saved with its modeling file, so config.json carries an auto_map."""
    import importlib.util
    import sys
    from pathlib import Path

    from rlhf_loop.toy.tiny import tiny_llama_config

    source = Path(__file__).parent / "tiny_armorm" / "modeling_tiny_armorm.py"
    spec = importlib.util.spec_from_file_location("modeling_tiny_armorm", source)
    module = importlib.util.module_from_spec(spec)
    sys.modules["modeling_tiny_armorm"] = module
    spec.loader.exec_module(module)
    module.TinyArmoConfig.register_for_auto_class()
    module.TinyArmoRM.register_for_auto_class("AutoModelForSequenceClassification")
    torch.manual_seed(0)
    config = module.TinyArmoConfig(num_objectives=len(OBJECTIVES), **tiny_llama_config(tiny_tokenizer).to_dict())
    out_dir = tmp_path_factory.mktemp("tiny_armorm")
    module.TinyArmoRM(config).save_pretrained(out_dir)
    tiny_tokenizer.save_pretrained(out_dir)
    del sys.modules["modeling_tiny_armorm"]  # the scorer must load the copy next to the weights, as for a hub model
    assert json.loads((out_dir / "config.json").read_text())["auto_map"]
    return out_dir


def armorm_config(model_dir, **overrides) -> RewardConfig:
    settings = dict(kind="armorm", model_path=str(model_dir), trust_remote_code=True, batch_size=4,
                    objectives=OBJECTIVES)
    return RewardConfig(**{**settings, **overrides})


def test_armorm_scores_objectives_and_gating(tiny_armorm_dir, queries):
    from transformers import AutoModelForSequenceClassification

    model = build_reward_model(armorm_config(tiny_armorm_dir), "cpu")
    assert model.objectives == [*OBJECTIVES, "gating/0", "gating/1", "gating/2"]
    results = model.score(queries)
    reference = AutoModelForSequenceClassification.from_pretrained(tiny_armorm_dir, trust_remote_code=True).eval()
    for query, result in zip(queries, results):
        for r, response in enumerate(query.responses):
            with torch.inference_mode():
                output = reference(torch.tensor([render(model.tokenizer, query.messages, response)]))
            assert result.scores[r] == pytest.approx(output.score[0].item(), abs=1e-5)
            for i, name in enumerate(OBJECTIVES):
                assert result.objectives[name][r] == pytest.approx(output.rewards[0, i].item(), abs=1e-5)
            gates = [result.objectives[f"gating/{i}"][r] for i in range(3)]
            assert sum(gates) == pytest.approx(1.0, abs=1e-5)


def test_armorm_per_objective_means_reach_the_metrics(tiny_armorm_dir, queries):
    from rlhf_loop.driver.metrics import reward_metrics
    from rlhf_loop.common.records import Prompt, Response, Rollout, Scored

    results = build_reward_model(armorm_config(tiny_armorm_dir), "cpu").score(queries)
    scored = [
        Scored(Rollout(Prompt(i, q.messages, [1]), [Response(r, [1], "stop") for r in q.responses]),
               result.scores, result.objectives)
        for i, (q, result) in enumerate(zip(queries, results))
    ]
    metrics = reward_metrics(scored, [])
    helpfulness = [v for r in results for v in r.objectives["helpfulness"]]
    assert metrics["reward/helpfulness_mean"] == pytest.approx(sum(helpfulness) / len(helpfulness))
    assert {"reward/verbosity_mean", "reward/gating/0_mean"} <= set(metrics)


def test_armorm_without_trust_remote_code_fails_at_start_up(tiny_armorm_dir):
    with pytest.raises(UserError, match="trust_remote_code=true"):
        build_reward_model(armorm_config(tiny_armorm_dir, trust_remote_code=False), "cpu")
    # The same directory as a Bradley-Terry model: custom code is refused there too.
    with pytest.raises(UserError, match="ships custom modeling code"):
        build_reward_model(RewardConfig(model_path=str(tiny_armorm_dir)), "cpu")


def test_armorm_objective_names_must_match_the_model(tiny_armorm_dir):
    with pytest.raises(UserError, match="names 2 objectives but .* outputs 3"):
        build_reward_model(armorm_config(tiny_armorm_dir, objectives=["a", "b"]), "cpu")


def test_armorm_kind_on_a_plain_classifier_fails_at_start_up(tiny_reward_dir):
    with pytest.raises(UserError, match=r"output has no \.score"):
        build_reward_model(armorm_config(tiny_reward_dir, objectives=[]), "cpu")
