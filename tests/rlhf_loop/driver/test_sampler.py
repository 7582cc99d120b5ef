"""Generation and scoring overlapped, and sampling one update behind (rollout.max_staleness 1), with the fakes of
test_stages: which units each records, that scoring runs while generation does, that the weights go to the engines
only once they have finished sampling from the old ones, and that a resumed process gives them the right ones."""

from __future__ import annotations

import threading
import time

import pytest
from test_stages import FakeLearner, FakeRollout, LengthReward, make_config, new_run, prompt

from policy.rollout_protocol import Sampling
from rlhf_loop.driver import sampler as streaming
from rlhf_loop.config import load_config
from rlhf_loop.common.errors import ConfigError
from rlhf_loop.rundir.manifest import RunDir
from rlhf_loop.common.seeds import derived_seed
from rlhf_loop.driver.sampler import Sampler, generate_and_score, learner_version


@pytest.fixture
def run_dir(tmp_path):
    return RunDir.create(tmp_path / "run", overwrite=False)


def prompt_file(tmp_path, count: int = 6):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(f'{{"prompt": "prompt {i}"}}\n' for i in range(count)))
    return str(path)


class Tokenizer:
    """Just enough of a chat tokenizer for data.iteration_prompts."""

    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        return " ".join(message["content"] for message in messages)

    def __call__(self, text, add_special_tokens):
        return {"input_ids": [len(word) for word in text.split()]}


# ---- generate and score ------------------------------------------------------------------------------------------

def test_generation_is_sharded_seeded_and_marked_with_its_policy_version(run_dir):
    cfg = make_config(seed=7, rollout={"samples_per_prompt": 3, "temperature": 0.7, "top_p": 0.9, "max_tokens": 11,
                                       "shard_size": 2}, reward={"shard_size": 3})
    engine, reward = FakeRollout(), LengthReward()
    prompts = [prompt(i) for i in range(5)]
    first = generate_and_score(new_run(run_dir, cfg), engine, reward, prompts, 1)
    generate_and_score(new_run(run_dir, cfg), engine, reward, prompts, 3)

    assert [indices for indices, _ in engine.calls] == [[0, 1], [2, 3], [4]] * 2
    assert engine.calls[0][1] == Sampling(n=3, temperature=0.7, top_p=0.9, max_tokens=11,
                                          seed=derived_seed(7, "rollout", 1))
    assert engine.calls[-1][1].seed == derived_seed(7, "rollout", 3)
    assert [s.rollout.prompt for s in first] == prompts and [s.scores for s in first][0] == [3.0, 4.0]
    run = new_run(run_dir, cfg)
    assert [run.manifest.info(f"iter_003/rollouts/shard_{i:05d}")["policy_version"] for i in range(3)] == [2] * 3
    assert {s.rollout.policy_version for s in first} == {0}
    assert [run.manifest.info(f"iter_001/scores/shard_{i:05d}")["items"] for i in range(2)] == [3, 2]  # reward's size

    calls, queries = len(engine.calls), len(reward.queries)
    assert generate_and_score(new_run(run_dir, cfg), engine, reward, prompts, 1) == first  # read back, equal records
    assert (len(engine.calls), len(reward.queries)) == (calls, queries)


def test_a_shard_is_scored_while_the_next_one_generates(run_dir):
    scored_first = threading.Event()

    class WaitsForTheScorer(FakeRollout):
        def generate(self, prompts, sampling):
            if prompts[0].index == 2:  # shard 1 generates only once shard 0 is scored: no overlap, no progress
                assert scored_first.wait(timeout=10), "shard 0 was not scored while shard 1 generated"
            return super().generate(prompts, sampling)

    class SignalsScores(LengthReward):
        def score(self, queries):
            results = super().score(queries)
            scored_first.set()
            return results

    cfg = make_config(rollout={"shard_size": 2}, reward={"shard_size": 2})
    scored = generate_and_score(new_run(run_dir, cfg), WaitsForTheScorer(), SignalsScores(),
                                [prompt(i) for i in range(4)], 1)
    assert [s.rollout.prompt.index for s in scored] == [0, 1, 2, 3]


