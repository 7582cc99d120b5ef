import json

import pytest

from policy.config import PolicyConfig
from rlhf_loop.config import DataConfig, EvalConfig
from rlhf_loop.driver.data import iteration_prompts, load_rows, render_prompts
from rlhf_loop.common.errors import UserError
from tests.tool_calls import CALCULATOR, ENVIRONMENT as CALCULATOR_ENVIRONMENT, tool_tokenizer


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def prompts_file(tmp_path):
    rows = [{"prompt": f"Name {i} fruits.", "answer": i} for i in range(10)]
    return write_jsonl(tmp_path / "prompts.jsonl", rows)


def test_plain_strings_become_user_turns_rendered_with_the_chat_template(prompts_file, tiny_tokenizer):
    cfg = DataConfig(prompts=[prompts_file], shuffle=False)
    prompt_set = iteration_prompts(cfg, 1, tiny_tokenizer, seed=0)
    first = prompt_set.prompts[0]
    assert first.messages == [{"role": "user", "content": "Name 0 fruits."}]
    text = tiny_tokenizer.apply_chat_template(first.messages, add_generation_prompt=True, tokenize=False)
    assert first.token_ids == tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tiny_tokenizer.decode(first.token_ids).endswith("assistant<|end_header_id|>\n\n")
    assert first.meta == {"answer": 0}
    assert [p.index for p in prompt_set.prompts] == list(range(10))


def test_message_lists_are_used_as_they_are(tmp_path, tiny_tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    path = write_jsonl(tmp_path / "p.jsonl", [{"context_messages": messages}])
    cfg = DataConfig(prompts=[path], prompt_column="context_messages")
    assert iteration_prompts(cfg, 1, tiny_tokenizer, seed=0).prompts[0].messages == messages


def test_parquet_files_load(tmp_path, tiny_tokenizer):
    import datasets

    path = str(tmp_path / "p.parquet")
    datasets.Dataset.from_dict({"prompt": ["a", "b", "c"]}).to_parquet(path)
    assert len(iteration_prompts(DataConfig(prompts=[path]), 1, tiny_tokenizer, seed=0).prompts) == 3


def test_each_iteration_gets_a_fresh_slice_of_one_dataset(prompts_file, tiny_tokenizer):
    cfg = DataConfig(prompts=[prompts_file], prompts_per_iteration=4, shuffle=True)
    slices = [iteration_prompts(cfg, i, tiny_tokenizer, seed=3).prompts for i in (1, 2, 3)]
    contents = [[p.messages[0]["content"] for p in s] for s in slices]
    assert [len(c) for c in contents] == [4, 4, 2]
    assert len(set(sum(contents, []))) == 10  # disjoint slices covering the set
    assert [p.index for p in slices[1]] == [4, 5, 6, 7]  # stable ids across iterations
    again = [p.messages[0]["content"] for p in iteration_prompts(cfg, 2, tiny_tokenizer, seed=3).prompts]
    assert again == contents[1]


def test_one_dataset_per_iteration(tmp_path, tiny_tokenizer):
    paths = [write_jsonl(tmp_path / f"it{i}.jsonl", [{"prompt": f"iteration {i}"}]) for i in (1, 2)]
    cfg = DataConfig(prompts=paths)
    assert iteration_prompts(cfg, 2, tiny_tokenizer, 0).prompts[0].messages[0]["content"] == "iteration 2"


def test_too_long_prompts_are_skipped_and_counted(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "short"}, {"prompt": "long " * 200}])
    prompt_set = iteration_prompts(DataConfig(prompts=[path], max_prompt_tokens=64), 1, tiny_tokenizer, 0)
    assert len(prompt_set.prompts) == 1 and prompt_set.skipped_too_long == 1


def test_missing_column_names_the_columns(prompts_file, tiny_tokenizer):
    with pytest.raises(UserError, match=r"prompt column 'question' is not in .*columns: prompt, answer"):
        iteration_prompts(DataConfig(prompts=[prompts_file], prompt_column="question"), 1, tiny_tokenizer, 0)


def test_missing_file_and_empty_set_are_clear_errors(tmp_path, tiny_tokenizer):
    with pytest.raises(UserError, match="does not exist"):
        load_rows(str(tmp_path / "nope.jsonl"), "train")
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "long " * 200}])
    with pytest.raises(UserError, match="no usable prompts"):
        iteration_prompts(DataConfig(prompts=[path], max_prompt_tokens=16), 1, tiny_tokenizer, 0)


def test_wrongly_typed_prompt_cells_are_rejected(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": 42}])
    with pytest.raises(UserError, match="must hold strings or lists"):
        render_prompts(load_rows(path, "train"), "prompt", path, tiny_tokenizer, 100)


def test_an_environment_makes_each_prompt_from_its_row_and_keeps_the_whole_row(tmp_path, tiny_tokenizer):
    environment = tmp_path / "quiz.py"
    environment.write_text("class Quiz:\n"
                           "    def reset(self, row):\n"
                           "        return [{'role': 'user', 'content': f\"What is {row['a']} + {row['b']}?\"}]\n"
                           "    def step(self, message):\n"
                           "        raise AssertionError('not stepped here')\n")
    path = write_jsonl(tmp_path / "sums.jsonl", [{"a": i, "b": 2} for i in range(3)])  # no prompt column
    cfg = DataConfig(prompts=[path], shuffle=False)
    prompts = iteration_prompts(cfg, 1, tiny_tokenizer, seed=0, environment=f"{environment}:Quiz").prompts
    assert [p.messages[0]["content"] for p in prompts] == ["What is 0 + 2?", "What is 1 + 2?", "What is 2 + 2?"]
    assert prompts[1].meta == {"a": 1, "b": 2}  # the engines reset with the same row
    assert prompts[1].token_ids == tiny_tokenizer.apply_chat_template(prompts[1].messages, add_generation_prompt=True,
                                                                      tokenize=True, return_dict=False)
    with pytest.raises(UserError, match=r"environment\.factory .*defines no 'Missing'"):
        iteration_prompts(cfg, 1, tiny_tokenizer, seed=0, environment=f"{environment}:Missing")


def test_an_environments_tools_are_rendered_into_its_prompts(tmp_path, tiny_tokenizer):
    environment = tmp_path / "calculator.py"
    environment.write_text(CALCULATOR_ENVIRONMENT)
    tokenizer = tool_tokenizer(tiny_tokenizer)
    path = write_jsonl(tmp_path / "sums.jsonl", [{"a": 2, "b": 3}])
    prompts = render_prompts(load_rows(path, "train"), "prompt", path, tokenizer, 1000,
                             environment=f"{environment}:Calculator").prompts
    assert prompts[0].tools == [CALCULATOR]
    assert prompts[0].token_ids == tokenizer.apply_chat_template(prompts[0].messages, tools=[CALCULATOR],
                                                                 add_generation_prompt=True, tokenize=True,
                                                                 return_dict=False)
    assert '"name": "calculator"' in tokenizer.decode(prompts[0].token_ids)
