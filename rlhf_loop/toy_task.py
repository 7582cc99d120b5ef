"""The bundled toy task: name N words of a category, scored by a gold rule.

A prompt asks for a number of words from one category ("Hi, I am Ana. Name three fruits."); a response is a
comma-separated word list. The gold reward is the fraction of a perfect answer that was given:

    gold = (distinct words of the asked category) / max(asked count, words given)

so it lies in [0, 1], is 1 only for exactly N distinct on-category words, and cannot be raised by padding the list
(extra words dilute it) or by repeating a good word (duplicates count once). The SFT answers deliberately mix in
off-category words and miss the count, so the SFT policy is on-task but imperfect, with spread across samples. A
Bradley-Terry reward model trained on gold-labelled pairs stands in for a learned preference model; `eval/gold_mean`
on held-out prompts measures true quality.

`ensure_toy_assets` builds everything once (tokenizer and random-init policy, SFT data and SFT policy, prompts,
reward model) and caches it under `ToyTaskConfig.dir` with fixed names (see `ToyAssets`).
"""

from __future__ import annotations

import fcntl
import hashlib
import itertools
import json
import os
import random
import re
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rlhf_loop.records import Messages

# Bump when the recipe changes in a way the config does not show (word lists, templates, training code), so every
# cache built by an older recipe is rebuilt.
RECIPE_VERSION = 1

CATEGORIES: dict[str, tuple[str, ...]] = {
    "fruits": ("apple", "banana", "cherry", "grape", "lemon", "mango", "peach", "pear",
               "plum", "melon", "kiwi", "apricot", "fig", "lime", "papaya", "coconut"),
    "animals": ("cat", "dog", "horse", "tiger", "lion", "rabbit", "zebra", "monkey",
                "elephant", "giraffe", "wolf", "fox", "bear", "deer", "mouse", "camel"),
    "colors": ("red", "blue", "green", "yellow", "purple", "pink", "brown", "black",
               "white", "gray", "violet", "indigo", "crimson", "teal", "beige", "maroon"),
    "vehicles": ("car", "bus", "truck", "bicycle", "train", "boat", "plane", "taxi",
                 "tram", "scooter", "tractor", "van", "yacht", "ferry", "rocket", "wagon"),
    "tools": ("hammer", "wrench", "saw", "drill", "chisel", "pliers", "shovel", "rake",
              "axe", "screwdriver", "ladder", "clamp", "mallet", "trowel", "spanner", "crowbar"),
    "instruments": ("piano", "guitar", "violin", "drum", "flute", "trumpet", "harp", "cello",
                    "banjo", "clarinet", "oboe", "tuba", "saxophone", "ukulele", "accordion", "trombone"),
    "sports": ("soccer", "tennis", "golf", "hockey", "rugby", "cricket", "baseball", "boxing",
               "swimming", "skiing", "rowing", "fencing", "archery", "karate", "volleyball", "surfing"),
    "vegetables": ("carrot", "potato", "onion", "garlic", "cabbage", "spinach", "lettuce", "celery",
                   "pumpkin", "broccoli", "radish", "pea", "bean", "cucumber", "turnip", "leek"),
}
COUNT_WORDS = {2: "two", 3: "three", 4: "four", 5: "five"}
TEMPLATES = (
    "Name {count} {category}.",
    "List {count} {category}.",
    "Give me {count} {category}.",
    "Can you name {count} {category}?",
    "Tell me {count} {category}, please.",
    "Write down {count} {category}.",
)
NAMES = ("Ana", "Ben", "Cleo", "Dev", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jo", "Kai", "Lea", "Max", "Nia",
         "Omar", "Pia", "Quin", "Rosa", "Sam", "Tara", "Uma", "Vic", "Wes", "Xia", "Yusuf", "Zoe", "Ada", "Bo",
         "Cy", "Dana", "Emil", "Finn", "Gia", "Hugo", "Iris", "Jan", "Kim", "Lars", "Mia", "Ned")
GREETINGS = ("",) + tuple(f"Hi, I am {name}. " for name in NAMES)