def test_a_scoring_error_stops_the_run_before_the_rest_is_generated(run_dir):
    class FailsFirstShard(LengthReward):
        def score(self, queries):
            raise RuntimeError("the reward model ran out of memory")

    class WaitsForTheFailure(FakeRollout):
        def generate(self, prompts, sampling):
            if prompts[0].index >= 2:  # shard 0 is being scored (and fails) meanwhile
                time.sleep(0.3)
            return super().generate(prompts, sampling)

    engine = WaitsForTheFailure()
    cfg = make_config(rollout={"shard_size": 2}, reward={"shard_size": 2})
    with pytest.raises(RuntimeError, match="ran out of memory"):
        generate_and_score(new_run(run_dir, cfg), engine, FailsFirstShard(), [prompt(i) for i in range(12)], 1)
    assert len(engine.calls) < 6  # stopped at a shard boundary after the failure, not after all six shards


def test_policy_versions_follow_max_staleness():
    on_policy, stale = make_config(), make_config(rollout={"max_staleness": 1})
    assert [on_policy.policy_version(i) for i in (1, 2, 3)] == [0, 1, 2]
    assert [stale.policy_version(i) for i in (1, 2, 3, 4)] == [0, 0, 1, 2]
    assert make_config(train={"enabled": False}).policy_version(3) == 0  # nothing trained: pi_0 throughout


