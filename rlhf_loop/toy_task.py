"""The bundled toy task: name N words of a category, scored by a gold rule.

A prompt asks for a number of words from one category ("Hi, I am Ana. Name three fruits."); a response is a
comma-separated word list. The gold reward is the fraction of a perfect answer that was given:

    gold = min(distinct words of the asked category, N) / max(N, words given)

so it lies in [0, 1], is 1 only for exactly N distinct on-category words, and cannot be raised by length: extra
words dilute it, even good ones, and a repeated word counts once. The SFT answers deliberately mix in fillers
("stuff", "etc") and words of other categories, so the SFT policy is on-task but imperfect, with spread across
samples. A Bradley-Terry reward model trained on gold-labelled pairs stands in for a learned preference model;
`eval/gold_mean` on held-out prompts measures true quality.

`ensure_toy_assets` builds everything once (tokenizer and random-init policy, SFT data and SFT policy, prompts,
reward model) and caches it under `ToyTaskConfig.dir` with fixed names (see `ToyAssets`).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import itertools
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Iterator
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


@dataclass
class ToyTaskConfig:
    enabled: bool = False  # build (or reuse) the toy assets at the start of a run
    dir: str = ".cache/toy_task"  # cache directory; its layout is fixed (see ToyAssets), rebuilt when the recipe changes
    seed: int = 0  # drives data generation, model initialisation, SFT and reward-model training
    num_train_prompts: int = 3072  # prompts the loop samples from (data.prompts)
    num_eval_prompts: int = 128  # held-out prompts for eval/gold_mean (eval.prompts), disjoint from the train prompts
    num_sft_examples: int = 2048  # SFT conversations (prompt + imperfect answer), drawn over the train prompts
    sft_filler_rate: float = 0.3  # chance that a word of an SFT answer is a filler ("stuff", "etc")
    sft_off_category_rate: float = 0.1  # chance that a word of an SFT answer comes from another category
    sft_count_miss_rate: float = 0.0  # chance that an SFT answer has one word too many or too few
    num_rm_category_pairs: int = 4096  # first reward-model stage: clean answer vs one word from another category
    rm_category_epochs: int = 4  # passes over those; the category check only clicks when trained on its own first
    num_rm_pairs: int = 4096  # second stage: gold-labelled pairs of every kind of mistake
    rm_edited_fraction: float = 0.4  # share of second-stage pairs whose two answers differ in one word only
    rm_category_fraction: float = 0.4  # share of second-stage pairs that repeat the first stage's kind
    num_rm_eval_pairs: int = 512  # held-out second-stage pairs (on the eval prompts) for the reward model's accuracy
    vocab_size: int = 1024  # upper bound for the byte-level BPE vocabulary (the task's text fills about 1000)
    hidden_size: int = 64  # width of the tiny policy and reward model (heads of size 32, as vLLM on CPU needs)
    num_layers: int = 2  # decoder layers of the tiny policy and reward model
    sft_epochs: int = 12  # passes over the SFT conversations (about 1500 steps; the category words click after 600-1200)
    sft_learning_rate: float = 3e-3  # peak of a cosine schedule; high because the model is tiny and random-init
    sft_batch_size: int = 16  # conversations per SFT optimizer step
    rm_epochs: int = 2  # passes over the second-stage pairs
    rm_learning_rate: float = 5e-4  # both stages; the reward model starts from the SFT policy, whose features it keeps
    rm_batch_size: int = 16  # pairs per reward-model optimizer step

    def sft_noise(self) -> AnswerNoise:
        return AnswerNoise(self.sft_filler_rate, self.sft_off_category_rate, self.sft_count_miss_rate)


@dataclass(frozen=True)
class ToyAssets:
    """Paths inside the cache directory; the names are fixed so configs can point at them."""

    base_policy: Path  # random-init tiny policy with the tokenizer: where an in-run SFT stage starts
    sft_policy: Path  # base_policy after SFT on sft_data: pi_0 of the loop
    sft_data: Path  # sft.jsonl: {"messages": [...]} with the final assistant turn as target
    train_prompts: Path  # train_prompts.jsonl: {"prompt": [...], "category": str, "count": int}
    eval_prompts: Path  # eval_prompts.jsonl: same columns, held out
    reward_model: Path  # Bradley-Terry reward model trained on gold-labelled pairs, in two stages
    rm_category_pairs: Path  # rm_category_pairs.jsonl: first-stage pairs {"prompt": [...], "chosen", "rejected"}
    rm_pairs: Path  # rm_pairs.jsonl: second-stage pairs, same columns
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
        rm_category_pairs=directory / "rm_category_pairs.jsonl",
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


def sample_answer(rng: random.Random, category: str, count: int, noise: AnswerNoise) -> str:
    """A comma-separated answer for `category` with mistakes drawn at the rates of `noise`."""
    length = count
    if rng.random() < noise.count_miss_rate:
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
                          edited_fraction: float = 0.4, category_fraction: float = 0.4):
    """Gold-labelled pairs (ties dropped) over a wide spread of answer quality, so the reward model also ranks the
    better answers the policy reaches after a few DPO iterations. Besides pairs of independent answers:
    `edited_fraction` are one-word edits of each other, which pin the preference on one word, and
    `category_fraction` set a clean answer against itself with one word from another category, the one mistake
    that needs the prompt to spot (a tiny model learns the rest long before it)."""
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
            first = sample_answer(rng, category, count, _random_noise(rng))
            if kind < category_fraction + edited_fraction:
                second = edit_answer(rng, first, category)
            else:
                second = sample_answer(rng, category, count, _random_noise(rng))
        first_gold, second_gold = (gold_reward(row["prompt"], answer, row) for answer in (first, second))
        if first_gold == second_gold:
            continue
        chosen, rejected = (first, second) if first_gold > second_gold else (second, first)
        pairs.append(PreferencePair(prompt=row["prompt"], chosen=chosen, rejected=rejected))
    return pairs


def _random_noise(rng: random.Random) -> AnswerNoise:
    return AnswerNoise(filler_rate=rng.uniform(0.0, 0.5), off_category_rate=rng.uniform(0.0, 0.4),
                       count_miss_rate=rng.uniform(0.0, 0.8), count_miss_size=3, repeat_rate=rng.choice((0.0, 0.0, 0.2)))


def tokenizer_corpus(prompts: list[dict], sft_examples: list[dict]) -> list[str]:
    """The task's own text (prompts, answers, and every word alone), so the BPE learns whole-word tokens."""
    texts = [turn["content"] for row in prompts for turn in row["prompt"]]
    texts += [example["messages"][-1]["content"] for example in sft_examples]
    return texts + [f"{word}, {word}" for word in [*_CATEGORY_OF, *FILLERS]] * 20 + ["user", "assistant", "system"] * 20


