from pathlib import Path

import pytest

from rlhf_loop.config import RunConfig, load_config, to_yaml
from rlhf_loop.toy import smollm2
from rlhf_loop.common.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
SHIPPED = sorted((REPO / "configs").rglob("*.yaml"))


def write(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


MINIMAL = "policy:\n  model_path: some/model\nreward:\n  model_path: some/rm\ndata:\n  prompts: [prompts.jsonl]\n"


def test_defaults_come_from_the_dataclasses(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL))
    assert isinstance(cfg, RunConfig)
    assert cfg.rollout.samples_per_prompt == 8 and cfg.train.beta == 0.1 and cfg.pairs.strategy == "max_min"
    assert cfg.eval.prompt_column == cfg.data.prompt_column  # interpolated default, not a second copy
    assert cfg.eval.max_tokens == cfg.rollout.max_tokens


def test_the_menu_options_are_config_changes(tmp_path):
    overrides = ["train.loss_type=simpo", "train.beta=2.0", "train.simpo_gamma=1.0", "train.free_reference=true",
                 "train.margin_weighting=linear", "train.lora.enabled=true", "train.lora.target_modules=[q_proj]",
                 "pairs.per_prompt=4", "pairs.multi=top_vs_bottom", "reward.length_penalty=0.01",
                 "reward.objective_weights={helpful: 1.0, safe: 0.5}"]
    cfg = load_config(write(tmp_path, MINIMAL), overrides)
    assert cfg.train.lora.target_modules == ["q_proj"] and cfg.pairs.per_prompt == 4
    assert cfg.reward.objective_weights == {"helpful": 1.0, "safe": 0.5} and cfg.train.loss_type == "simpo"


def test_overrides_merge_over_the_file(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL), ["rollout.samples_per_prompt=4", "train.beta=0.01"])
    assert cfg.rollout.samples_per_prompt == 4 and cfg.train.beta == 0.01


@pytest.mark.parametrize("text, message", [
    (MINIMAL + "rollout:\n  samples_per_prompts: 4\n", "unknown key 'rollout.samples_per_prompts'"),
    (MINIMAL + "train:\n  beta: lots\n", "'train.beta'"),
    ("data:\n  prompts: [p.jsonl]\n", "'policy.model_path' is required"),
    (MINIMAL + "rollout:\n  samples_per_prompt: 1\n", "rollout.samples_per_prompt must be >= 2"),
    (MINIMAL + "eval:\n  samples_per_prompt: 0\n", "eval.samples_per_prompt must be >= 1"),
    (MINIMAL + "pairs:\n  strategy: best_of\n", "pairs.strategy 'best_of' is unknown"),
    (MINIMAL + "train:\n  loss_type: kto\n", "train.loss_type 'kto' is unknown"),
    ("policy:\n  model_path: m\ndata:\n  prompts: []\n", "data.prompts is empty"),
    (MINIMAL + "rollout: [\n", "cannot parse YAML"),
    (MINIMAL + "pairs:\n  per_prompt: 0\n", "pairs.per_prompt must be >= 1"),
    (MINIMAL + "pairs:\n  per_prompt: 8\n", "pairs.per_prompt 8 is more than best_vs_worst can pick"),
    (MINIMAL + "pairs:\n  per_prompt: 5\n  multi: top_vs_bottom\n", "use at most 4"),
    (MINIMAL + "pairs:\n  multi: all\n", "pairs.multi 'all' is unknown"),
    (MINIMAL + "pairs:\n  per_prompt: 2\n  strategy: random\n", "leave pairs.strategy at max_min"),
    (MINIMAL + "train:\n  loss_type: hinge\n  label_smoothing: 0.1\n", "no meaning for loss_type hinge"),
    (MINIMAL + "train:\n  simpo_gamma: -1\n", "train.simpo_gamma must be >= 0"),
    (MINIMAL + "train:\n  rpo_alpha: -1\n", "train.rpo_alpha must be >= 0"),
    (MINIMAL + "train:\n  margin_weighting: square\n", "train.margin_weighting must be none or linear"),
    (MINIMAL + "train:\n  lora:\n    r: 0\n", "train.lora.r must be >= 1"),
    (MINIMAL + "train:\n  lora:\n    target_modules: []\n", "train.lora.target_modules is empty"),
    (MINIMAL.replace("model_path: some/rm\n", "model_path: some/rm\n  length_penalty: -0.1\n"),
     "reward.length_penalty must be >= 0"),
    (MINIMAL + "cluster:\n  connect_timeout_s: 0\n", "cluster.connect_timeout_s must be > 0"),
    (MINIMAL + "environment:\n  factory: my_env.py\n", "environment.factory must be 'file.py:Name'"),
    (MINIMAL + "environment:\n  factory: e.py:E\n  max_turns: 0\n", "environment.max_turns must be >= 1"),
    (MINIMAL + "environment:\n  factory: e.py:E\n  max_episode_tokens: 100\n",
     "environment.max_episode_tokens (100) leaves no room for one turn"),
])
def test_bad_configs_fail_with_one_line_naming_key_and_file(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert message in str(error.value) and str(path) in str(error.value)
    assert "\n" not in str(error.value)


def test_bad_override_names_the_override(tmp_path):
    with pytest.raises(ConfigError, match=r"override 'rollout.nope=3': unknown key 'rollout.nope'"):
        load_config(write(tmp_path, MINIMAL), ["rollout.nope=3"])
    with pytest.raises(ConfigError, match="is not key=value"):
        load_config(write(tmp_path, MINIMAL), ["iterations"])


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL), ["iterations=5"])
    frozen = tmp_path / "frozen.yaml"
    frozen.write_text(to_yaml(cfg))
    assert load_config(frozen) == cfg


