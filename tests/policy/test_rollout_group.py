"""RolloutGroup: prompts split across two engine actors come back in order, and weights reach every engine."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch

from policy.config import RolloutConfig
from policy.rollout_protocol import Sampling
from policy.rollout_group import RolloutGroup, contiguous_chunks
from policy.weight_buckets import plan_buckets
from policy.weight_sync import SyncGroup, host_store
from rlhf_loop.common.actor_calls import ActorDied, wait_restarted
from rlhf_loop.common.faults import KILL_ACTOR_ENV

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MAX_TOKENS = 24
SAMPLING = Sampling(n=3, temperature=1.0, top_p=1.0, max_tokens=MAX_TOKENS, seed=3)


@pytest.mark.parametrize(("count", "num_chunks"), [(16, 2), (7, 3), (2, 4), (0, 2)])
def test_contiguous_chunks_cover_the_items_in_order(count, num_chunks):
    items = list(range(count))
    chunks = contiguous_chunks(items, num_chunks)
    assert len(chunks) == num_chunks
    assert [item for chunk in chunks for item in chunk] == items
    assert max(map(len, chunks)) - min(map(len, chunks)) <= 1


def recorded_group(sleeps: bool) -> tuple[RolloutGroup, list[str]]:
    """A group whose calls to its engines are recorded instead of made (no Ray, no engine)."""
    group, calls = RolloutGroup.__new__(RolloutGroup), []
    group.actors, group.sleeps = ["engine 0", "engine 1"], sleeps
    group._call_each = lambda method, arguments: calls.append(f"{method} x{len(arguments)}")
    return group, calls


def test_colocated_engines_sleep_for_the_block_and_wake_even_when_it_fails():
    group, calls = recorded_group(sleeps=True)
    with group.asleep():
        calls.append("train")
    assert calls == ["sleep x2", "train", "wake_up x2"]
    with pytest.raises(RuntimeError), group.asleep():
        raise RuntimeError("a learner rank died")
    assert calls[-2:] == ["sleep x2", "wake_up x2"]


def test_colocated_engines_wake_their_weights_for_the_sync_and_their_kv_cache_before_generating():
    from types import SimpleNamespace

    group, calls = recorded_group(sleeps=True)
    group._schedule = None
    learner = SimpleNamespace(reload_states=lambda: calls.append("reload_states"),
                              offload_states=lambda: calls.append("offload_states"))
    with group.asleep(learner):
        calls.append("train")
    calls.append("sync")
    group._call_each = lambda method, arguments: calls.append(f"{method} {arguments[0]}") or []
    group.generate(["a prompt"], SAMPLING)
    group.generate(["a prompt"], SAMPLING)
    assert calls == ["sleep x2", "reload_states", "train", "offload_states", "wake_up x2", "sync",
                     "wake_up (['kv_cache'],)", f"generate (['a prompt'], {SAMPLING!r})",
                     f"generate (['a prompt'], {SAMPLING!r})"]


def test_engines_of_their_own_never_sleep():
    group, calls = recorded_group(sleeps=False)
    with group.asleep():
        calls.append("train")
    assert calls == ["train"]


@pytest.fixture(scope="module", params=["vllm", "hf"])
def group(request, ray_local, policy_config):
    rollout = RolloutConfig(engine=request.param, num_engines=2)
    group = RolloutGroup(policy_config, rollout, "cpu", max_model_len=256, seed=0)
    yield group
    group.shutdown()


@pytest.mark.integration  # Ray and vLLM
def test_generate_returns_prompts_in_order_whichever_engine_ran_them(group, prompts, check_rollouts):
    rollouts = group.generate(prompts, SAMPLING)
    check_rollouts(rollouts, prompts, SAMPLING.n, MAX_TOKENS)
    # Reversed, every prompt lands on the other engine; per-prompt seeds give it the same responses there.
    reversed_rollouts = group.generate(prompts[::-1], SAMPLING)
    assert reversed_rollouts[::-1] == rollouts
    assert group.generate(prompts[:1], SAMPLING) == rollouts[:1]


@pytest.mark.integration  # Ray and vLLM
def test_update_weights_reaches_every_engine(ray_local, group, prompts, tiny_model, new_model, hf_greedy, named_parameters):
    old_reference = hf_greedy(tiny_model, prompts[:4], MAX_TOKENS)
    new_reference = hf_greedy(new_model, prompts[:4], MAX_TOKENS)
    assert new_reference != old_reference
    assert group.greedy(prompts[:4], MAX_TOKENS) == [old_reference, old_reference]

    group.update_weights(ray_local.put(named_parameters(new_model)))
    assert group.greedy(prompts[:4], MAX_TOKENS) == [new_reference, new_reference]


@pytest.mark.integration  # Ray
def test_a_killed_engine_is_restarted_with_the_synced_weights_until_restarts_run_out(
        ray_local, policy_config, prompts, new_model, named_parameters, hf_greedy):
    group = RolloutGroup(policy_config, RolloutConfig(engine="hf", num_engines=1), "cpu", max_model_len=256, seed=0,
                         max_restarts=1)
    try:
        group.update_weights(ray_local.put(named_parameters(new_model)))
        expected = group.generate(prompts[:4], SAMPLING)
        (first,) = group.placement()
        os.kill(first["pid"], signal.SIGKILL)
        # Restarted from the initial policy, given the synced weights again: the same samples, and the new model's
        # greedy tokens.
        assert group.generate(prompts[:4], SAMPLING) == expected
        assert group.greedy(prompts[:4], MAX_TOKENS) == [hf_greedy(new_model, prompts[:4], MAX_TOKENS)]
        (second,) = group.placement()
        assert group.restarts == 1 and second["pid"] != first["pid"]
        os.kill(second["pid"], signal.SIGKILL)
        with pytest.raises(ActorDied, match="rollout engine 0 died during generate") as error:
            group.generate(prompts[:4], SAMPLING)
        assert "\n" not in str(error.value) and "rlhf-loop resume" in str(error.value)
    finally:
        group.shutdown()


def sending_rank():
    """Learner rank 0's side of the collective sync without DeepSpeed, as an actor class (defined here, so that Ray
    sends the class itself to the workers: they cannot import tests/)."""

    class SendingRank:
        def __init__(self, named):
            self.named = dict(named)
            self.store = host_store()
            self.group = None  # its place in the sync group, kept from sync to sync as LearnerActor keeps it

        def address(self):
            return "127.0.0.1", self.store.port

        def send(self, spec, bucket_bytes):
            plan = plan_buckets([(name, t.shape, t.dtype) for name, t in self.named.items()], bucket_bytes)
            if self.group is None or self.group.spec.session != spec.session:
                if self.group is not None:
                    self.group.shutdown()
                self.group = SyncGroup(spec, 0, torch.device("cpu"), self.store)
            self.group.send(spec.sync, plan, ([self.named[s.name] for s in b.slots] for b in plan))

    return SendingRank


class ActorLearner:
    """The `Learner` calls a collective sync makes, over one `sending_rank` actor; counts the broadcasts."""

    def __init__(self, ray, named):
        self.ray = ray
        self.rank = ray.remote(sending_rank()).options(num_cpus=0).remote(named)
        self.address = ray.get(self.rank.address.remote())
        self.broadcasts = 0

    def shutdown(self):
        self.ray.kill(self.rank)

    def weight_sync_address(self):
        return self.address

    def start_weight_broadcast(self, spec, bucket_bytes):
        self.broadcasts += 1
        return [self.rank.send.remote(spec, bucket_bytes)]


@pytest.mark.integration  # Ray
def test_a_killed_engine_rejoins_the_collective_sync_and_gets_the_weights_again(
        ray_local, policy_config, prompts, new_model, named_parameters, hf_greedy):
    learner = ActorLearner(ray_local, named_parameters(new_model))
    config = RolloutConfig(engine="hf", num_engines=1, weight_sync="collective", weight_sync_bucket_mb=1)
    group = RolloutGroup(policy_config, config, "cpu", max_model_len=256, seed=0, max_restarts=1)
    try:
        group.sync_from(learner)
        new_greedy = [hf_greedy(new_model, prompts[:4], MAX_TOKENS)]
        assert group.greedy(prompts[:4], MAX_TOKENS) == new_greedy
        expected = group.generate(prompts[:4], SAMPLING)
        (first,) = group.placement()
        os.kill(first["pid"], signal.SIGKILL)
        assert group.generate(prompts[:4], SAMPLING) == expected  # restarted, then a sync of its own
        assert learner.broadcasts == 2
        assert group.greedy(prompts[:4], MAX_TOKENS) == new_greedy
    finally:
        group.shutdown()
        learner.shutdown()


@pytest.mark.integration  # Ray and vLLM
@pytest.mark.parametrize("engine", ["vllm", "hf"])
def test_an_engine_that_dies_in_a_sync_is_restarted_and_the_sync_done_again_at_once(
        ray_local, policy_config, prompts, new_model, named_parameters, hf_greedy, monkeypatch, tmp_path, engine):
    """The other engine, already in the group and receiving, and the learner stop waiting for it within seconds
    (not rollout.weight_sync_timeout_s); every engine ends with the learner's weights."""
    monkeypatch.setenv(KILL_ACTOR_ENV, f"sync:{tmp_path}")  # an engine that starts receiving dies, if no marker
    (tmp_path / "sync").touch()  # ... and there is one: the first sync forms the group undisturbed
    learner = ActorLearner(ray_local, named_parameters(new_model))
    config = RolloutConfig(engine=engine, num_engines=2, weight_sync="collective", weight_sync_bucket_mb=1,
                           weight_sync_timeout_s=300)
    group = RolloutGroup(policy_config, config, "cpu", max_model_len=256, seed=0, max_restarts=1)
    try:
        group.sync_from(learner)
        (tmp_path / "sync").unlink()  # the first engine to start receiving the next sync dies
        start = time.monotonic()
        group.sync_from(learner)
        assert time.monotonic() - start < 150
        assert (tmp_path / "sync").exists() and group.restarts == 1 and learner.broadcasts == 3
        new_greedy = hf_greedy(new_model, prompts[:4], MAX_TOKENS)  # the restarted engine began from pi_0
        assert group.greedy(prompts[:4], MAX_TOKENS) == [new_greedy, new_greedy]
    finally:
        group.shutdown()
        learner.shutdown()