def write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# ---------------------------------------------------------------------------------------------------------------------
# Building and caching the assets
# ---------------------------------------------------------------------------------------------------------------------


# Toy prompts render to about 25 tokens and answers to about 15: these bounds never cut anything.
_MAX_PROMPT_LENGTH = 64
_MAX_LENGTH = 128


def ensure_toy_assets(cfg: ToyTaskConfig) -> ToyAssets:
    """The toy assets under cfg.dir, built first if missing or built by another recipe.

    A build runs in a child process (DeepSpeed, used by SFT, sets process-wide state that must not leak into the
    caller or into the Ray workers it starts later), writes into a staging directory beside cfg.dir and renames it
    into place, so a crash never leaves a half-built cache. Concurrent callers serialise on a lock file: one
    builds, the others wait and then find the cache ready.
    """
    assets = toy_assets(cfg.dir)
    key = recipe_key(cfg)
    if _built_key(assets.stamp) == key:
        return assets
    directory = Path(cfg.dir)
    directory.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(directory.parent / f".{directory.name}.lock"):
        if _built_key(assets.stamp) == key:
            return assets
        for pattern in (f".{directory.name}.build-*", f".{directory.name}.old-*"):
            for leftover in directory.parent.glob(pattern):
                shutil.rmtree(leftover)  # left by an interrupted build; we hold the lock, so nobody is using it
        staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.build-", dir=directory.parent))
        staging.chmod(0o755)  # mkdtemp makes it private; the cache is shared like any other directory
        _build_in_child_process(cfg, staging)
        _replace_directory(staging, directory)
    return assets


