"""Export of a finished iteration, the loop's per-iteration DPO dataset, and offline DPO pairs in."""

import json
import math

import datasets
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhf_loop.driver import export
from rlhf_loop.common.errors import UserError
from rlhf_loop.driver.data import load_preference_pairs
from rlhf_loop.driver.export import export_iteration, write_preference_dataset
from rlhf_loop.common.records import Pair, Response, to_json
from rlhf_loop.rundir.manifest import Manifest, RunDir
from rlhf_loop.common.files import atomic_write_jsonl, atomic_write_text
from rlhf_loop.toy.tiny import build_tiny_policy

COLUMNS = {"prompt", "chosen", "rejected", "score_chosen", "score_rejected"}


def render(tokenizer, messages, generation_prompt=False):
    return tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=True,
                                         return_dict=False)


def make_pair(tokenizer, index, messages, chosen, rejected, scores=(1.0, -1.0)):
    prompt_ids = render(tokenizer, messages, generation_prompt=True)

    def response(text):
        full = render(tokenizer, [*messages, {"role": "assistant", "content": text}])
        return Response(text, full[len(prompt_ids):], "stop")

    return Pair(index, messages, prompt_ids, response(chosen), response(rejected), *scores)


@pytest.fixture
def pairs(tiny_tokenizer, tiny_messages):
    answers = ["apple, banana, cherry", "one two three four five", "The waves roll in.", "Blue and green."]
    return [make_pair(tiny_tokenizer, i, messages, answers[i], f"no {i}", (float(i), -float(i)))
            for i, messages in enumerate(tiny_messages)]


@pytest.fixture
def run_dir(tmp_path, tiny_tokenizer, pairs):
    """A run directory as the loop leaves it after iteration 1: policy exported, pairs written, both recorded."""
    run = RunDir.create(tmp_path / "run", overwrite=False)
    atomic_write_text(run.config_path, "iterations: 1\n")
    manifest = Manifest.load(run)
    build_tiny_policy(tiny_tokenizer, run.iteration(1) / "policy", seed=3)
    pairs_path = run.iteration(1) / "pairs.jsonl"
    atomic_write_jsonl(pairs_path, map(to_json, pairs))
    manifest.record("iter_001/pairs", files=[pairs_path], count=len(pairs), dropped={})
    manifest.record("iter_001/export", path="iter_001/policy")
    return run.root


def greedy_text(model_dir, tokenizer, messages):
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    prompt = torch.tensor([render(tokenizer, messages, generation_prompt=True)])
    output = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False)
    return tokenizer.decode(output[0, prompt.shape[1]:])


# ---- export_iteration ---------------------------------------------------------------------------------------------

def test_export_round_trip(run_dir, tmp_path, pairs, tiny_messages):
    out = tmp_path / "out"
    export_iteration(str(run_dir), 1, str(out))

    original, exported = run_dir / "iter_001" / "policy", out / "policy"
    tokenizer = AutoTokenizer.from_pretrained(exported)
    assert tokenizer.chat_template == AutoTokenizer.from_pretrained(original).chat_template
    for messages in tiny_messages[:2]:
        assert greedy_text(exported, tokenizer, messages) == greedy_text(original, tokenizer, messages)
    original_weights = AutoModelForCausalLM.from_pretrained(original).state_dict()
    exported_weights = AutoModelForCausalLM.from_pretrained(exported).state_dict()
    assert all(torch.equal(original_weights[name], tensor) for name, tensor in exported_weights.items())

    rows = datasets.load_from_disk(str(out / "pairs"))
    assert set(rows.column_names) == COLUMNS and len(rows) == len(pairs)
    for row, pair in zip(rows, pairs, strict=True):
        assert row["prompt"] == pair.prompt_messages
        assert row["chosen"] == [{"role": "assistant", "content": pair.chosen.text}]
        assert row["rejected"] == [{"role": "assistant", "content": pair.rejected.text}]
        assert (row["score_chosen"], row["score_rejected"]) == (pair.chosen_score, pair.rejected_score)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_exported_rows_tokenize_as_trl_does_to_the_trained_tokens(run_dir, tmp_path, tiny_tokenizer, pairs):
    """TRL's DPOTrainer renders prompt + chosen for a conversational row with a prompt column: that must give
    exactly the prompt and response tokens the pair was trained on."""
    export_iteration(str(run_dir), 1, str(tmp_path / "out"))
    rows = datasets.load_from_disk(str(tmp_path / "out" / "pairs"))
    for row, pair in zip(rows, pairs, strict=True):
        assert render(tiny_tokenizer, row["prompt"], generation_prompt=True) == pair.prompt_token_ids
        assert render(tiny_tokenizer, row["prompt"] + row["chosen"]) == pair.prompt_token_ids + pair.chosen.token_ids
        assert render(tiny_tokenizer, row["prompt"] + row["rejected"]) == (
            pair.prompt_token_ids + pair.rejected.token_ids)


