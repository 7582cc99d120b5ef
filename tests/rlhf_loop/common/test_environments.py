"""The environment seam: a user's environment loads by config reference (a file or a module), and what it returns is
checked with one-line errors naming it."""

from __future__ import annotations

import pytest

from rlhf_loop.common.environments import Step, checked_step, environment_tools, first_messages, load_environment
from rlhf_loop.common.errors import UserError

ENVIRONMENT_FILE = '''
from rlhf_loop.common.environments import Step

class Echo:
    def reset(self, row):
        return [{"role": "user", "content": row["question"]}]

    def step(self, message):
        return Step([{"role": "user", "content": "again"}], done=message["content"] == "stop", outcome=1)

class NoStep:
    def reset(self, row):
        return []

NOT_CALLABLE = 3
'''


@pytest.fixture
def environment_file(tmp_path):
    path = tmp_path / "my_env.py"
    path.write_text(ENVIRONMENT_FILE)
    return path


def test_a_file_reference_makes_environments_that_reset_and_step(environment_file):
    factory = load_environment(f"{environment_file}:Echo")
    environment = factory()
    assert first_messages(environment, {"question": "hi"}, "Echo") == [{"role": "user", "content": "hi"}]
    step = checked_step(environment.step({"role": "assistant", "content": "stop"}), "Echo")
    assert step == Step([{"role": "user", "content": "again"}], done=True, outcome=1.0)
    assert isinstance(step.outcome, float)


def test_a_module_reference_loads_the_bundled_environment():
    factory = load_environment("rlhf_loop.toy.retry_environment:WordListRetry")
    row = {"prompt": [{"role": "user", "content": "Name two fruits."}], "category": "fruits", "count": 2}
    environment = factory()
    assert first_messages(environment, row, "toy") == row["prompt"]
    wrong = checked_step(environment.step({"role": "assistant", "content": "apple, stuff"}), "toy")
    assert not wrong.done and wrong.messages == row["prompt"] and wrong.outcome == 0.5
    right = checked_step(environment.step({"role": "assistant", "content": "apple, pear"}), "toy")
    assert right.done and right.outcome == pytest.approx(0.9)  # one retry costs 0.1


@pytest.mark.parametrize("attribute, message", [
    ("Missing", r"environment\.factory .*defines no 'Missing'"),
    ("NoStep", r"environment\.factory .*has no step method"),
    ("NOT_CALLABLE", r"environment\.factory .*is not callable"),
])
def test_a_wrong_reference_is_one_line_naming_the_key(environment_file, attribute, message):
    with pytest.raises(UserError, match=message):
        load_environment(f"{environment_file}:{attribute}")


def test_a_missing_file_names_the_key(tmp_path):
    with pytest.raises(UserError, match=r"environment\.factory: file .*nothing\.py does not exist"):
        load_environment(f"{tmp_path / 'nothing.py'}:Echo")


@pytest.mark.parametrize("returned, message", [
    ([], "reset returned"),
    ("hello", "reset returned"),
    ([{"role": "user"}], "reset returned"),
    ([{"role": "user", "content": "hi", "tool_call_id": object()}], "reset returned"),
])
def test_reset_must_return_messages(returned, message):
    class Bad:
        def reset(self, row):
            return returned

    with pytest.raises(UserError, match=message):
        first_messages(Bad(), {}, "bad.py:Bad")


@pytest.mark.parametrize("returned, message", [
    ("text", "step returned str"),
    (Step(messages="hi"), "step returned messages"),
    (Step(messages=[{"role": "tool", "name": "calculator", "content": 5}]), "step returned messages"),
    (Step(messages=[{"role": "tool", "name": "calculator"}]), "step returned messages"),
    (Step(messages=[{"role": "tool", "content": "5", "name": {"calculator"}}]), "step returned messages"),
    (Step(messages=[], done=False), "no messages and done=False"),
    (Step(done=True, outcome="high"), "outcome 'high'"),
    (type("NoMessages", (), {"done": True, "outcome": None})(), "step returned messages None"),
])
def test_step_results_are_checked(returned, message):
    with pytest.raises(UserError, match=message):
        checked_step(returned, "bad.py:Bad")


def test_tool_turns_keep_their_other_keys_as_copies():
    reply = [{"role": "tool", "name": "calculator", "tool_call_id": "call_0", "content": "5"}]
    step = checked_step(Step(reply), "calc.py:Calculator")
    assert step.messages == reply and step.messages[0] is not reply[0]
    as_a_dataset_row_holds_it = [{**reply[0], "tool_calls": None}]
    assert checked_step(Step(as_a_dataset_row_holds_it), "calc.py:Calculator").messages == reply
    call = {"type": "function", "function": {"name": "calculator", "arguments": {"a": 2}}}
    few_shot = [{"role": "user", "content": "2 + 3?"}, {"role": "assistant", "content": "", "tool_calls": [call]}]

    class Shot:
        def reset(self, row):
            return few_shot

    messages = first_messages(Shot(), {}, "shot.py:Shot")
    assert messages == few_shot
    call["function"]["arguments"]["a"] = 3  # the environment's later changes do not reach what was recorded
    assert messages[1]["tool_calls"][0]["function"]["arguments"] == {"a": 2}


def test_tools_are_read_after_reset_and_checked():
    tool = {"type": "function", "function": {"name": "calculator", "parameters": {"type": "object"}}}

    class Offering:
        def __init__(self, tools):
            self.tools = tools

    assert environment_tools(Offering([tool]), "calc") == [tool]
    assert environment_tools(Offering([{"name": "calculator"}]), "calc") == [{"name": "calculator"}]
    assert environment_tools(Offering([]), "calc") is None and environment_tools(object(), "calc") is None
    for bad in (tool, [{"type": "function"}], [{"function": {"name": 3}}], [{"name": "calculator", "f": len}]):
        with pytest.raises(UserError, match=r"environment calc: tools is .*; it must be a list of JSON-schema tool"):
            environment_tools(Offering(bad), "calc")