@pytest.mark.integration  # Ray
def test_an_engine_that_dies_in_a_sync_with_no_restarts_left_stops_it_at_once_naming_the_engine(
        ray_local, policy_config, new_model, named_parameters, monkeypatch, tmp_path):
    monkeypatch.setenv(KILL_ACTOR_ENV, f"sync:{tmp_path}")
    learner = ActorLearner(ray_local, named_parameters(new_model))
    config = RolloutConfig(engine="hf", num_engines=2, weight_sync="collective", weight_sync_bucket_mb=1,
                           weight_sync_timeout_s=300)
    group = RolloutGroup(policy_config, config, "cpu", max_model_len=256, seed=0, max_restarts=0)
    try:
        start = time.monotonic()
        with pytest.raises(ActorDied, match=r"the rollout engine [01] died during sync") as error:
            group.sync_from(learner)
        assert time.monotonic() - start < 120
        assert "\n" not in str(error.value) and "rlhf-loop resume" in str(error.value)
        # the learner's side was stopped too: it answers at once
        assert ray_local.get(learner.rank.address.remote(), timeout=30) == learner.address
    finally:
        group.shutdown()
        learner.shutdown()


@pytest.mark.integration  # Ray and vLLM
@pytest.mark.parametrize("engine", ["vllm", "hf"])
def test_a_warm_engine_taken_by_a_later_run_starts_it_as_a_new_engine_would(
        ray_local, policy_config, prompts, new_model, named_parameters, hf_greedy, engine):
    """cluster.keep_warm: the engine a run leaves holds that run's last weights and its sync group with a learner that
    is gone; the next group of that name takes the same process, which samples what a new engine samples and forms
    a sync group with the next run's learner."""
    config = RolloutConfig(engine=engine, num_engines=1, weight_sync="collective", weight_sync_bucket_mb=1)
    names = [f"warm-test-{engine}"]
    earlier = RolloutGroup(policy_config, config, "cpu", max_model_len=256, seed=0, names=names)
    learners = [ActorLearner(ray_local, named_parameters(new_model)) for _ in range(2)]
    try:
        assert earlier.reused == [False]
        new_engine_samples = earlier.generate(prompts[:4], SAMPLING)
        earlier.sync_from(learners[0])  # the earlier run trained and synced
        assert earlier.generate(prompts[:4], SAMPLING) != new_engine_samples
        later = RolloutGroup(policy_config, config, "cpu", max_model_len=256, seed=0, names=names)
        assert later.reused == [True] and later.placement() == earlier.placement()
        assert later.generate(prompts[:4], SAMPLING) == new_engine_samples
        later.sync_from(learners[1])  # the later run's learner: a group of its own
        assert later.greedy(prompts[:4], MAX_TOKENS) == [hf_greedy(new_model, prompts[:4], MAX_TOKENS)]
    finally:
        earlier.shutdown()  # the detached actor goes only when killed
        for learner in learners:
            learner.shutdown()


