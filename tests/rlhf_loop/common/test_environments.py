"""The environment seam: a user's environment loads by config reference (a file or a module), and what it returns is
checked with one-line errors naming it."""

from __future__ import annotations

import pytest

from rlhf_loop.common.environments import Step, checked_step, first_messages, load_environment
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
    (Step(messages=[], done=False), "no messages and done=False"),
    (Step(done=True, outcome="high"), "outcome 'high'"),
])
def test_step_results_are_checked(returned, message):
    with pytest.raises(UserError, match=message):
        checked_step(returned, "bad.py:Bad")