def test_exported_pairs_load_back_as_the_same_pairs(run_dir, tmp_path, tiny_tokenizer, pairs):
    export_iteration(str(run_dir), 1, str(tmp_path / "out"))
    loaded = load_preference_pairs(str(tmp_path / "out" / "pairs"), "train", tiny_tokenizer, max_prompt_tokens=512)
    assert loaded.pairs == pairs and loaded.skipped_too_long == 0


def test_export_into_an_empty_directory(run_dir, tmp_path):
    (tmp_path / "empty").mkdir()
    export_iteration(str(run_dir), 1, str(tmp_path / "empty"))
    assert {p.name for p in (tmp_path / "empty").iterdir()} == {"policy", "pairs"}


@pytest.mark.parametrize("case, message", [
    ("not_a_run", "is not a run directory"),
    ("unfinished", "iteration 2 of"),
    ("not_empty", "already exists and is not empty"),
    ("pairs_changed", "differs from what manifest.json recorded"),
])
def test_export_errors_are_one_line(run_dir, tmp_path, case, message):
    source, iteration, out = run_dir, 1, tmp_path / "out"
    if case == "not_a_run":
        source = tmp_path / "elsewhere"
        source.mkdir()
    elif case == "unfinished":
        iteration = 2
    elif case == "not_empty":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    else:
        with open(run_dir / "iter_001" / "pairs.jsonl", "a") as f:
            f.write("\n")
    with pytest.raises(UserError) as error:
        export_iteration(str(source), iteration, str(out))
    assert message in str(error.value) and "\n" not in str(error.value)
    if case == "not_empty":
        assert [p.name for p in out.iterdir()] == ["keep.txt"]
    else:
        assert not out.exists()


def test_an_unfinished_iteration_names_the_finished_ones_by_number_past_999(run_dir, tmp_path):
    manifest = Manifest.load(RunDir.existing(run_dir))
    for iteration in (1001, 999, 1000):
        manifest.record(f"iter_{iteration:03d}/export", path="elsewhere")
    with pytest.raises(UserError, match=r"\(finished: 1, 999, 1000, 1001\)"):
        export_iteration(str(run_dir), 1002, str(tmp_path / "out"))


