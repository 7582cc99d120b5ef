"""The bundled toy task: name N words of a category, scored by a gold rule.

A prompt asks for a number of words from one category ("Hi, I am Ana. Name three fruits."); a response is a
comma-separated word list. The gold reward is the fraction of a perfect answer that was given:

    gold = min(distinct words of the asked category, N) / max(N, words given)

so it lies in [0, 1], is 1 only for exactly N distinct on-category words, and cannot be raised by length: extra
words dilute it, even good ones, and a repeated word counts once. The SFT answers deliberately mix in fillers
("stuff", "etc") and words of other categories, so the SFT policy is on-task but imperfect, with spread across
samples. A Bradley-Terry reward model trained on gold-labelled pairs stands in for a learned preference model;
`eval/gold_mean` on held-out prompts measures true quality.

Two variants (`toy_task.variant`, see `VARIANTS`): short_lists, the task above (2-5 words asked; pi_0's best of 8
already scores about 0.89, so pairs sampled once from pi_0 stay informative for a whole round), and long_lists, where
pi_0 does not cover the answers: prompts ask for 6-10 words and the SFT answers give at most half of them, so pi_0's
best of 8 stays at or below 0.5 and a longer answer is reached only in steps, each policy sampling what the one before
almost never did. The gold rule is the same.

This module holds the task and its data generators; `rlhf_loop.toy.assets` builds and caches the models.
"""

from __future__ import annotations

import itertools
import random
import re
from dataclasses import dataclass, replace
from typing import Any

from rlhf_loop.common.records import Messages

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
COUNT_WORDS = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight", 9: "nine", 10: "ten"}
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

# Words that name nothing: the commonest mistake of the SFT answers.
FILLERS = ("thing", "stuff", "something", "whatever", "etc", "more", "others", "various", "misc", "anything")

_WORD = re.compile(r"[a-z]+")
_CATEGORY_OF = {word: category for category, words in CATEGORIES.items() for word in words}
_OTHER_WORDS = {category: [word for word in _CATEGORY_OF if _CATEGORY_OF[word] != category] for category in CATEGORIES}


def gold_reward(messages: Messages, response: str, meta: dict[str, Any]) -> float:
    """The true quality of `response`: min(distinct words of meta["category"], meta["count"]) over
    max(meta["count"], words given)."""
    del messages  # the task is fully described by meta
    category, count = meta["category"], meta["count"]
    words = _WORD.findall(response.lower())
    on_category = {word for word in words if _CATEGORY_OF.get(word) == category}
    return min(len(on_category), count) / max(count, len(words))


@dataclass(frozen=True)
class AnswerNoise:
    """How often a synthetic answer makes each kind of mistake."""

    filler_rate: float  # a slot holds a filler word that names nothing ("stuff", "etc")
    off_category_rate: float  # a slot holds a word of another category
    count_miss_rate: float  # the answer has the wrong number of words
    count_miss_size: int = 1  # by up to this many words either way (an answer can come out empty)
    repeat_rate: float = 0.0  # a slot repeats an earlier word
    # below 1: a partial answer, of 1 up to this share of the asked count words (uniformly), instead of count misses
    max_share: float = 1.0


@dataclass(frozen=True)
class Variant:
    """What the prompts of a variant ask for, and how far the SFT answers (hence pi_0) fall short of it."""

    counts: tuple[int, ...]  # how many words a prompt asks for
    sft_max_share: float  # SFT answers give 1 up to this share of the asked count (1.0: the count, less count misses)
    # half the reward model's independent answers are partial ones too, so it ranks what pi_0 and the policies after it
    # sample, from a word or two up to the full count
    partial_rm_answers: bool


VARIANTS = {
    "short_lists": Variant(counts=(2, 3, 4, 5), sft_max_share=1.0, partial_rm_answers=False),
    "long_lists": Variant(counts=(6, 7, 8, 9, 10), sft_max_share=0.5, partial_rm_answers=True),
}


# ---------------------------------------------------------------------------------------------------------------------
# Data generation
# ---------------------------------------------------------------------------------------------------------------------


def make_prompts(seed: int, num_train: int, num_eval: int, counts: tuple[int, ...] = VARIANTS["short_lists"].counts
                 ) -> tuple[list[dict], list[dict]]:
    """Disjoint train and held-out prompt rows: {"prompt": [user turn], "category": str, "count": int}, asking for
    one of `counts` words."""
    combos = list(itertools.product(GREETINGS, TEMPLATES, CATEGORIES, counts))
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