_WORD = re.compile(r"[a-z]+")
_CATEGORY_OF = {word: category for category, words in CATEGORIES.items() for word in words}


def gold_reward(messages: Messages, response: str, meta: dict[str, Any]) -> float:
    """The true quality of `response`: distinct words of meta["category"] over max(meta["count"], words given)."""
    del messages  # the task is fully described by meta
    category, count = meta["category"], meta["count"]
    words = _WORD.findall(response.lower())
    on_category = {word for word in words if _CATEGORY_OF.get(word) == category}
    return len(on_category) / max(count, len(words))


@dataclass
class ToyTaskConfig:
    enabled: bool = False  # build (or reuse) the toy assets at the start of a run
    dir: str = ".cache/toy_task"  # cache directory; its layout is fixed (see ToyAssets), rebuilt when the recipe changes
    seed: int = 0  # drives data generation, model initialisation, SFT and reward-model training
    num_train_prompts: int = 3072  # prompts the loop samples from (data.prompts)
    num_eval_prompts: int = 128  # held-out prompts for eval/gold_mean (eval.prompts), disjoint from the train prompts
    num_sft_examples: int = 2048  # SFT conversations (prompt + imperfect answer), drawn over the train prompts
    sft_off_category_rate: float = 0.35  # chance that each word of an SFT answer comes from another category
    sft_count_miss_rate: float = 0.5  # chance that an SFT answer has one word too many or too few
    num_rm_pairs: int = 4096  # gold-labelled preference pairs the reward model is trained on
    num_rm_eval_pairs: int = 512  # held-out pairs (on eval prompts) for the reward model's accuracy
    vocab_size: int = 1024  # byte-level BPE vocabulary of the tiny tokenizer
    hidden_size: int = 64  # width of the tiny policy and reward model (head size is fixed at 32 for vLLM on CPU)
    num_layers: int = 2  # decoder layers of the tiny policy and reward model
    sft_epochs: int = 3
    sft_learning_rate: float = 3e-3
    sft_batch_size: int = 32
    rm_epochs: int = 2
    rm_learning_rate: float = 1e-3
    rm_batch_size: int = 32


@dataclass(frozen=True)
class ToyAssets:
    """Paths inside the cache directory; the names are fixed so configs can point at them."""

    base_policy: Path  # random-init tiny policy with the tokenizer: where an in-run SFT stage starts
    sft_policy: Path  # base_policy after SFT on sft_data: pi_0 of the loop
    sft_data: Path  # sft.jsonl: {"messages": [...]} with the final assistant turn as target
    train_prompts: Path  # train_prompts.jsonl: {"prompt": [...], "category": str, "count": int}
    eval_prompts: Path  # eval_prompts.jsonl: same columns, held out
    reward_model: Path  # Bradley-Terry reward model trained on gold-labelled pairs
    rm_pairs: Path  # rm_pairs.jsonl: {"prompt": [...], "chosen": str, "rejected": str}
    rm_eval_pairs: Path  # rm_eval_pairs.jsonl: held-out pairs on the eval prompts
    stamp: Path  # build.json: recipe hash and what the build measured (reward-model accuracy, timings)


def toy_assets(directory: str | Path) -> ToyAssets:
    """The asset paths under `directory` (whether or not they are built yet)."""
    directory = Path(directory)
    return ToyAssets(
        base_policy=directory / "base_policy",
        sft_policy=directory / "sft_policy",
        sft_data=directory / "sft.jsonl",
        train_prompts=directory / "train_prompts.jsonl",
        eval_prompts=directory / "eval_prompts.jsonl",
        reward_model=directory / "reward_model",
        rm_pairs=directory / "rm_pairs.jsonl",
        rm_eval_pairs=directory / "rm_eval_pairs.jsonl",
        stamp=directory / "build.json",
    )


# ---------------------------------------------------------------------------------------------------------------------
# Data generation
# ---------------------------------------------------------------------------------------------------------------------


