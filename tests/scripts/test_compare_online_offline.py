"""The comparison script's arithmetic: tables and verdict from finished run directories (built here by hand)."""

import importlib.util
import json
import math
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("compare_online_offline",
                                               REPO / "scripts" / "compare_online_offline.py")
compare = importlib.util.module_from_spec(_spec)
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


def test_verdict_counts_standard_errors_and_checks_the_rise():
    curves = {"online": [[0.5, 0.6, 0.7], [0.5, 0.62, 0.72]], "offline": [[0.5, 0.55], [0.5, 0.57]]}
    text = compare.verdict(curves)
    # online 0.71 +- 0.01, offline 0.56 +- 0.01: gap 0.15 +- sqrt(2) * 0.01
    assert "online - offline = 0.150 +- 0.014 (10.6 standard errors)" in text
    assert text.endswith("online gold rises every iteration: yes")
    falling = {"online": [[0.5, 0.7, 0.6], [0.5, 0.7, 0.6]], "offline": [[0.5, 0.55], [0.5, 0.57]]}
    assert compare.verdict(falling).endswith("online gold rises every iteration: no")


def test_tables_show_every_iteration_and_the_final_diagnostics(tmp_path):
    runs = {"online": [fake_run(tmp_path / f"on{s}", [0.5, 0.6, 0.7], kl=2.0 + s) for s in range(2)],
            "offline": [fake_run(tmp_path / f"off{s}", [0.5, 0.55], kl=8.0) for s in range(2)]}
    gold = compare.table({name: [compare.gold_curve(d) for d in dirs] for name, dirs in runs.items()})
    assert "| 0 (pi_0) | 0.500 +- 0.000 | 0.500 +- 0.000 |" in gold
    assert "| 2 | 0.700 +- 0.000 |  |" in gold
    diagnostics = compare.diagnostics_table({name: [compare.final_metrics(d) for d in dirs]
                                             for name, dirs in runs.items()})
    assert "| kl/ref | 2.500 +- 0.500 | 8.000 +- 0.000 |" in diagnostics
