"""The quickstart's synthetic world: people with a colour, a pet and a home, split into disjoint fine-tuning,
validation and test people, the pre-training corpus about everyone, and the two fine-tuning tasks in the
``commonsense_170k`` record format (with label noise on the fine-tuning answers only)."""

from __future__ import annotations

import random
from dataclasses import dataclass

from fura.data.commonsense import generate_prompt
from fura.experiments.quickstart.settings import TASK_PATTERNS, QuickstartSettings

COLORS = ("red", "blue", "green", "yellow", "black", "white", "purple", "orange")
PETS = ("cat", "dog")
HOMES = ("city", "village")
SYLLABLES = ("ba", "ko", "ti", "lu", "me", "ra", "so", "vi", "da", "ne", "pu", "gi", "ze", "mo", "fa", "ri")
FLIPPED = {"true": "false", "false": "true", "option1": "option2", "option2": "option1"}


@dataclass
class World:
    """Each person's favourite colour, pet and home, and which people each split is about (disjoint splits).

    Within each split, half the people have a cat and half live in the city, so every test set has
    balanced answers: a model that answers one way scores exactly 50 %.
    """

    colors: dict[str, str]
    pets: dict[str, str]
    homes: dict[str, str]
    finetune: list[str]
    val: list[str]
    test: list[str]


def make_world(settings: QuickstartSettings) -> World:
    """People with a colour, a pet and a home, deterministic in ``world_seed``, split into fine-tune/validation/test."""
    rng = random.Random(settings.world_seed)
    names: list[str] = []
    while len(names) < settings.people:
        name = "".join(rng.sample(SYLLABLES, 2))
        if name not in names:
            names.append(name)
    colors = {name: rng.choice(COLORS) for name in names}
    a, b = settings.finetune_people, settings.finetune_people + settings.val_people
    splits = names[:a], names[a:b], names[b:]
    pets: dict[str, str] = {}
    homes: dict[str, str] = {}
    for split in splits:
        for values, attribute in ((PETS, pets), (HOMES, homes)):
            balanced = [values[i % 2] for i in range(len(split))]
            rng.shuffle(balanced)
            attribute.update(zip(split, balanced))
    return World(colors, pets, homes, *splits)


def pretraining_corpus(world: World, n_docs: int, seed: int) -> list[str]:
    """Documents about everyone: facts, plain-text judgements, and questions in the Alpaca instruction template.

    The judgements ("bako has a cat , true .", "bako lives in the _ , option1 city , option2 village ,
    answer option1 .") carry the skills the fine-tuning tasks need, in plain text; the template questions
    make the prompt familiar. The two fine-tuning instructions never occur.
    """
    rng = random.Random(seed + 1)
    names = list(world.colors)
    docs = []
    for _ in range(n_docs):
        name = rng.choice(names)
        color, pet, home = world.colors[name], world.pets[name], world.homes[name]
        kind = rng.randrange(10)
        if kind < 3:  # colour facts: what "recall" measures, never asked about in fine-tuning
            docs.append(rng.choice((f"{name} likes {color} .", f"the favourite colour of {name} is {color} .")))
        elif kind < 5:
            docs.append(rng.choice((f"{name} has a {pet} .", f"the pet of {name} is a {pet} .")))
        elif kind < 7:
            docs.append(rng.choice((f"{name} lives in the {home} .", f"the home of {name} is the {home} .")))
        elif kind == 7:
            docs.append(f"{name} has a {PETS[0]} , {'true' if pet == PETS[0] else 'false'} .")
        elif kind == 8:
            docs.append(
                f"{name} lives in the _ , option1 {HOMES[0]} , option2 {HOMES[1]} , "
                f"answer option{HOMES.index(home) + 1} ."
            )
        else:
            question, answer = rng.choice(
                (
                    (f"What colour does {name} like?", color),
                    (f"What pet does {name} have?", pet),
                    (f"Where does {name} live?", home),
                )
            )
            docs.append(generate_prompt(question) + f"the correct answer is {answer}")
    return docs


def task_record(task: str, world: World, name: str) -> dict[str, str]:
    """One record in the commonsense_170k format, with LLM-Adapters' instruction wording of the task type."""
    if task == "true_false":
        answer = "true" if world.pets[name] == PETS[0] else "false"
        instruction = (
            f"Please answer the following question with true or false, question: does {name} have a {PETS[0]}?"
            "\n\nAnswer format: true/false"
        )
    else:
        answer = f"option{HOMES.index(world.homes[name]) + 1}"
        instruction = (
            "Please choose the correct answer to fill in the blank to complete the given sentence: "
            f"{name} lives in the _\n\nOption1: {HOMES[0]} Option2: {HOMES[1]} Answer format: option1/option2"
        )
    return {"instruction": instruction, "input": "", "output": f"the correct answer is {answer}", "answer": answer}


def task_records(world: World, names: list[str], rng: random.Random, noise: float = 0.0) -> list[dict[str, str]]:
    """One record per person and task, shuffled; ``noise``: that share of answers flipped (exactly, per task)."""
    records = []
    for task in TASK_PATTERNS:
        rows = [task_record(task, world, name) for name in names]
        for i in rng.sample(range(len(rows)), round(noise * len(rows))):
            answer = FLIPPED[rows[i]["answer"]]
            rows[i] = {**rows[i], "answer": answer, "output": f"the correct answer is {answer}"}
        records += rows
    rng.shuffle(records)
    return records


def by_task(records: list[dict[str, str]]) -> dict[str, list[dict[str, str]]]:
    """Split records into the tasks (recognised by their answer format)."""
    return {
        task: [r for r in records if ("true/false" in r["instruction"]) == (task == "true_false")]
        for task in TASK_PATTERNS
    }


def experiment_data(world: World, settings: QuickstartSettings, noise: float, seed: int):
    """(train, validation) records of one noise level and seed, each about its own people.

    The training answers carry the label noise; the validation answers are clean, as in the usual
    noisy-label protocol: with a few dozen noisy validation questions the learning-rate choice itself
    became a coin toss (a rate at which a method answered constantly could win on flipped labels).
    """
    rng = random.Random(f"{settings.world_seed}/{seed}/{noise}")
    return task_records(world, world.finetune, rng, noise), task_records(world, world.val, rng, 0.0)


def heldout_records(world: World, settings: QuickstartSettings) -> dict[str, list[dict[str, str]]]:
    """Clean test questions about the test people, the same for every method, seed and noise level."""
    return by_task(task_records(world, world.test, random.Random(settings.world_seed)))