def make_prompts(seed: int, num_train: int, num_eval: int) -> tuple[list[dict], list[dict]]:
    """Disjoint train and held-out prompt rows: {"prompt": [user turn], "category": str, "count": int}."""
    combos = list(itertools.product(GREETINGS, TEMPLATES, CATEGORIES, COUNT_WORDS))
    if num_train + num_eval > len(combos):
        raise ValueError(
            f"toy_task asks for {num_train + num_eval} prompts but only {len(combos)} distinct ones exist; "
            "lower toy_task.num_train_prompts or toy_task.num_eval_prompts"
        )
    random.Random(f"{seed}-prompts").shuffle(combos)
    rows = [_prompt_row(*combo) for combo in combos[: num_eval + num_train]]
    return rows[num_eval:], rows[:num_eval]


def _prompt_row(greeting: str, template: str, category: str, count: int) -> dict:
    text = greeting + template.format(count=COUNT_WORDS[count], category=category)
    return {"prompt": [{"role": "user", "content": text}], "category": category, "count": count}


def sample_answer(rng: random.Random, category: str, count: int, off_category_rate: float,
                  count_miss_rate: float, repeat_rate: float = 0.0) -> str:
    """A comma-separated answer that gets each kind of mistake at the given rates."""
    length = count + (rng.choice((-1, 1)) if rng.random() < count_miss_rate else 0)
    others = [word for word in _CATEGORY_OF if _CATEGORY_OF[word] != category]
    unused = list(CATEGORIES[category])
    rng.shuffle(unused)
    words: list[str] = []
    for _ in range(max(length, 1)):
        if words and rng.random() < repeat_rate:
            words.append(rng.choice(words))
        elif rng.random() < off_category_rate:
            words.append(rng.choice(others))
        else:
            words.append(unused.pop())
    return ", ".join(words)


def make_sft_examples(seed: int, prompts: list[dict], num_examples: int, off_category_rate: float,
                      count_miss_rate: float) -> list[dict]:
    """SFT conversations {"messages": [user, assistant]} whose answers are on-task but imperfect."""
    rng = random.Random(f"{seed}-sft")
    examples = []
    for _ in range(num_examples):
        row = rng.choice(prompts)
        answer = sample_answer(rng, row["category"], row["count"], off_category_rate, count_miss_rate)
        examples.append({"messages": [*row["prompt"], {"role": "assistant", "content": answer}]})
    return examples


def make_preference_pairs(seed: int, prompts: list[dict], num_pairs: int, stream: str = "rm"):
    """Gold-labelled pairs over a wide spread of answer quality (from near-perfect to mostly wrong, with repeats),
    so the reward model also ranks the better answers the policy reaches after a few DPO iterations."""
    from reward.train_bradley_terry import PreferencePair

    rng = random.Random(f"{seed}-{stream}")
    pairs = []
    while len(pairs) < num_pairs:
        row = rng.choice(prompts)
        answers = [_varied_answer(rng, row["category"], row["count"]) for _ in range(2)]
        golds = [gold_reward(row["prompt"], answer, row) for answer in answers]
        if golds[0] == golds[1]:
            continue
        chosen, rejected = answers if golds[0] > golds[1] else answers[::-1]
        pairs.append(PreferencePair(prompt=row["prompt"], chosen=chosen, rejected=rejected))
    return pairs


def _varied_answer(rng: random.Random, category: str, count: int) -> str:
    return sample_answer(rng, category, count, off_category_rate=rng.uniform(0.0, 0.8),
                         count_miss_rate=rng.uniform(0.0, 0.8), repeat_rate=rng.choice((0.0, 0.0, 0.3)))


def tokenizer_corpus(prompts: list[dict], sft_examples: list[dict]) -> list[str]:
    """The task's own text (prompts, answers, and every word alone), so the BPE learns whole-word tokens."""
    texts = [turn["content"] for row in prompts for turn in row["prompt"]]
    texts += [example["messages"][-1]["content"] for example in sft_examples]
    return texts + [f"{word}, {word}" for word in _CATEGORY_OF] * 20 + ["user", "assistant", "system"] * 20


def write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