@pytest.mark.integration  # Ray
def test_a_warm_engine_that_ray_restarted_is_replaced_by_a_new_one(ray_local, policy_config):
    """Its budget of restarts is spent in part: the later run gets a new engine with all of it."""
    config = RolloutConfig(engine="hf", num_engines=1)
    names = ["warm-test-restarted"]
    earlier = RolloutGroup(policy_config, config, "cpu", max_model_len=256, seed=0, max_restarts=1, names=names)
    try:
        (killed,) = earlier.placement()
        os.kill(killed["pid"], signal.SIGKILL)
        wait_restarted(earlier.actors[0].ready.remote, 300, "rollout engine 0", "rollout.call_timeout_s")
        (restarted,) = earlier.placement()
        later = RolloutGroup(policy_config, config, "cpu", max_model_len=256, seed=0, max_restarts=1, names=names)
        (new,) = later.placement()
        assert later.reused == [False] and new["pid"] not in (killed["pid"], restarted["pid"])
        later.shutdown()
    finally:
        earlier.shutdown()


def test_an_engine_restarted_while_the_learner_moves_on_gets_the_export_it_sampled_from(monkeypatch, tmp_path):
    """max_staleness 1: the engines sample from version i-1 while the learner trains i, so a restarted engine must not
    take the learner's weights; it reloads the export of the version the others hold."""
    from types import SimpleNamespace

    from safetensors.torch import save_file

    from policy import rollout_group

    save_file({"w": torch.ones(2)}, tmp_path / "model.safetensors")
    loaded = []
    actor = SimpleNamespace(ready=SimpleNamespace(remote=lambda: None),
                            update_weights=SimpleNamespace(remote=lambda ref: loaded.append(ref)))
    group = object.__new__(rollout_group.RolloutGroup)
    group.actors, group.restarts, group.max_restarts, group.timeout_s = [actor], 0, 1, 1.0
    group._learner, group._weights_ref, group._weights_dir = object(), None, None  # synced from the learner
    monkeypatch.setattr(rollout_group, "wait_restarted", lambda *args: None)
    monkeypatch.setattr(rollout_group, "wait", lambda refs, *args: refs)
    monkeypatch.setattr(rollout_group.ray, "put", lambda value: ("ref", value))
    monkeypatch.setattr(group, "_broadcast", lambda *args: pytest.fail("took the learner's newer weights"))
    group.let_learner_move_on(tmp_path)
    group._recover(0, "generate")
    ((tag, weights),) = loaded
    assert tag == "ref" and [name for name, _ in weights] == ["w"] and torch.equal(weights[0][1], torch.ones(2))
    group.let_learner_move_on(None)  # nothing to detach from any more: the object-store copy stays the source
    group._recover(0, "generate")
    assert len(loaded) == 2 and loaded[1] is loaded[0]