def test_max_staleness_other_than_0_or_1_is_refused(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(f"policy: {{model_path: p}}\ndata: {{prompts: [{prompt_file(tmp_path)}]}}\n")
    with pytest.raises(ConfigError, match="rollout.max_staleness must be 0"):
        load_config(config, ["rollout.max_staleness=2"])


# ---- the sampler -----------------------------------------------------------------------------------------------------

class Recorder(FakeRollout):
    """Logs generate and sync calls in order, with the iteration a generate call belongs to."""

    def __init__(self, events):
        super().__init__()
        self.events = events

    def generate(self, prompts, sampling):
        time.sleep(0.2)  # slow enough that a sync not waiting for the sample would land first
        self.events.append(("generate", sampling.seed))
        return super().generate(prompts, sampling)

    def sync_from(self, learner):
        self.events.append(("sync", learner))
        super().sync_from(learner)


def stale_run(run_dir, tmp_path, **rollout):
    cfg = make_config(iterations=3, rollout={"max_staleness": 1, "shard_size": 2, **rollout},
                      data={"prompts": [prompt_file(tmp_path)], "prompts_per_iteration": 2, "shuffle": False})
    return new_run(run_dir, cfg)


def test_stale_sampling_runs_during_training_and_the_sync_waits_for_it(run_dir, tmp_path):
    events, learner = [], FakeLearner()
    run = stale_run(run_dir, tmp_path)
    engine = Recorder(events)
    sampler = Sampler(run, engine, LengthReward(), learner, Tokenizer(),
                      learner_version=0, initial_policy=run.cfg.policy)
    first = sampler.sample(1)
    sampler.start_ahead(2)  # from pi_0, like iteration 1
    events.append(("training", 1))
    sampler.sync(1)
    second = sampler.sample(2)  # the one taken ahead: nothing more is generated
    seed = derived_seed(run.cfg.seed, "rollout", 2)
    assert events.index(("generate", seed)) < events.index(("sync", learner))
    assert events.count(("generate", seed)) == 1
    assert [p.policy_version for p in first.selection.pairs + second.selection.pairs] == [0] * 4
    sampler.start_ahead(3)  # from the weights of iteration 1, which the engines hold: no push
    sampler.sync(2)
    assert [e[0] for e in events].count("sync") == 2
    assert {p.policy_version for p in sampler.sample(3).selection.pairs} == {1}
    assert run.manifest.info("iter_003/rollouts/shard_00000")["policy_version"] == 1


def test_on_policy_nothing_is_sampled_ahead_and_each_sample_follows_the_sync(run_dir, tmp_path):
    events, learner = [], FakeLearner()
    run = stale_run(run_dir, tmp_path, max_staleness=0)
    sampler = Sampler(run, Recorder(events), LengthReward(), learner, Tokenizer(),
                      learner_version=0, initial_policy=run.cfg.policy)
    sampler.sample(1)
    sampler.start_ahead(2)
    assert len(events) == 1  # iteration 1's one shard only
    sampler.sync(1)
    assert {p.policy_version for p in sampler.sample(2).selection.pairs} == {1}
    assert [e[0] for e in events] == ["generate", "sync", "generate"]


def test_a_resumed_sampler_gives_the_engines_the_version_a_sample_is_due_from(run_dir, tmp_path, monkeypatch):
    loaded = []
    monkeypatch.setattr(streaming, "load_exported_policy", lambda rollout, directory: loaded.append(directory))
    run, learner, engine = stale_run(run_dir, tmp_path), FakeLearner(), FakeRollout()
    # Killed while training iteration 2, with iteration 3 half sampled: the learner is past version 1, which
    # iteration 3 is due from, so the engines get iteration 1's export
    sampler = Sampler(run, engine, LengthReward(), learner, Tokenizer(),
                      learner_version=None, initial_policy=run.cfg.policy)
    sampler.start_ahead(3)
    assert {p.policy_version for p in sampler.sample(3).selection.pairs} == {1}
    assert loaded == [run_dir.iteration(1) / "policy"] and engine.synced_from == []
    # while the learner trains on, an engine that restarts must get version 1 again: from its export
    assert engine.restart_sources == [run_dir.iteration(1) / "policy"]
    # A sample whose pairs are recorded is only read back: the engines need no weights for it
    again = Sampler(new_run(run_dir, run.cfg), engine, LengthReward(), learner, Tokenizer(),
                    learner_version=None, initial_policy=run.cfg.policy)
    again.start_ahead(3)
    assert again.sample(3).selection.pairs and len(loaded) == 1 and len(engine.calls) == 1
    # Killed before training iteration 2: the learner still holds version 1 and pushes it, nothing is loaded
    other = stale_run(RunDir.create(tmp_path / "other", overwrite=False), tmp_path)
    sampler = Sampler(other, engine, LengthReward(), learner, Tokenizer(),
                      learner_version=1, initial_policy=run.cfg.policy)
    sampler.start_ahead(3)
    assert sampler.sample(3).selection.pairs
    assert engine.synced_from == [learner] and len(loaded) == 1


# ---- the learner prepares the iteration while the engines generate --------------------------------------------------

def prepared(learner) -> list[tuple]:
    return [call[1:] for call in learner.calls if call[0] == "prepare_pairs"]


def test_each_scoring_shard_s_pairs_go_to_the_learner_while_the_engines_generate(run_dir, tmp_path):
    events = []

    class Learner(FakeLearner):
        def prepare_pairs(self, iteration, pairs, reference_dir):
            events.append(("prepare", [p.prompt_index for p in pairs]))
            super().prepare_pairs(iteration, pairs, reference_dir)

    cfg = make_config(rollout={"shard_size": 2}, reward={"shard_size": 3},
                      data={"prompts": [prompt_file(tmp_path)], "prompts_per_iteration": 6, "shuffle": False})
    run, learner, engine = new_run(run_dir, cfg), Learner(), Recorder(events)
    engine.texts = lambda index: ["same", "same"] if index == 1 else [f"r{index}a", f"r{index}bb"]  # 1: no pair
    sample = Sampler(run, engine, LengthReward(), learner, Tokenizer(), 0, run.cfg.policy).sample(1)

    assert prepared(learner) == [(1, [0, 2], "any/policy"), (1, [3, 4, 5], "any/policy")]  # reward.shard_size 3
    assert [p.prompt_index for p in sample.selection.pairs] == [0, 2, 3, 4, 5]  # the same pairs, recorded as before
    assert [kind for kind, _ in events] == ["generate", "generate", "prepare", "generate", "prepare"]  # ahead of the
    # last generation shard: the first scoring shard's pairs, as soon as they are scored


def test_nothing_is_prepared_ahead_for_recorded_pairs_colocated_or_before_the_reference_exists(
    run_dir, tmp_path
):
    data = {"prompts": [prompt_file(tmp_path)], "prompts_per_iteration": 2, "shuffle": False}
    stale = new_run(run_dir, make_config(iterations=3, rollout={"max_staleness": 1}, data=data))
    learner = FakeLearner()
    sampler = Sampler(stale, FakeRollout(), LengthReward(), learner, Tokenizer(), 0, stale.cfg.policy)
    sampler.sample(1)
    sampler.start_ahead(2)  # sampled while the learner trains iteration 1
    sampler.sync(1)
    sampler.sample(2)
    assert [call[0] for call in prepared(learner)] == [1]
    again = Sampler(new_run(run_dir, stale.cfg), FakeRollout(), LengthReward(), learner, Tokenizer(), 1,
                    stale.cfg.policy)
    again.sample(1)  # recorded: read back, and begin_iteration takes the pairs as they are
    assert [call[0] for call in prepared(learner)] == [1]

    colocated = new_run(RunDir.create(tmp_path / "colocated", overwrite=False),
                        make_config(cluster={"colocate": True}, data=data))
    learner = FakeLearner()
    Sampler(colocated, FakeRollout(), LengthReward(), learner, Tokenizer(), 0, colocated.cfg.policy).sample(1)
    assert prepared(learner) == []  # the engines hold the shared GPUs while they generate

    for exported in (False, True):  # reference: previous, whose policy is exported only once iteration 1 trained
        previous_dir = RunDir.create(tmp_path / f"previous_{exported}", overwrite=False)
        previous = new_run(previous_dir, make_config(iterations=3, train={"reference": "previous"}, data=data))
        if exported:
            (previous_dir.iteration(1) / "policy").mkdir(parents=True)
        learner = FakeLearner()
        Sampler(previous, FakeRollout(), LengthReward(), learner, Tokenizer(), 1, previous.cfg.policy).sample(2)
        assert prepared(learner) == ([(2, [2, 3], str(previous_dir.iteration(1) / "policy"))] if exported else [])


def test_the_learner_version_after_loading_a_checkpoint(run_dir):
    run = new_run(run_dir)
    assert learner_version(run) == 0  # no checkpoint: pi_0
    run.manifest.record("iter_001/train/step_000004")
    assert learner_version(run) is None  # iteration 1 not finished training
    run.manifest.record("iter_001/export")
    assert learner_version(run) == 1
    run.manifest.record("iter_002/train/step_000002")
    assert learner_version(run) is None


def test_the_learner_version_past_iteration_999(run_dir):
    run = new_run(run_dir)
    for iteration in (999, 1000):
        run.manifest.record(f"iter_{iteration:03d}/train/step_000004")
        run.manifest.record(f"iter_{iteration:03d}/export")
    assert learner_version(run) == 1000
    run.manifest.record("iter_1001/train/step_000002")
    assert learner_version(run) is None


@pytest.mark.integration  # starts a vLLM engine in a Ray actor
def test_an_exported_policy_loaded_into_the_engines_is_what_they_sample_from(ray_local, tiny_policy_dir, tiny_messages,
                                                                              tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from policy.config import PolicyConfig, RolloutConfig
    from policy.rollout_group import RolloutGroup
    from rlhf_loop.common.records import Prompt

    tokenizer = AutoTokenizer.from_pretrained(tiny_policy_dir)
    prompts = [Prompt(i, messages, list(tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                                      tokenize=True, return_dict=False)))
               for i, messages in enumerate(tiny_messages)]
    exported = AutoModelForCausalLM.from_pretrained(tiny_policy_dir)  # "iteration 1's policy": pi_0, moved
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in exported.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    exported.save_pretrained(tmp_path / "policy")
    expected = []
    for p in prompts:
        tokens = exported.generate(torch.tensor([p.token_ids]), do_sample=False, max_new_tokens=12)[0, len(p.token_ids):]
        tokens = tokens.tolist()
        expected.append(tokens[:tokens.index(tokenizer.eos_token_id) + 1] if tokenizer.eos_token_id in tokens else tokens)

    rollout = RolloutGroup(PolicyConfig(model_path=str(tiny_policy_dir)), RolloutConfig(engine="vllm"), "cpu",
                           max_model_len=128, seed=0)
    try:
        assert rollout.greedy(prompts, 12)[0] != expected, "the moved weights sample alike: the test could not fail"
        streaming.load_exported_policy(rollout, tmp_path / "policy")
        assert rollout.greedy(prompts, 12)[0] == expected
    finally:
        rollout.shutdown()


def test_nothing_is_prepared_ahead_where_the_learner_would_share_the_engines_cores(run_dir, tmp_path):
    data = {"prompts": [prompt_file(tmp_path)], "prompts_per_iteration": 2, "shuffle": False}
    run, learner = new_run(run_dir, make_config(data=data)), FakeLearner()
    sample = Sampler(run, FakeRollout(), LengthReward(), learner, Tokenizer(), 0, run.cfg.policy,
                     prepares_ahead=False).sample(1)
    assert sample.selection.pairs and prepared(learner) == []  # on CPU: begin_iteration computes them, at every core