def test_a_failed_export_leaves_nothing_behind(run_dir, tmp_path, monkeypatch):
    def broken(pairs):
        raise OSError("disk full")

    monkeypatch.setattr(export, "preference_dataset", broken)
    with pytest.raises(OSError, match="disk full"):
        export_iteration(str(run_dir), 1, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


# ---- write_preference_dataset -------------------------------------------------------------------------------------

@pytest.fixture
def many_pairs(tiny_tokenizer):
    return [make_pair(tiny_tokenizer, i, [{"role": "user", "content": f"Count to {i}."}], "one two", f"no {i}",
                      (1.0, float(-i))) for i in range(50)]


def test_disk_dataset_has_seeded_disjoint_splits(tmp_path, many_pairs):
    out = write_preference_dataset(many_pairs, tmp_path / "d", "disk", test_fraction=0.1, seed=7, push_to_hub=None)
    splits = datasets.load_from_disk(str(out))
    assert set(splits) == {"train", "test"} and len(splits["test"]) == 5 and len(splits["train"]) == 45
    assert set(splits["test"].column_names) == COLUMNS
    prompts = lambda split: {row["prompt"][0]["content"] for row in splits[split]}  # noqa: E731
    assert not prompts("train") & prompts("test")
    assert prompts("train") | prompts("test") == {pair.prompt_messages[0]["content"] for pair in many_pairs}

    again = datasets.load_from_disk(str(write_preference_dataset(many_pairs, tmp_path / "e", "disk", 0.1, 7, None)))
    other = datasets.load_from_disk(str(write_preference_dataset(many_pairs, tmp_path / "f", "disk", 0.1, 8, None)))
    assert again["test"]["prompt"] == splits["test"]["prompt"]
    assert other["test"]["prompt"] != splits["test"]["prompt"]


def test_parquet_dataset_has_one_file_per_split(tmp_path, many_pairs):
    out = write_preference_dataset(many_pairs, tmp_path / "p", "parquet", test_fraction=0.02, seed=0, push_to_hub=None)
    assert sorted(p.name for p in out.iterdir()) == ["test.parquet", "train.parquet"]
    test = datasets.load_dataset("parquet", data_files=str(out / "test.parquet"), split="train")
    train = datasets.load_dataset("parquet", data_files=str(out / "train.parquet"), split="train")
    assert (len(train), len(test)) == (49, 1) and set(train.column_names) == COLUMNS
    assert test[0]["chosen"] == [{"role": "assistant", "content": "one two"}]


def test_rewriting_replaces_the_previous_dataset_and_skips_an_empty_split(tmp_path, many_pairs):
    out = tmp_path / "p"
    write_preference_dataset(many_pairs, out, "parquet", 0.1, 0, None)
    write_preference_dataset(many_pairs[:10], out, "parquet", 0.0, 0, None)
    assert [p.name for p in out.iterdir()] == ["train.parquet"]
    assert len(datasets.load_dataset(str(out))["train"]) == 10


def test_no_pairs_still_gives_the_columns(tmp_path):
    splits = datasets.load_from_disk(str(write_preference_dataset([], tmp_path / "d", "disk", 0.02, 0, None)))
    assert len(splits["train"]) == 0 and set(splits["train"].column_names) == COLUMNS


def test_unknown_format_is_refused(tmp_path, many_pairs):
    with pytest.raises(ValueError, match="export_format 'csv'"):
        write_preference_dataset(many_pairs, tmp_path / "x", "csv", 0.02, 0, None)


# ---- load_preference_pairs ----------------------------------------------------------------------------------------

def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


SYSTEM_AND_USER = [{"role": "system", "content": "You are brief."}, {"role": "user", "content": "Count to five."}]


def assert_rendered(tokenizer, pair, prompt, chosen, rejected):
    """Token ids are the chat template's: the prompt with the generation prompt, each response the tokens the
    template appends for the assistant turn, ending with the end-of-turn token."""
    assert pair.prompt_messages == prompt
    assert pair.prompt_token_ids == render(tokenizer, prompt, generation_prompt=True)
    for response, text in ((pair.chosen, chosen), (pair.rejected, rejected)):
        full = render(tokenizer, [*prompt, {"role": "assistant", "content": text}])
        assert response.text == text
        assert pair.prompt_token_ids + response.token_ids == full
        assert response.token_ids[-1] == tokenizer.convert_tokens_to_ids("<|eot_id|>")


def test_whole_conversations_in_chosen_and_rejected(tmp_path, tiny_tokenizer):
    rows = [{"prompt": "ignored", "score_chosen": 2.5, "score_rejected": -1.0,
             "chosen": [*SYSTEM_AND_USER, {"role": "assistant", "content": "one two three four five"}],
             "rejected": [*SYSTEM_AND_USER, {"role": "assistant", "content": "six"}]}]
    loaded = load_preference_pairs(write_jsonl(tmp_path / "p.jsonl", rows), "train", tiny_tokenizer, 512)
    (pair,) = loaded.pairs
    assert_rendered(tiny_tokenizer, pair, SYSTEM_AND_USER, "one two three four five", "six")
    assert (pair.chosen_score, pair.rejected_score) == (2.5, -1.0) and pair.prompt_index == 0


def test_string_prompt_and_responses(tmp_path, tiny_tokenizer):
    rows = [{"prompt": "Name three fruits.", "chosen": "apple, banana, cherry", "rejected": "dog"}]
    (pair,) = load_preference_pairs(write_jsonl(tmp_path / "p.jsonl", rows), "train", tiny_tokenizer, 512).pairs
    assert_rendered(tiny_tokenizer, pair, [{"role": "user", "content": "Name three fruits."}],
                    "apple, banana, cherry", "dog")
    assert math.isnan(pair.chosen_score) and math.isnan(pair.rejected_score)


def test_prompt_column_with_response_only_turns(tmp_path, tiny_tokenizer):
    rows = [{"prompt": SYSTEM_AND_USER, "chosen": [{"role": "assistant", "content": "one two"}],
             "rejected": [{"role": "assistant", "content": "three"}]}]
    (pair,) = load_preference_pairs(write_jsonl(tmp_path / "p.jsonl", rows), "train", tiny_tokenizer, 512).pairs
    assert_rendered(tiny_tokenizer, pair, SYSTEM_AND_USER, "one two", "three")


def test_long_prompts_are_skipped_and_counted(tmp_path, tiny_tokenizer):
    short = {"prompt": "Hi.", "chosen": "Hello!", "rejected": "No."}
    long = {"prompt": "Hello! How are you today? " * 20, "chosen": "Fine.", "rejected": "No."}
    loaded = load_preference_pairs(write_jsonl(tmp_path / "p.jsonl", [short, long, short]), "train",
                                   tiny_tokenizer, max_prompt_tokens=40)
    assert [pair.prompt_index for pair in loaded.pairs] == [0, 2] and loaded.skipped_too_long == 1


@pytest.mark.parametrize("rows, message", [
    ([{"prompt": "Hi.", "chosen": "Hello!"}], "lacks the column(s) rejected"),
    ([{"chosen": "Hello!", "rejected": "No."}], "no prompt column"),
    ([{"chosen": [{"role": "user", "content": "Hi."}], "rejected": [{"role": "user", "content": "Hi."}]}],
     "chosen must end with an assistant turn"),
    ([{"chosen": [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello!"}],
       "rejected": [{"role": "user", "content": "Bye."}, {"role": "assistant", "content": "No."}]}],
     "different conversations"),
    ([{"prompt": "Hello! How are you today? " * 20, "chosen": "Fine.", "rejected": "No."}], "no usable pairs"),
    ([{"prompt": "Hi.", "chosen": 3, "rejected": "No."}], "chosen holds int"),
    ([{"prompt": 3, "chosen": "Hello!", "rejected": "No."}], "prompt holds int; it must be a string or a list"),
])
def test_bad_preference_data_is_one_line(tmp_path, tiny_tokenizer, rows, message):
    with pytest.raises(UserError) as error:
        load_preference_pairs(write_jsonl(tmp_path / "p.jsonl", rows), "train", tiny_tokenizer, 40)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_a_saved_dataset_dict_is_read_by_split(tmp_path, tiny_tokenizer, many_pairs):
    out = write_preference_dataset(many_pairs, tmp_path / "d", "disk", 0.1, 0, None)
    assert len(load_preference_pairs(str(out), "test", tiny_tokenizer, 512).pairs) == 5
    with pytest.raises(UserError, match="has no split 'validation'"):
        load_preference_pairs(str(out), "validation", tiny_tokenizer, 512)


def test_an_iteration_without_pairs_exports_an_empty_dataset_with_the_columns(run_dir, tmp_path):
    pairs_path = run_dir / "iter_001" / "pairs.jsonl"
    atomic_write_jsonl(pairs_path, [])
    Manifest.load(RunDir(run_dir)).record("iter_001/pairs", files=[pairs_path], count=0, dropped={"tie": 4})
    export_iteration(str(run_dir), 1, str(tmp_path / "out"))
    rows = datasets.load_from_disk(str(tmp_path / "out" / "pairs"))
    assert len(rows) == 0 and set(rows.column_names) == COLUMNS


def test_a_hub_push_is_private_unless_asked_otherwise(tmp_path, many_pairs, monkeypatch):
    from datasets import DatasetDict

    pushes = []
    monkeypatch.setattr(DatasetDict, "push_to_hub", lambda self, repo, **kwargs: pushes.append((repo, kwargs)))
    write_preference_dataset(many_pairs, tmp_path / "a", "disk", 0.1, 0, push_to_hub="me/pairs")
    write_preference_dataset(many_pairs, tmp_path / "b", "disk", 0.1, 0, push_to_hub="me/pairs", private=False)
    assert pushes == [("me/pairs", {"private": True}), ("me/pairs", {"private": False})]
