"""The comparison script's arithmetic: the sweep, the best rate per arm, tables and verdict from finished run
directories (built here by hand)."""

import argparse
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("compare_online_offline",
                                               REPO / "scripts" / "compare_online_offline.py")
compare = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = compare  # dataclasses look their module up there
_spec.loader.exec_module(compare)


def fake_run(directory: Path, gold: list[float], kl: float) -> Path:
    """A run directory with pi_0's gold in the manifest and one metrics line per iteration."""
    directory.mkdir(parents=True)
    manifest = {"units": {"eval_initial": {"metrics": {"eval/gold_mean": gold[0]}}}}
    (directory / "manifest.json").write_text(json.dumps(manifest))
    lines = [{"iteration": i, "eval/gold_mean": g, "kl/ref": kl, "dpo/chosen_reward": -0.1,
              "eval/response_tokens_mean": 7.0, "eval/reward_mean": g, "eval/win_rate_vs_initial": 0.5}
             for i, g in enumerate(gold[1:], start=1)]
    (directory / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return directory


def test_gold_curve_starts_at_pi_0(tmp_path):
    assert compare.gold_curve(fake_run(tmp_path / "r", [0.5, 0.6, 0.7], kl=1.0)) == [0.5, 0.6, 0.7]


def test_mean_and_standard_error():
    mean, se = compare.mean_and_standard_error([1.0, 2.0, 3.0])
    assert mean == 2.0 and math.isclose(se, 1.0 / math.sqrt(3))


def test_standard_errors_treat_the_asset_seed_as_the_unit():
    # Two run seeds per asset seed are averaged first: asset means 1, 2, 3.
    values = {(0, 0): 0.5, (0, 1): 1.5, (1, 0): 2.0, (1, 1): 2.0, (2, 0): 3.0, (2, 1): 3.0}
    mean, se = compare.clustered(values)
    assert mean == 2.0 and math.isclose(se, 1.0 / math.sqrt(3))


def test_each_arm_takes_its_own_best_rate():
    finals = {"online": {1e-4: {(0, 0): 0.6, (1, 0): 0.62}, 4e-4: {(0, 0): 0.7, (1, 0): 0.72}},
              "offline": {1e-4: {(0, 0): 0.58, (1, 0): 0.6}, 4e-4: {(0, 0): 0.3, (1, 0): 0.5}}}
    assert compare.best_rate(finals["online"]) == 4e-4 and compare.best_rate(finals["offline"]) == 1e-4
    table = compare.sweep_table(finals)
    assert "| 0.0001 | 0.610 +- 0.010 | 0.590 +- 0.010 (best) |" in table
    assert "| 0.0004 | 0.710 +- 0.010 (best) | 0.400 +- 0.100 |" in table
    # both bests sit at an end of a two-rate sweep: the table says to widen it
    assert "warning: online's best rate 0.0004 is at the edge" in table
    assert "warning: offline's best rate 0.0001 is at the edge" in table
    finals["online"][8e-4] = {(0, 0): 0.5, (1, 0): 0.5}
    assert "online's best" not in compare.sweep_table(finals)


def test_verdict_pairs_the_arms_by_seed_and_counts_standard_errors():
    curves = {"online": {(0, 0): [0.5, 0.6, 0.7], (1, 0): [0.5, 0.62, 0.74]},
              "offline": {(0, 0): [0.5, 0.55], (1, 0): [0.5, 0.57]}}
    text = compare.verdict(curves)
    # paired gaps 0.15 and 0.17: mean 0.16, standard error 0.01
    assert "online - offline = 0.160 +- 0.010 (16.0 standard errors): online wins" in text
    assert text.endswith("online gold rises every iteration: yes")
    close = {"online": {(0, 0): [0.5, 0.7, 0.6], (1, 0): [0.5, 0.7, 0.62]},
             "offline": {(0, 0): [0.5, 0.62], (1, 0): [0.5, 0.58]}}
    assert "no clear winner" in compare.verdict(close)
    assert compare.verdict(close).endswith("online gold rises every iteration: no")


def test_tables_show_every_iteration_and_the_final_diagnostics(tmp_path):
    runs = {"online": {(s, 0): fake_run(tmp_path / f"on{s}", [0.5, 0.6, 0.7], kl=2.0 + s) for s in range(2)},
            "offline": {(s, 0): fake_run(tmp_path / f"off{s}", [0.5, 0.55], kl=8.0) for s in range(2)}}
    curves = {name: {seeds: compare.gold_curve(d) for seeds, d in dirs.items()} for name, dirs in runs.items()}
    gold = compare.curve_table(curves, {"online": 4e-4, "offline": 1e-4})
    assert "| iteration | online (lr 0.0004) | offline (lr 0.0001) |" in gold
    assert "| 0 (pi_0) | 0.500 +- 0.000 | 0.500 +- 0.000 |" in gold
    assert "| 2 | 0.700 +- 0.000 |  |" in gold
    diagnostics = compare.diagnostics_table({name: {seeds: compare.final_metrics(d) for seeds, d in dirs.items()}
                                             for name, dirs in runs.items()})
    assert "| kl/ref | 2.500 +- 0.500 | 8.000 +- 0.000 |" in diagnostics


def test_the_arms_run_with_their_seeds_and_rate():
    arm = compare.Arm("offline", 2e-4, asset_seed=1, run_seed=3)
    assert arm.overrides() == ["seed=3", "train.learning_rate=0.0002", "toy_task.seed=1",
                               "toy_task.dir=.cache/toy_task_seed1"]
    assert arm.run_dir(Path("runs")) == Path("runs/offline-lr0.0002-assets1-seed3")
    assert "toy_task.dir=.cache/toy_task" in compare.Arm("online", 4e-4, 0, 0).overrides()


def test_the_semi_online_arm_is_compared_with_offline_too():
    curves = {"offline": {(0, 0): [0.5, 0.55], (1, 0): [0.5, 0.57]},
              "semi_online": {(0, 0): [0.5, 0.60], (1, 0): [0.5, 0.58]},
              "online": {(0, 0): [0.5, 0.6, 0.7], (1, 0): [0.5, 0.62, 0.74]}}
    text = compare.verdict(curves)
    assert "final gold offline 0.560 +- 0.010, semi_online 0.590 +- 0.010, online 0.720 +- 0.020" in text
    assert "online - offline = 0.160 +- 0.010 (16.0 standard errors): online wins" in text
    # paired gaps 0.05 and 0.01: mean 0.03, standard error 0.02
    assert "semi_online - offline = 0.030 +- 0.020 (1.5 standard errors): no clear winner" in text
    assert "online gold rises" not in compare.verdict({k: v for k, v in curves.items() if k != "online"})
    one_seed = compare.verdict({name: {(0, 0): per_seed[(0, 0)]} for name, per_seed in curves.items()})
    assert "online - offline = 0.150 on one asset seed: no standard error, no verdict" in one_seed
    assert "wins" not in one_seed


def test_every_arm_gets_the_same_pair_budget_and_the_task_its_own_assets():
    smoke = compare.arm_overrides(argparse.Namespace(smoke=True, sync_every=None))
    prompts = {name: next(int(o.split("=")[1]) for o in extra if o.startswith("data.prompts_per_iteration="))
               for name, extra in smoke.items()}
    assert prompts["offline"] == prompts["semi_online"] == compare.ONLINE_ITERATIONS * prompts["online"]
    assert "train.sync_every_steps=2" in smoke["semi_online"]
    assert not any("sync_every" in o for o in smoke["offline"] + smoke["online"])
    full = compare.arm_overrides(argparse.Namespace(smoke=False, sync_every=4))
    assert full == {"offline": (), "semi_online": ("train.sync_every_steps=4",), "online": ()}
    assert compare.arm_overrides(argparse.Namespace(smoke=False, sync_every=None))["semi_online"] == ()

    long = compare.Arm("semi_online", 4e-4, asset_seed=2, run_seed=0, task="long_lists", extra=("a=b",))
    assert long.overrides()[2:] == ["toy_task.seed=2", "toy_task.dir=.cache/toy_task_long_lists_seed2",
                                    "toy_task.variant=long_lists", "a=b"]
    assert long.run_dir(Path("runs")) == Path("runs/long_lists-semi_online-lr0.0004-assets2-seed0")
    assert "toy_task.dir=.cache/toy_task_long_lists" in compare.Arm("online", 4e-4, 0, 0, "long_lists").overrides()


def test_the_real_model_runs_its_own_configs_and_its_run_seeds_are_the_units():
    arm = compare.Arm("semi_online", 1e-5, asset_seed=0, run_seed=2, extra=("a=b",), model="smollm2")
    assert arm.overrides() == ["seed=2", "train.learning_rate=1e-05", "a=b"]  # no toy task to build
    assert arm.run_dir(Path("runs")) == Path("runs/smollm2-semi_online-lr1e-05-seed2")
    assert compare.MODELS["smollm2"].config("semi_online").name == "smollm2_semi_online.yaml"
    assert all(compare.MODELS[model].config(name).exists() for model in compare.MODELS for name in compare.ARMS)
    # one model, one prompt set: each run seed is a unit of its own, where the toy task averages run seeds of an asset
    assert arm.key == (2, 0) and compare.Arm("online", 4e-4, 1, 2).key == (1, 2)
    finals = {compare.Arm("online", 1e-5, 0, seed, model="smollm2").key: value for seed, value in ((0, 0.2), (1, 0.4))}
    assert compare.clustered(finals) == pytest.approx((0.3, 0.1))
    text = compare.verdict({"offline": {(0, 0): [0.1, 0.2]}, "online": {(0, 0): [0.1, 0.3]}}, unit="run seed")
    assert "on one run seed: no standard error, no verdict" in text


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def test_the_mechanism_counts_chosen_answers_above_pi_0s_best_of_k(tmp_path):
    """pi_0's best of K per prompt comes from the offline run's rollouts; each pair's chosen answer is scored by the
    gold rule against it, by third of the prompts."""
    meta = {"category": "fruits", "count": 4}
    prompts = [{"index": i, "messages": [{"role": "user", "content": "Name four fruits."}], "token_ids": [1],
                "meta": meta} for i in range(6)]
    # pi_0's best of 2 on each prompt: two fruits of four (gold 0.5)
    pi_0 = [{"prompt": p, "responses": [{"text": "apple, pear"}, {"text": "stuff"}]} for p in prompts]
    offline = tmp_path / "offline"
    _write_jsonl(offline / "iter_001" / "rollouts" / "shard_00000.jsonl", pi_0[:4])
    _write_jsonl(offline / "iter_001" / "rollouts" / "shard_00001.jsonl", pi_0[4:])

    def pair(index: int, chosen: str) -> dict:
        return {"prompt_index": index, "prompt_messages": prompts[index]["messages"], "chosen": {"text": chosen}}

    _write_jsonl(offline / "iter_001" / "pairs.jsonl", [pair(i, "apple, pear") for i in range(6)])
    online = tmp_path / "online"
    _write_jsonl(online / "iter_001" / "pairs.jsonl", [pair(0, "apple, pear"), pair(1, "apple, pear")])
    _write_jsonl(online / "iter_002" / "pairs.jsonl", [pair(2, "apple, pear, plum"), pair(3, "apple, pear")])
    _write_jsonl(online / "iter_003" / "pairs.jsonl", [pair(4, "apple, pear, plum"), pair(5, "apple, pear, fig, kiwi")])

    best, prompt_metas = compare.pi_0_best_of_k(offline), compare.prompt_meta(offline)
    assert best == {i: 0.5 for i in range(6)}
    assert compare.chosen_above_pi_0(offline, best, prompt_metas) == [0.0, 0.0, 0.0]
    assert compare.chosen_above_pi_0(online, best, prompt_metas) == [0.0, 0.5, 1.0]
    table = compare.mechanism_table({"online": {(0, 0): [0.0, 0.5, 1.0], (1, 0): [0.0, 0.3, 0.8]},
                                     "offline": {(0, 0): [0.0] * 3, (1, 0): [0.0] * 3}})
    assert "| 2 | 0.400 +- 0.100 | 0.000 +- 0.000 |" in table


def test_the_curves_are_drawn(tmp_path):
    curves = {"online": {(0, 0): [0.2, 0.3, 0.4, 0.5], (1, 0): [0.2, 0.35, 0.45, 0.5]},
              "offline": {(0, 0): [0.2, 0.3], (1, 0): [0.2, 0.32]}}
    path = tmp_path / "curves.png"
    compare.plot_curves(curves, {"online": 8e-4, "offline": 4e-4}, "long_lists", path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_finished_runs_learner_checkpoints_go_and_what_the_comparison_reads_stays(tmp_path):
    run_dir = fake_run(tmp_path / "online", [0.1, 0.2, 0.3], kl=1.0)
    for iteration in (1, 2):
        (run_dir / f"iter_00{iteration}" / "learner" / "step_000004").mkdir(parents=True)
        (run_dir / f"iter_00{iteration}" / "learner" / "step_000004" / "model_states.pt").write_bytes(b"\0" * 64)
        (run_dir / f"iter_00{iteration}" / "pairs.jsonl").write_text("{}\n")
    compare.drop_learner_checkpoints(run_dir)
    assert not list(run_dir.glob("iter_*/learner"))
    assert (run_dir / "iter_001" / "pairs.jsonl").exists() and compare.gold_curve(run_dir) == [0.1, 0.2, 0.3]