def recipe_key(cfg: ToyTaskConfig) -> str:
    """Hash of everything that shapes the assets: the config (less where they live and the on switch) and the
    recipe version."""
    recipe = {k: v for k, v in asdict(cfg).items() if k not in ("enabled", "dir")}
    recipe["recipe_version"] = RECIPE_VERSION
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def build_toy_assets(cfg: ToyTaskConfig, directory: str | Path) -> dict[str, Any]:
    """Build every asset into `directory` (in this process) and write the stamp last; returns the stamp."""
    import time

    from policy.config import PolicyConfig
    from policy.sft import run_sft
    from reward.train_bradley_terry import train_bradley_terry
    from rlhf_loop.config import SFTConfig
    from rlhf_loop.tiny import build_tiny_policy, build_tokenizer

    started = time.monotonic()
    assets = toy_assets(directory)
    train_prompts, eval_prompts = make_prompts(cfg.seed, cfg.num_train_prompts, cfg.num_eval_prompts)
    sft_examples = make_sft_examples(cfg.seed, train_prompts, cfg.num_sft_examples, cfg.sft_noise())
    rm_category_pairs = make_preference_pairs(cfg.seed, train_prompts, cfg.num_rm_category_pairs, "rm-category",
                                              edited_fraction=0.0, category_fraction=1.0)
    rm_pairs = make_preference_pairs(cfg.seed, train_prompts, cfg.num_rm_pairs, "rm", cfg.rm_edited_fraction,
                                     cfg.rm_category_fraction)
    rm_eval_pairs = make_preference_pairs(cfg.seed, eval_prompts, cfg.num_rm_eval_pairs, "rm-eval",
                                          cfg.rm_edited_fraction, cfg.rm_category_fraction)
    write_jsonl(assets.train_prompts, train_prompts)
    write_jsonl(assets.eval_prompts, eval_prompts)
    write_jsonl(assets.sft_data, sft_examples)
    write_jsonl(assets.rm_category_pairs, (asdict(pair) for pair in rm_category_pairs))
    write_jsonl(assets.rm_pairs, (asdict(pair) for pair in rm_pairs))
    write_jsonl(assets.rm_eval_pairs, (asdict(pair) for pair in rm_eval_pairs))

    tokenizer = build_tokenizer(tokenizer_corpus(train_prompts, sft_examples), cfg.vocab_size)
    build_tiny_policy(tokenizer, assets.base_policy, seed=cfg.seed, hidden_size=cfg.hidden_size,
                      num_layers=cfg.num_layers, num_heads=cfg.hidden_size // 32)
    sft = SFTConfig(learning_rate=cfg.sft_learning_rate, epochs=cfg.sft_epochs, micro_batch_size=cfg.sft_batch_size,
                    max_length=_MAX_LENGTH, max_prompt_length=_MAX_PROMPT_LENGTH, warmup_ratio=0.05)
    sft_stats = run_sft(PolicyConfig(model_path=str(assets.base_policy)), sft,
                        [example["messages"] for example in sft_examples], str(assets.sft_policy), seed=cfg.seed)

    # The reward model starts from the SFT policy, which already tells the categories apart.
    rm_training = dict(lr=cfg.rm_learning_rate, batch_size=cfg.rm_batch_size, max_length=_MAX_LENGTH, seed=cfg.seed)
    category_stage = Path(directory) / "reward_model_category_stage"
    category_metrics = train_bradley_terry(assets.sft_policy, rm_category_pairs, category_stage,
                                           epochs=cfg.rm_category_epochs, **rm_training)
    rm_metrics = train_bradley_terry(category_stage, rm_pairs, assets.reward_model, epochs=cfg.rm_epochs,
                                     eval_pairs=rm_eval_pairs, **rm_training)
    shutil.rmtree(category_stage)
    stamp = {
        "recipe_key": recipe_key(cfg),
        "config": asdict(cfg),
        "sft_mean_loss": sft_stats.loss,
        "reward_model_category_stage": asdict(category_metrics),
        "reward_model": asdict(rm_metrics),
        "build_seconds": round(time.monotonic() - started, 1),
    }
    assets.stamp.write_text(json.dumps(stamp, indent=2) + "\n")
    return stamp


def _built_key(stamp: Path) -> str | None:
    try:
        return json.loads(stamp.read_text())["recipe_key"]
    except (OSError, ValueError, KeyError):
        return None


@contextlib.contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


_CHILD_BUILD = (
    "import json, sys; from rlhf_loop.toy_task import ToyTaskConfig, build_toy_assets; "
    "build_toy_assets(ToyTaskConfig(**json.loads(sys.argv[2])), sys.argv[1])"
)


def _build_in_child_process(cfg: ToyTaskConfig, staging: Path) -> None:
    command = [sys.executable, "-c", _CHILD_BUILD, str(staging), json.dumps(asdict(cfg))]
    # One thread: the models are too small to gain from two, and on a busy 2-core machine two threads per process
    # thrash (an SFT step took 20x longer with two).
    environment = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    if subprocess.run(command, env=environment).returncode != 0:
        shutil.rmtree(staging, ignore_errors=True)
        raise RuntimeError(f"building the toy task assets for {cfg.dir} failed; see the error above")


def _replace_directory(staging: Path, directory: Path) -> None:
    """Put `staging` at `directory`: the old cache is moved aside first, since a rename cannot overwrite a
    non-empty directory."""
    if directory.exists():
        retired = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old-", dir=directory.parent))
        directory.rename(retired / directory.name)
        staging.rename(directory)
        shutil.rmtree(retired)
    else:
        staging.rename(directory)