def test_configs_are_shipped():
    assert any(p.name == "tiny.yaml" for p in SHIPPED)


@pytest.mark.parametrize("path", SHIPPED, ids=[str(p.relative_to(REPO)) for p in SHIPPED])
def test_every_shipped_config_is_valid(path):
    cfg = load_config(path)
    assert cfg.iterations >= 1


@pytest.mark.parametrize("prefix", ["tiny", "smollm2"])
def test_the_online_and_offline_comparison_spends_the_same_budget(prefix):
    """Same pairs, same DPO steps, same everything else: only where the pairs are sampled from differs. The
    semi-online arm syncs more often than once an online iteration."""
    online, offline, semi_online = (load_config(REPO / "configs" / f"{prefix}_{arm}.yaml")
                                    for arm in ("online", "offline", "semi_online"))
    assert online.iterations == 3 and offline.iterations == semi_online.iterations == 1
    total = online.iterations * online.data.prompts_per_iteration
    assert offline.data.prompts_per_iteration == semi_online.data.prompts_per_iteration == total
    # every pair comes from a prompt never seen before
    assert total <= (online.toy_task.num_train_prompts if online.toy_task.enabled else smollm2.NUM_TRAIN_PROMPTS)
    assert online.train == offline.train and online.rollout == offline.rollout and online.reward == offline.reward
    assert online.eval == offline.eval == semi_online.eval
    assert semi_online.train.sync_every_steps is not None and offline.train.sync_every_steps is None
    assert online.data.prompts_per_iteration % semi_online.sync_block_prompts == 0
    assert semi_online.sync_block_prompts < online.data.prompts_per_iteration


def test_a_file_can_build_on_a_base_file(tmp_path):
    (tmp_path / "base.yaml").write_text(MINIMAL + "iterations: 5\nrollout:\n  temperature: 0.7\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\niterations: 1\n")
    cfg = load_config(tmp_path / "child.yaml")
    assert cfg.iterations == 1 and cfg.rollout.temperature == 0.7 and cfg.policy.model_path == "some/model"


def test_base_cycles_and_missing_bases_are_errors(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("base: nope.yaml\n")
    with pytest.raises(ConfigError, match="base file .*nope.yaml does not exist"):
        load_config(tmp_path / "c.yaml")


def test_an_environment_sizes_the_engines_context_for_a_whole_episode(tmp_path):
    single = load_config(write(tmp_path, MINIMAL))
    assert single.max_model_len == single.data.max_prompt_tokens + single.rollout.max_tokens
    episodes = load_config(write(tmp_path, MINIMAL + "environment:\n  factory: e.py:E\n  max_episode_tokens: 900\n"))
    assert episodes.environment.enabled and episodes.max_model_len == episodes.data.max_prompt_tokens + 900
