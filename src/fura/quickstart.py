"""`fura quickstart`: a small controlled experiment — FuRA vs LoRA vs full fine-tuning on a CPU, nothing downloaded.

What it does, and why each step is there:

1. **A synthetic world.** Made-up people (one-word names), each with a favourite colour, split into
   fine-tuning, validation and test people (disjoint), and a word-level tokenizer for the world.
2. **Pre-training.** A small Llama-architecture model learns the world from plain text: facts ("bako
   likes red"), true/false statements and option lists about *every* person, and colour questions
   in the Alpaca instruction template. The weights then hold knowledge (who likes what), the skills
   to use it (judge a statement, pick an option) and real spectral structure for FuRA's SVD. It never
   sees the two fine-tuning tasks' instructions. Cached; a second run reuses it.
3. **Fine-tuning data** in the ``commonsense_170k`` record format: a BoolQ-style true/false task and a
   WinoGrande-style option1/option2 task, worded like LLM-Adapters' instructions, about the few
   fine-tuning people only, at each label-noise level (that share of answers flipped).
4. **Fair tuning.** For each method and noise level, the learning rate is picked from a grid by
   accuracy on the validation people (clean answers: the usual noisy-label protocol), on seed 0;
   the other seeds then train at the chosen rate. Each run goes through the real recipe pieces:
   the commonsense data loader with prompt masking, `fura.recipes.sft`'s training arguments and
   model builder, transformers' `Trainer`, `fura.methods.save`, and the commonsense answer parser.
5. **Evaluation on held-out people.** Accuracy above chance on the test people is only possible by
   connecting the new instruction format to what pre-training stored; "recall" measures how much
   of the pre-trained knowledge survives fine-tuning. Mean ± std over seeds, an ordering stated from
   the numbers (with a note when it is within the spread), ``results.json`` and ``comparison.png``.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import logging
import random
import shutil
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fura.errors import UserError
from fura.evaluation.commonsense import ANSWER_PATTERNS

logger = logging.getLogger(__name__)

COLORS = ("red", "blue", "green", "yellow", "black", "white", "purple", "orange")
PETS = ("cat", "dog")
HOMES = ("city", "village")
SYLLABLES = ("ba", "ko", "ti", "lu", "me", "ra", "so", "vi", "da", "ne", "pu", "gi", "ze", "mo", "fa", "ri")
SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")
CORPUS_VERSION = 7  # bump when the pre-training corpus or model recipe changes: it invalidates cached models
# The demo's two tasks are answered like BoolQ and WinoGrande, so they take those tasks' answer patterns.
TASK_PATTERNS = {"true_false": ANSWER_PATTERNS["boolq"], "fill_blank": ANSWER_PATTERNS["winogrande"]}
METHODS = ("fura", "lora", "full")
FLIPPED = {"true": "false", "false": "true", "option1": "option2", "option2": "option1"}


@dataclass
class QuickstartSettings:
    """Sizes of the experiment; ``fast`` shrinks them for CI (fewer people, so noisier numbers)."""

    world_seed: int = 0
    seeds: tuple[int, ...] = (0, 1, 2)
    label_noise: tuple[float, ...] = (0.0, 0.3)
    finetune_people: int = 64
    val_people: int = 32
    test_people: int = 64
    hidden_size: int = 64
    layers: int = 2
    heads: int = 4
    intermediate_size: int = 176
    pretrain_steps: int = 1000
    pretrain_batch: int = 32
    pretrain_block: int = 64
    pretrain_lr: float = 2e-3
    finetune_epochs: int = 8
    finetune_batch: int = 8
    # Per-method grids around each method's usual range (adapters take larger rates than full fine-tuning), four
    # rates each: with three, the noisy-label cells picked the grid's lowest rate for every method.
    lr_grid: dict[str, tuple[float, ...]] = field(
        default_factory=lambda: {
            "fura": (1e-3, 3e-3, 1e-2, 3e-2),
            "lora": (1e-3, 3e-3, 1e-2, 3e-2),
            "full": (1e-4, 3e-4, 1e-3, 3e-3),
        }
    )
    # LoRA r=8 on q,k,v,up,down at width 64 trains about as many parameters as FuRA (the paper compares r=64 on 8B).
    method_args: dict[str, dict[str, Any]] = field(
        default_factory=lambda: {"fura": {}, "lora": {"r": 8, "lora_alpha": 16}, "full": {}}
    )

    @classmethod
    def fast(cls) -> QuickstartSettings:
        return cls(test_people=32)  # shorter pre-training or fewer fine-tuning people made runs collapse

    @property
    def people(self) -> int:
        return self.finetune_people + self.val_people + self.test_people

    def model_key(self) -> str:
        """Hash of everything the pre-trained model depends on (the cache key)."""
        keys = ("world_seed", "finetune_people", "val_people", "test_people", "hidden_size", "layers", "heads")
        parts: dict[str, Any] = {k: v for k, v in asdict(self).items() if k in keys or k.startswith("pretrain_")}
        parts.update(intermediate_size=self.intermediate_size, corpus_version=CORPUS_VERSION)
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:12]


# ---------------------------------------------------------------- the synthetic world


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
    from fura.data.commonsense import generate_prompt

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


# ---------------------------------------------------------------- tokenizer and pre-training


def build_tokenizer(texts: list[str], path: Path):
    """A lower-casing word-level tokenizer over every word of ``texts``, saved to ``path`` and reloaded from it."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    normalizer = normalizers.Lowercase()
    pre = pre_tokenizers.Whitespace()
    words = sorted({w for t in texts for w, _ in pre.pre_tokenize_str(normalizer.normalize_str(t))})
    vocab = {tok: i for i, tok in enumerate([*SPECIALS, *words])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.normalizer = normalizer
    core.pre_tokenizer = pre
    core.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    tokenizer.save_pretrained(path)
    return AutoTokenizer.from_pretrained(path)


def _progress_callback(advance: Callable[[], None]):
    """A `TrainerCallback` that calls ``advance`` after every optimizer step (drives the phase's progress bar)."""
    from transformers import TrainerCallback

    class Advance(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            advance()

    return Advance()


def _quiet_trainer(trainer) -> None:
    """No tqdm bar and no per-step log dicts on stdout: the quickstart draws one progress bar per phase."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)


def pretrain(settings: QuickstartSettings, world: World, all_texts: list[str], path: Path, advance) -> None:
    """Build the small Llama model and pre-train it on the world corpus with `Trainer`; save model + tokenizer."""
    import torch
    from datasets import Dataset
    from transformers import (
        DataCollatorForLanguageModeling,
        LlamaConfig,
        LlamaForCausalLM,
        Trainer,
        TrainingArguments,
        set_seed,
    )

    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    n_docs = settings.pretrain_steps * settings.pretrain_batch * settings.pretrain_block // 12  # ~12 tokens a doc
    docs = pretraining_corpus(world, n_docs, settings.world_seed)
    tokenizer = build_tokenizer(all_texts + docs, tmp)
    set_seed(settings.world_seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=settings.hidden_size,
        intermediate_size=settings.intermediate_size,
        num_hidden_layers=settings.layers,
        num_attention_heads=settings.heads,
        num_key_value_heads=settings.heads,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)

    def pack(batch: dict[str, list]) -> dict[str, list]:
        """Concatenate documents (each ending in EOS) and cut blocks of ``pretrain_block`` tokens: no padding."""
        ids = [t for text in batch["text"] for t in tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]]
        size = settings.pretrain_block
        return {"input_ids": [ids[i : i + size] for i in range(0, len(ids) - size + 1, size)]}

    dataset = Dataset.from_dict({"text": docs}).map(pack, batched=True, remove_columns=["text"])
    args = TrainingArguments(
        output_dir=str(tmp / "trainer"),
        max_steps=settings.pretrain_steps,
        per_device_train_batch_size=settings.pretrain_batch,
        learning_rate=settings.pretrain_lr,
        lr_scheduler_type="cosine",
        warmup_steps=0.05,
        weight_decay=0.0,
        adam_beta2=0.95,
        logging_steps=50,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=settings.world_seed,
        use_cpu=not torch.cuda.is_available(),
    )
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=collator,
        callbacks=[_progress_callback(advance)],
    )
    _quiet_trainer(trainer)
    trainer.train()
    model.save_pretrained(tmp)
    shutil.rmtree(tmp / "trainer", ignore_errors=True)
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)


# ---------------------------------------------------------------- fine-tuning and evaluation


@dataclass
class Run:
    """One fine-tuning run: its method, noise level, seed and learning rate, the model, and its scores."""

    method: str
    noise: float
    seed: int
    learning_rate: float
    model: Any = field(repr=False)
    recipe: dict[str, Any] = field(repr=False)
    log_history: list[dict[str, Any]] = field(repr=False)
    trainable: int = 0
    total: int = 0
    seconds: float = 0.0
    val_average: float | None = None
    val_loss: float | None = None
    scores: dict[str, Any] | None = None


def finetune(
    base_dir: Path,
    data_file: Path,
    method: str,
    lr: float,
    noise: float,
    seed: int,
    settings: QuickstartSettings,
    val_file: Path | None = None,
) -> Run:
    """Train one method with `Trainer` on the recipe's own pieces (arguments, model builder, data loader, collator).

    With ``val_file``, the run's loss on those records (answer tokens only, as in training) is kept too.
    `fura.recipes.sft.run` itself is not called: it reloads, plots, saves and logs every run, and the
    experiment makes dozens of runs and keeps only the ones it reports (see `save_run`).
    """
    import torch
    from transformers import DataCollatorForSeq2Seq, Trainer, set_seed

    from fura import methods
    from fura.data.commonsense import build_datasets
    from fura.recipes import sft

    recipe = {
        "track": "commonsense",
        "model": str(base_dir),
        "method": method,
        "method_args": settings.method_args[method],
        "data": str(data_file),
        "output_dir": str(data_file.parent / "trainer"),
        "data_args": {"max_length": 128, "val_size": 0},
        "training": {
            "learning_rate": lr,
            "num_train_epochs": settings.finetune_epochs,
            "per_device_train_batch_size": settings.finetune_batch,
            "gradient_accumulation_steps": 1,
            "logging_steps": 2,
            "save_strategy": "no",
            "report_to": "none",
            "disable_tqdm": True,
            "seed": seed,
            "use_cpu": not torch.cuda.is_available(),
        },
    }
    start = time.perf_counter()
    set_seed(seed)  # LoRA's initialization happens in build_model, before Trainer seeds anything
    args = sft.training_arguments(recipe)
    tokenizer, model = sft.build_model(recipe)
    train_ds, _ = build_datasets(recipe["data"], tokenizer, max_length=128, val_size=0, seed=seed)
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, pad_to_multiple_of=8, label_pad_token_id=-100)
    trainer = Trainer(model=model, args=args, train_dataset=train_ds, data_collator=collator)
    _quiet_trainer(trainer)
    trainer.train()
    val_loss = None
    if val_file is not None:
        val_ds, _ = build_datasets(str(val_file), tokenizer, max_length=128, val_size=0, seed=seed)
        val_loss = trainer.evaluate(val_ds)["eval_loss"]
    shutil.rmtree(recipe["output_dir"], ignore_errors=True)  # save_strategy "no": nothing of value in there
    trainable, total = methods.trainable_parameters(model)
    model.eval()
    return Run(
        method,
        noise,
        seed,
        lr,
        model,
        recipe,
        trainer.state.log_history,
        trainable,
        total,
        time.perf_counter() - start,
        val_loss=val_loss,
    )


def greedy_generator(model, tokenizer, max_new_tokens: int = 6) -> Callable[[list[str], str], list[str]]:
    """A ``generate(prompts, desc)`` backend for `evaluate_tasks`: one left-padded greedy batch, no progress bar."""
    import torch

    def generate(prompts: list[str], desc: str) -> list[str]:
        tokenizer.padding_side = "left"
        batch = tokenizer(prompts, return_tensors="pt", padding=True).to(next(model.parameters()).device)
        with torch.no_grad():
            out = model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=1,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
        return tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)

    return generate


def recall_accuracy(model, tokenizer, colors: dict[str, str]) -> float:
    """Share of people whose colour is still the likeliest of the colours after "the favourite colour of <name> is".

    Colours are never asked about in fine-tuning, so this measures collateral loss of pre-trained
    knowledge. It ranks the colours (as multiple-choice benchmarks rank options) rather than taking
    the free next token, so a model that now prefers to say "true" everywhere is not counted as
    having forgotten who likes what.
    """
    import torch

    prompts = [f"the favourite colour of {name} is" for name in colors]
    tokenizer.padding_side = "left"
    batch = tokenizer(prompts, return_tensors="pt", padding=True).to(next(model.parameters()).device)
    color_ids = tokenizer.convert_tokens_to_ids(list(COLORS))
    with torch.no_grad():
        logits = model(**batch).logits[:, -1, color_ids]
    predicted = [COLORS[i] for i in logits.argmax(-1).tolist()]
    return sum(p == colors[n] for p, n in zip(predicted, colors)) / len(colors)


def evaluate(model, tokenizer, tasks: dict[str, list[dict[str, str]]], colors: dict[str, str] | None = None):
    """Accuracy per task with the commonsense answer parser, their average, predictions, and recall (if ``colors``)."""
    from fura.evaluation.commonsense import evaluate_tasks, summarize

    results = evaluate_tasks(model, tokenizer, tasks, TASK_PATTERNS, generate=greedy_generator(model, tokenizer))
    summary = summarize(results)
    scores: dict[str, Any] = {
        "accuracy": {t: v["accuracy"] for t, v in summary["tasks"].items()},
        "average": summary["average"],
        "predictions": {t: [p["predicted"] for p in r.predictions] for t, r in results.items()},
    }
    if colors is not None:
        scores["recall"] = recall_accuracy(model, tokenizer, colors)
    return scores


def save_run(run: Run, tokenizer, directory: Path) -> None:
    """The run's adapter (or full model), tokenizer, run.json and loss.png: what `fura inspect` and `fura eval` read."""
    from fura import methods
    from fura.reporting import loss_series, plot_curves, write_run_json

    shutil.rmtree(directory, ignore_errors=True)
    methods.save(run.model, directory)
    tokenizer.save_pretrained(directory)
    series = loss_series(run.log_history)
    plot = plot_curves(
        {"train": series.get("loss", ([], []))},
        directory / "loss.png",
        title=f"{run.method}, label noise {run.noise:.0%}, lr {run.learning_rate:g}",
    )
    write_run_json(
        directory / "run.json",
        {
            "recipe": run.recipe,
            "method": run.method,
            "model": run.recipe["model"],
            "label_noise": run.noise,
            "seed": run.seed,
            "learning_rate": run.learning_rate,
            "trainable_parameters": run.trainable,
            "total_parameters": run.total,
            "trainable_percent": 100 * run.trainable / run.total,
            "global_steps": max((e.get("step", 0) for e in run.log_history), default=0),
            "wall_seconds": run.seconds,
            "metrics": {k: v for k, v in (run.scores or {}).items() if k != "predictions"},
            "validation_average": run.val_average,
            "validation_loss": run.val_loss,
            "loss_plot": str(plot) if plot else None,
            "log_history": run.log_history,
        },
    )


def _noise_dir(noise: float) -> str:
    return f"noise-{round(100 * noise)}"


@contextmanager
def _quiet_libraries() -> Iterator[None]:
    """Silence per-run chatter (datasets' map bars, the recipe's INFO lines) while the experiment runs."""
    import datasets
    import transformers

    bars = datasets.utils.logging.is_progress_bar_enabled(), transformers.utils.logging.is_progress_bar_enabled()
    datasets.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    loggers = [logging.getLogger(n) for n in ("fura.recipes.sft", "fura.data.commonsense", "fura.evaluation")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
        if bars[0]:
            datasets.utils.logging.enable_progress_bar()
        if bars[1]:
            transformers.utils.logging.enable_progress_bar()


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def run_experiment(output_dir: Path, settings: QuickstartSettings, methods: list[str], progress=None) -> dict[str, Any]:
    """The whole experiment; returns what results.json holds."""
    from rich.progress import Progress
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fura.data.commonsense import generate_prompt
    from fura.reporting import cache_dir

    progress = progress or Progress(disable=True)
    world = make_world(settings)
    tests = heldout_records(world, settings)
    data_dir = output_dir / "data"
    shutil.rmtree(data_dir, ignore_errors=True)
    for task, records in tests.items():
        (data_dir / "dataset" / task).mkdir(parents=True, exist_ok=True)
        (data_dir / "dataset" / task / "test.json").write_text(json.dumps(records, indent=1))
    data: dict[tuple[float, int], tuple[Path, Path]] = {}  # (training file, validation file)
    for noise in settings.label_noise:
        for seed in settings.seeds:
            train, val = experiment_data(world, settings, noise, seed)
            folder = data_dir / _noise_dir(noise) / f"seed-{seed}"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "commonsense_train.json").write_text(json.dumps(train, indent=1))
            (folder / "validation.json").write_text(json.dumps(val, indent=1))
            data[noise, seed] = folder / "commonsense_train.json", folder / "validation.json"

    base_dir = cache_dir() / "quickstart" / f"base-{settings.model_key()}"
    if (base_dir / "config.json").is_file():
        logger.info("reusing the pre-trained model cached in %s", base_dir)
    else:
        task = progress.add_task("pre-training (cached afterwards)", total=settings.pretrain_steps)
        start = time.perf_counter()
        all_texts = [generate_prompt(r["instruction"]) + r["output"] for rs in tests.values() for r in rs]
        all_texts += [
            generate_prompt(r["instruction"]) + r["output"]
            for path, _ in data.values()
            for r in json.loads(path.read_text())
        ]
        pretrain(settings, world, all_texts, base_dir, lambda: progress.advance(task))
        logger.info("pre-trained in %.0f s; cached in %s", time.perf_counter() - start, base_dir)

    from fura.evaluation.commonsense import load_task

    tests = {task: load_task(data_dir / "dataset", task) for task in TASK_PATTERNS}  # the real loading path
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    base_scores = evaluate(base, tokenizer, tests, world.colors)
    first, others = settings.seeds[0], settings.seeds[1:]
    cells = [(noise, method) for noise in settings.label_noise for method in methods]
    grid_runs = sum(len(settings.lr_grid[m]) for _, m in cells)
    task = progress.add_task(f"learning-rate search on seed {first}", total=grid_runs)
    chosen: dict[tuple[float, str], Run] = {}
    lr_search: dict[tuple[float, str], dict[str, float]] = {}
    for noise, method in cells:
        train_file, val_file = data[noise, first]
        val = by_task(json.loads(val_file.read_text()))
        for lr in settings.lr_grid[method]:
            run = finetune(base_dir, train_file, method, lr, noise, first, settings, val_file)
            run.val_average = evaluate(run.model, tokenizer, val)["average"]
            lr_search.setdefault((noise, method), {})[f"{lr:g}"] = {
                "validation_accuracy": run.val_average,
                "validation_loss": run.val_loss,
            }
            best = chosen.get((noise, method))
            # Ties keep the smaller rate. (Breaking them by validation loss was tried: on noisy labels the
            # loss favours models that hedge, and it picked a rate at which FuRA answered constantly.)
            if best is None or run.val_average > best.val_average:
                chosen[noise, method] = run
            progress.advance(task)
    runs: dict[tuple[float, str], list[Run]] = {}
    for (noise, method), run in chosen.items():
        run.scores = evaluate(run.model, tokenizer, tests, world.colors)
        save_run(run, tokenizer, output_dir / _noise_dir(noise) / method)
        run.model = None
        runs[noise, method] = [run]
    task = progress.add_task(f"seeds {', '.join(map(str, others))} at the chosen rates", total=len(cells) * len(others))
    for noise, method in cells:
        for seed in others:
            run = finetune(
                base_dir, data[noise, seed][0], method, chosen[noise, method].learning_rate, noise, seed, settings
            )
            run.scores = evaluate(run.model, tokenizer, tests, world.colors)
            run.model = None
            runs[noise, method].append(run)
            progress.advance(task)
    return summarize_runs(settings, base_scores, runs, lr_search, base_dir)


def summarize_runs(settings, base_scores, runs, lr_search, base_dir) -> dict[str, Any]:
    """Means and spreads over seeds per (noise, method), in the shape of results.json."""
    results = []
    for (noise, method), cell in runs.items():
        scores = [r.scores for r in cell]
        average, average_std = _mean_std([s["average"] for s in scores])
        recall, recall_std = _mean_std([s["recall"] for s in scores])
        results.append(
            {
                "method": method,
                "label_noise": noise,
                "learning_rate": cell[0].learning_rate,
                "lr_search": lr_search[noise, method],
                "seeds": [r.seed for r in cell],
                "accuracy": {t: statistics.fmean(s["accuracy"][t] for s in scores) for t in TASK_PATTERNS},
                "accuracy_std": {t: _mean_std([s["accuracy"][t] for s in scores])[1] for t in TASK_PATTERNS},
                "average": average,
                "average_std": average_std,
                "recall": recall,
                "recall_std": recall_std,
                "trainable": cell[0].trainable,
                "total": cell[0].total,
                "seconds": statistics.fmean(r.seconds for r in cell),
                "output_dir": f"{_noise_dir(noise)}/{method}",
                "per_seed": [{"seed": r.seed, **r.scores} for r in cell],
            }
        )
    base = {k: v for k, v in base_scores.items()}
    return {
        "settings": asdict(settings),
        "base_model": str(base_dir),
        "base": base,
        "results": results,
        "orderings": {
            f"{noise:g}": ordering([r for r in results if r["label_noise"] == noise]) for noise in settings.label_noise
        },
    }


def ordering(rows: list[dict[str, Any]]) -> str:
    """ "a (x ± s) > b (...)" from the numbers, with a note for neighbours closer than the larger std."""
    rows = sorted(rows, key=lambda r: -r["average"])
    text = f"{rows[0]['method']} {100 * rows[0]['average']:.1f} ± {100 * rows[0]['average_std']:.1f}"
    for a, b in itertools.pairwise(rows):
        relation = ">" if round(100 * a["average"], 1) > round(100 * b["average"], 1) else "="
        text += f" {relation} {b['method']} {100 * b['average']:.1f} ± {100 * b['average_std']:.1f}"
    close = [
        f"{a['method']} vs {b['method']}"
        for a, b in itertools.pairwise(rows)
        if a["average"] - b["average"] <= max(a["average_std"], b["average_std"])
    ]
    if close:
        text += f" ({', '.join(close)}: within one std, not distinguishable with {len(rows[0]['seeds'])} seeds)"
    fura = [r for r in rows if r["method"] == "fura"]
    if fura and len(rows) > 1:  # tie-aware: 1 + the number of methods strictly ahead
        ahead = sum(round(100 * r["average"], 1) > round(100 * fura[0]["average"], 1) for r in rows)
        text += f"; FuRA ranks {ahead + 1} of {len(rows)}"
    return text


# ---------------------------------------------------------------- output


def comparison_table(summary: dict[str, Any]):
    """The rich table printed at the end: mean ± std over seeds, in percent."""
    from rich.table import Table

    seeds = len(summary["settings"]["seeds"])
    table = Table(title=f"fura quickstart: accuracy (%) on held-out people, mean ± std over {seeds} seeds")
    table.add_column("noise", justify="right")
    table.add_column("method")
    table.add_column("lr", justify="right")
    for task in TASK_PATTERNS:
        table.add_column(task.replace("_", "-"), justify="right")
    table.add_column("avg", justify="right", style="bold")
    table.add_column("recall", justify="right")
    table.add_column("trainable", justify="right")
    base = summary["base"]
    table.add_row(
        "-",
        "base",
        "-",
        *[f"{100 * base['accuracy'][t]:.1f}" for t in TASK_PATTERNS],
        f"{100 * base['average']:.1f}",
        f"{100 * base['recall']:.1f}",
        "0",
    )
    previous = None
    for r in summary["results"]:
        table.add_row(
            f"{r['label_noise']:.0%}" if r["label_noise"] != previous else "",
            r["method"],
            f"{r['learning_rate']:g}",
            *[f"{100 * r['accuracy'][t]:.1f} ± {100 * r['accuracy_std'][t]:.1f}" for t in TASK_PATTERNS],
            f"{100 * r['average']:.1f} ± {100 * r['average_std']:.1f}",
            f"{100 * r['recall']:.1f} ± {100 * r['recall_std']:.1f}",
            f"{100 * r['trainable'] / r['total']:.0f}%",
            end_section=False,
        )
        previous = r["label_noise"]
    return table


def plot_comparison(summary: dict[str, Any], path: Path) -> Path | None:
    """Grouped bars per noise level with std error bars: held-out accuracy and recall; base as a dashed line."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no plot written (pip install matplotlib)")
        return None
    noises = summary["settings"]["label_noise"]
    methods = list(dict.fromkeys(r["method"] for r in summary["results"]))
    cell = {(r["label_noise"], r["method"]): r for r in summary["results"]}
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8), sharey=True)
    width = 0.8 / len(methods)
    for ax, key, title in ((axes[0], "average", "held-out accuracy"), (axes[1], "recall", "recall (pre-trained)")):
        for i, method in enumerate(methods):
            xs = [n + (i - (len(methods) - 1) / 2) * width for n in range(len(noises))]
            ys = [100 * cell[noise, method][key] for noise in noises]
            err = [100 * cell[noise, method][f"{key}_std"] for noise in noises]
            ax.bar(xs, ys, width=width, yerr=err, capsize=3, label=method)
        ax.axhline(100 * summary["base"][key], color="gray", linestyle="--", label="base")
        ax.set_xticks(range(len(noises)), [f"label noise {n:.0%}" for n in noises])
        ax.set_title(title)
        ax.set_ylim(0, 100)
    axes[0].set_ylabel("% (mean ± std over seeds)")
    axes[1].legend(loc="lower right")
    fig.suptitle("fura quickstart")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def spectral_summaries(summary: dict[str, Any], output_dir: Path, console) -> dict[str, dict[str, Any]]:
    """`fura inspect` on each method's saved seed-0 run, per noise level: update rank, share of the update
    outside the pretrained block column spaces, singular-value drift. Printed as one table per noise level."""
    from fura.inspect import inspect_update, summary_table

    spectral: dict[str, dict[str, Any]] = {}
    for noise in summary["settings"]["label_noise"]:
        rows = [r for r in summary["results"] if r["label_noise"] == noise]
        reports = {r["method"]: inspect_update(output_dir / r["output_dir"], progress=False) for r in rows}
        console.print(summary_table(reports, title=f"fura inspect, label noise {noise:.0%} (seed-0 runs)"))
        spectral[f"{noise:g}"] = {method: report.summary for method, report in reports.items()}
    return spectral


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output-dir", default="runs/quickstart", help="where data, adapters and results go")
    parser.add_argument("--methods", default="fura,lora,full", help="comma-separated subset of fura,lora,full")
    parser.add_argument("--fast", action="store_true", help="fewer test people (the CI run)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the world and the pre-training")
    parser.add_argument("--seeds", type=int, default=3, help="fine-tuning seeds per method and noise level")
    parser.add_argument("--fresh", action="store_true", help="pre-train again instead of reusing the cached model")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (default 1: the model is too small to gain from more)"
    )


def run(args: argparse.Namespace) -> int:
    from fura import outputs

    with outputs.writing(args.output_dir):  # writable before anything runs; a full disk is one line
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    import torch
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from fura.reporting import cache_dir

    console = Console()
    settings = QuickstartSettings.fast() if args.fast else QuickstartSettings()
    settings.world_seed = args.seed
    if args.seeds < 2:
        raise UserError(f"--seeds {args.seeds}: need at least 2 seeds for a spread")
    settings.seeds = tuple(range(args.seeds))
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise UserError(f"--methods {args.methods!r}: unknown method(s) {unknown}; choose from {list(METHODS)}")
    if args.fresh:
        shutil.rmtree(cache_dir() / "quickstart" / f"base-{settings.model_key()}", ignore_errors=True)
    output_dir = Path(args.output_dir)
    start = time.perf_counter()
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        with _quiet_libraries(), Progress(*columns, console=console) as progress:
            summary = run_experiment(output_dir, settings, methods, progress)
    finally:
        torch.set_num_threads(threads)
    summary["wall_seconds"] = time.perf_counter() - start
    console.print(comparison_table(summary))
    for noise, text in summary["orderings"].items():
        console.print(f"label noise {float(noise):.0%}: {text}")
    console.print(
        f"learning rates picked per method and noise level on validation people (seed {settings.seeds[0]}); "
        "the other seeds reuse them"
    )
    summary["spectral"] = spectral_summaries(summary, output_dir, console)
    plot = plot_comparison(summary, output_dir / "comparison.png")
    (output_dir / "results.json").write_text(json.dumps(summary, indent=1))
    console.print(
        f"total {summary['wall_seconds']:.0f} s; results in {output_dir / 'results.json'}"
        + (f", plot {plot}" if plot else "")
    )
    return 0