def sample_answer(rng: random.Random, category: str, count: int, noise: AnswerNoise) -> str:
    """A comma-separated answer for `category` with mistakes drawn at the rates of `noise`."""
    length = count
    if noise.max_share < 1.0:
        length = rng.randint(1, max(1, int(count * noise.max_share)))
    elif rng.random() < noise.count_miss_rate:
        length = max(0, count + rng.choice([d for d in range(-noise.count_miss_size, noise.count_miss_size + 1) if d]))
    unused = list(CATEGORIES[category])
    rng.shuffle(unused)
    words: list[str] = []
    for _ in range(length):
        draw = rng.random()
        if words and draw < noise.repeat_rate:
            words.append(rng.choice(words))
        elif draw < noise.repeat_rate + noise.filler_rate:
            words.append(rng.choice(FILLERS))
        elif draw < noise.repeat_rate + noise.filler_rate + noise.off_category_rate:
            words.append(rng.choice(_OTHER_WORDS[category]))
        else:
            words.append(unused.pop())
    return ", ".join(words)


def edit_answer(rng: random.Random, answer: str, category: str) -> str:
    """The answer with one word swapped, dropped or added: a near-identical rival, so the pair it forms pins the
    preference on one word."""
    words = answer.split(", ") if answer else []
    unused = [word for word in CATEGORIES[category] if word not in words]
    replacement = rng.choice([rng.choice(FILLERS), rng.choice(_OTHER_WORDS[category])]
                             + [rng.choice(pool) for pool in (words, unused) if pool])
    edit = rng.choice(("swap", "drop", "add")) if words else "add"
    if edit == "add":
        words.insert(rng.randrange(len(words) + 1), replacement)
    elif edit == "swap":
        words[rng.randrange(len(words))] = replacement
    else:
        words.pop(rng.randrange(len(words)))
    return ", ".join(words)


def make_sft_examples(seed: int, prompts: list[dict], num_examples: int, noise: AnswerNoise) -> list[dict]:
    """SFT conversations {"messages": [user, assistant]} whose answers are on-task but imperfect."""
    rng = random.Random(f"{seed}-sft")
    examples = []
    for _ in range(num_examples):
        row = rng.choice(prompts)
        answer = sample_answer(rng, row["category"], row["count"], noise)
        examples.append({"messages": [*row["prompt"], {"role": "assistant", "content": answer}]})
    return examples


def make_preference_pairs(seed: int, prompts: list[dict], num_pairs: int, stream: str = "rm",
                          edited_fraction: float = 0.4, category_fraction: float = 0.4, partial_answers: bool = False):
    """Gold-labelled pairs (ties dropped) over a wide spread of answer quality, so the reward model also ranks the
    better answers the policy reaches after a few DPO iterations. Besides pairs of independent answers:
    `edited_fraction` are one-word edits of each other, which pin the preference on one word, and
    `category_fraction` set a clean answer against itself with one word from another category, the one mistake
    that needs the prompt to spot (a tiny model learns the rest long before it). `partial_answers`: half the
    independent answers give only part of the asked count (long_lists)."""
    from reward.train_bradley_terry import PreferencePair

    rng = random.Random(f"{seed}-{stream}")
    pairs = []
    while len(pairs) < num_pairs:
        row = rng.choice(prompts)
        category, count = row["category"], row["count"]
        kind = rng.random()
        if kind < category_fraction:
            first = sample_answer(rng, category, count, AnswerNoise(0.0, 0.0, 0.0))
            words = first.split(", ")
            words[rng.randrange(count)] = rng.choice(_OTHER_WORDS[category])
            second = ", ".join(words)
        else:
            first = sample_answer(rng, category, count, _random_noise(rng, partial_answers))
            if kind < category_fraction + edited_fraction:
                second = edit_answer(rng, first, category)
            else:
                second = sample_answer(rng, category, count, _random_noise(rng, partial_answers))
        first_gold, second_gold = (gold_reward(row["prompt"], answer, row) for answer in (first, second))
        if first_gold == second_gold:
            continue
        chosen, rejected = (first, second) if first_gold > second_gold else (second, first)
        pairs.append(PreferencePair(prompt=row["prompt"], chosen=chosen, rejected=rejected))
    return pairs


def _random_noise(rng: random.Random, partial_answers: bool = False) -> AnswerNoise:
    noise = AnswerNoise(filler_rate=rng.uniform(0.0, 0.5), off_category_rate=rng.uniform(0.0, 0.4),
                        count_miss_rate=rng.uniform(0.0, 0.8), count_miss_size=3,
                        repeat_rate=rng.choice((0.0, 0.0, 0.2)))
    if partial_answers and rng.random() < 0.5:  # drawn only then: short_lists' pairs stay as they were
        noise = replace(noise, max_share=rng.uniform(0.1, 1.0))
    return noise


def tokenizer_corpus(prompts: list[dict], sft_examples: list[dict]) -> list[str]:
    """The task's own text (prompts, answers, and every word alone), so the BPE learns whole-word tokens."""
    texts = [turn["content"] for row in prompts for turn in row["prompt"]]
    texts += [example["messages"][-1]["content"] for example in sft_examples]
    return texts + [f"{word}, {word}" for word in [*_CATEGORY_OF, *FILLERS]] * 20 + ["user", "assistant", "system"] * 20
