"""`fura quickstart`: the commonsense pipeline end to end on a CPU in minutes, with nothing downloaded.

What it does, and why each step is there:

1. Builds a synthetic "world": made-up people, each with a favourite colour, and a word-level
   tokenizer for it.
2. Pre-trains a small Llama-architecture model on a corpus about that world (facts, and yes/no and
   which-of-two questions in plain text), so the weights hold real knowledge and real spectral
   structure — FuRA's SVD then has something to precondition with. Cached; a second run reuses it.
3. Writes fine-tuning data in the ``commonsense_170k`` record format: two tasks in the instruction
   formats of BoolQ (true/false) and WinoGrande (option1/option2), about only a few people, with some
   labels flipped (few, noisy examples), and ``dataset/<task>/test.json`` files about everyone else.
4. Fine-tunes FuRA, LoRA and full fine-tuning with the real recipe (:mod:`fura.recipes.sft`), then
   evaluates each with the real protocol and answer parser (:mod:`fura.evaluation.commonsense`).
   Held-out accuracy only rises above chance if the method reuses the pre-trained knowledge rather
   than memorizing the fine-tuning examples; "recall" checks how much pre-trained knowledge survives.
5. Prints a comparison table and writes ``comparison.png`` and ``results.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fura.errors import UserError
from fura.evaluation.commonsense import ANSWER_PATTERNS

logger = logging.getLogger(__name__)

COLORS = ("red", "blue", "green", "yellow", "black", "white", "purple", "orange")
SYLLABLES = ("ba", "ko", "ti", "lu", "me", "ra", "so", "vi", "da", "ne", "pu", "gi", "ze", "mo", "fa", "ri")
SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")
CORPUS_VERSION = 6  # bump when the pre-training corpus or model recipe changes: it invalidates cached models
# The demo's two tasks are answered like BoolQ and WinoGrande, so they take those tasks' answer patterns.
TASK_PATTERNS = {"true_false": ANSWER_PATTERNS["boolq"], "fill_blank": ANSWER_PATTERNS["winogrande"]}


@dataclass
class QuickstartSettings:
    """Sizes of the demo; ``fast`` shrinks them for CI smoke runs (the comparison is then noisier)."""

    seed: int = 0
    people: int = 48
    finetune_people: int = 12
    label_noise: float = 0.15
    hidden_size: int = 128
    layers: int = 4
    heads: int = 4
    intermediate_size: int = 384
    pretrain_steps: int = 1000
    pretrain_batch: int = 16
    pretrain_block: int = 64
    pretrain_lr: float = 1e-3
    finetune_epochs: int = 6
    finetune_batch: int = 8
    test_people: int = 36
    methods: dict[str, dict[str, Any]] = field(
        default_factory=lambda: {
            # Same order of trainable parameters as the paper's comparison (LoRA r=64 vs FuRA on 8B).
            "fura": {"learning_rate": 3e-3, "method_args": {}},
            "lora": {"learning_rate": 3e-3, "method_args": {"r": 16, "lora_alpha": 32}},
            "full": {"learning_rate": 3e-4, "method_args": {}},
        }
    )

    @classmethod
    def fast(cls) -> QuickstartSettings:
        return cls(people=32, finetune_people=10, test_people=22, pretrain_steps=400, finetune_epochs=4)

    def model_key(self) -> str:
        """Hash of everything the pre-trained model depends on (the cache key)."""
        parts = {
            k: v
            for k, v in asdict(self).items()
            if k
            not in ("finetune_epochs", "finetune_batch", "methods", "label_noise", "finetune_people", "test_people")
        }
        parts["corpus_version"] = CORPUS_VERSION
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:12]


# ---------------------------------------------------------------- the synthetic world


def make_people(settings: QuickstartSettings) -> dict[str, str]:
    """Person name (one made-up word) -> favourite colour, deterministic in the seed.

    Pre-training stores these facts in the weights; the fine-tuning examples are about only a few
    people, so held-out people are answered right only through what pre-training put there.
    """
    rng = random.Random(settings.seed)
    names: list[str] = []
    while len(names) < settings.people:
        name = "".join(rng.sample(SYLLABLES, 2))
        if name not in names:
            names.append(name)
    return {name: rng.choice(COLORS) for name in names}


def _other_color(rng: random.Random, color: str) -> str:
    return rng.choice([c for c in COLORS if c != color])


def pretraining_corpus(people: dict[str, str], n_docs: int, seed: int) -> list[str]:
    """Documents about the world: facts, questions in plain text and in the instruction template, true/false
    statements and option lists: the knowledge and the skills a real pre-trained model brings, worded
    differently from the fine-tuning tasks."""
    from fura.data.commonsense import generate_prompt

    rng = random.Random(seed + 1)
    names = list(people)
    docs = []
    for _ in range(n_docs):
        name = rng.choice(names)
        color = people[name]
        other = _other_color(rng, color)
        pair = [color, other]
        rng.shuffle(pair)
        kind = rng.choice((0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7))  # mostly plain facts: they are what must be memorized
        if kind == 0:
            docs.append(rng.choice((f"{name} likes {color} .", f"the favourite colour of {name} is {color} .")))
        elif kind == 1:
            asked, yes = (color, "yes") if rng.random() < 0.5 else (other, "no")
            docs.append(f"question : does {name} like {asked} ? answer : {yes} .")
        elif kind == 2:
            docs.append(f"question : which colour does {name} like , {pair[0]} or {pair[1]} ? answer : {color} .")
        elif kind == 3:
            asked, truth = (color, "true") if rng.random() < 0.5 else (other, "false")
            docs.append(f"the statement {name} likes {asked} is {truth} .")
        elif kind == 4:
            docs.append(
                f"{name} likes _ . option1 is {pair[0]} , option2 is {pair[1]} . "
                f"the answer is option{pair.index(color) + 1} ."
            )
        elif kind == 5:
            docs.append(generate_prompt(f"What colour does {name} like?") + f"the correct answer is {color}")
        elif kind == 6:
            asked, truth = (color, "true") if rng.random() < 0.5 else (other, "false")
            docs.append(generate_prompt(f"Is it true that {name} likes {asked}?") + f"the correct answer is {truth}")
        else:
            docs.append(
                generate_prompt(f"Which colour does {name} like? Option1: {pair[0]} Option2: {pair[1]}")
                + f"the correct answer is option{pair.index(color) + 1}"
            )
    return docs


def task_record(task: str, name: str, color: str, rng: random.Random, truth: bool | None = None) -> dict[str, str]:
    """One record in the commonsense_170k format, with the LLM-Adapters instruction wording of the task type."""
    if task == "true_false":
        truth = rng.random() < 0.5 if truth is None else truth
        asked = color if truth else _other_color(rng, color)
        answer = "true" if truth else "false"
        instruction = (
            f"Please answer the following question with true or false, question: does {name} like {asked}?"
            "\n\nAnswer format: true/false"
        )
    else:
        options = [color, _other_color(rng, color)]
        rng.shuffle(options)
        answer = f"option{options.index(color) + 1}"
        instruction = (
            "Please choose the correct answer to fill in the blank to complete the given sentence: "
            f"{name} likes _\n\nOption1: {options[0]} Option2: {options[1]} Answer format: option1/option2"
        )
    return {"instruction": instruction, "input": "", "output": f"the correct answer is {answer}", "answer": answer}


def finetune_and_test_records(
    people: dict[str, str], settings: QuickstartSettings
) -> tuple[list[dict[str, str]], dict[str, list[dict[str, str]]]]:
    """Few noisy training records about ``finetune_people``; test records about held-out people, per task."""
    rng = random.Random(settings.seed + 2)
    names = list(people)
    rng.shuffle(names)
    train_names = names[: settings.finetune_people]
    test_names = names[settings.finetune_people :][: settings.test_people]
    train = []
    for task in TASK_PATTERNS:
        for name in train_names:
            for truth in (True, False):
                record = task_record(task, name, people[name], rng, truth)
                if rng.random() < settings.label_noise:  # a flipped label: the noisy part of "few, noisy"
                    wrong = {"true": "false", "false": "true", "option1": "option2", "option2": "option1"}
                    record["answer"] = wrong[record["answer"]]
                    record["output"] = f"the correct answer is {record['answer']}"
                train.append(record)
    rng.shuffle(train)
    tests = {
        task: [task_record(task, n, people[n], rng, truth=i % 2 == 0) for i, n in enumerate(test_names)]
        for task in TASK_PATTERNS
    }
    return train, tests


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


def pretrain(settings: QuickstartSettings, people: dict[str, str], all_texts: list[str], path: Path) -> None:
    """Build the small Llama model and pre-train it on the world corpus with `Trainer`; save model + tokenizer."""
    import torch
    from datasets import Dataset
    from transformers import DataCollatorForLanguageModeling, LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    n_docs = settings.pretrain_steps * settings.pretrain_batch * settings.pretrain_block // 14  # ~14 tokens a doc
    docs = pretraining_corpus(people, n_docs, settings.seed)
    tokenizer = build_tokenizer(all_texts + docs, tmp)
    torch.manual_seed(settings.seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=settings.hidden_size,
        intermediate_size=settings.intermediate_size,
        num_hidden_layers=settings.layers,
        num_attention_heads=settings.heads,
        num_key_value_heads=settings.heads,
        max_position_embeddings=512,
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

    dataset = Dataset.from_dict({"text": docs}).map(pack, batched=True, remove_columns=["text"], desc="packing")
    args = TrainingArguments(
        output_dir=str(tmp / "trainer"),
        max_steps=settings.pretrain_steps,
        per_device_train_batch_size=settings.pretrain_batch,
        learning_rate=settings.pretrain_lr,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=0.05,
        weight_decay=0.0,
        adam_beta2=0.95,
        logging_steps=25,
        save_strategy="no",
        report_to="none",
        seed=settings.seed,
        use_cpu=not torch.cuda.is_available(),
    )
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator).train()
    model.save_pretrained(tmp)
    shutil.rmtree(tmp / "trainer", ignore_errors=True)
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)


@dataclass
class MethodResult:
    """One row of the comparison table."""

    method: str
    accuracy: dict[str, float]
    average: float
    recall: float
    trainable: int
    total: int
    seconds: float
    peak_memory_bytes: int


def recall_accuracy(model, tokenizer, people: dict[str, str]) -> float:
    """Share of people whose colour the model still completes after "the favourite colour of <name> is"."""
    import torch

    prompts = [f"the favourite colour of {name} is" for name in people]
    tokenizer.padding_side = "left"
    batch = tokenizer(prompts, return_tensors="pt", padding=True).to(next(model.parameters()).device)
    with torch.no_grad():
        logits = model(**batch).logits[:, -1, :]
    predicted = tokenizer.batch_decode(logits.argmax(-1)[:, None])
    return sum(p.strip() == people[n] for p, n in zip(predicted, people)) / len(people)


def evaluate_model(model, tokenizer, tests, people, settings_gen) -> tuple[dict[str, float], float, float]:
    from fura.evaluation.commonsense import evaluate_tasks, summarize

    model.eval()
    summary = summarize(evaluate_tasks(model, tokenizer, tests, TASK_PATTERNS, settings_gen, batch_size=64))
    accuracy = {t: v["accuracy"] for t, v in summary["tasks"].items()}
    return accuracy, summary["average"], recall_accuracy(model, tokenizer, people)


def run_quickstart(output_dir: Path, settings: QuickstartSettings, methods: list[str]) -> list[MethodResult]:
    """The whole pipeline; returns one result per method plus the pre-trained base (``method="base"``)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fura import methods as method_registry
    from fura.evaluation.commonsense import GenerationSettings
    from fura.recipes import sft
    from fura.reporting import PeakMemory, cache_dir

    people = make_people(settings)
    train, tests = finetune_and_test_records(people, settings)
    data_dir = output_dir / "data"
    (data_dir).mkdir(parents=True, exist_ok=True)
    (data_dir / "commonsense_train.json").write_text(json.dumps(train, indent=1))
    for task, records in tests.items():
        (data_dir / "dataset" / task).mkdir(parents=True, exist_ok=True)
        (data_dir / "dataset" / task / "test.json").write_text(json.dumps(records, indent=1))

    from fura.data.commonsense import generate_prompt
    from fura.evaluation.commonsense import load_task

    base_dir = cache_dir() / "quickstart" / f"base-{settings.model_key()}"
    all_texts = [generate_prompt(r["instruction"]) + r["output"] for r in train] + [
        generate_prompt(r["instruction"]) + r["output"] for rs in tests.values() for r in rs
    ]
    if (base_dir / "config.json").is_file():
        logger.info("reusing the pre-trained model cached in %s", base_dir)
    else:
        logger.info("pre-training a small Llama model on the synthetic corpus (cached in %s)", base_dir)
        start = time.perf_counter()
        pretrain(settings, people, all_texts, base_dir)
        logger.info("pre-training took %.0f s", time.perf_counter() - start)
    tests = {task: load_task(data_dir / "dataset", task) for task in TASK_PATTERNS}  # the real loading path
    generation = GenerationSettings(num_beams=1, max_new_tokens=8)

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    trainable, total = 0, method_registry.trainable_parameters(base)[1]
    accuracy, average, recall = evaluate_model(base, tokenizer, tests, people, generation)
    results = [MethodResult("base", accuracy, average, recall, trainable, total, 0.0, 0)]
    for method in methods:
        spec = settings.methods[method]
        recipe = {
            "track": "commonsense",
            "model": str(base_dir),
            "method": method,
            "method_args": spec["method_args"],
            "data": str(data_dir / "commonsense_train.json"),
            "output_dir": str(output_dir / method),
            "data_args": {"max_length": 256, "val_size": 8},
            "training": {
                "learning_rate": spec["learning_rate"],
                "num_train_epochs": settings.finetune_epochs,
                "per_device_train_batch_size": settings.finetune_batch,
                "gradient_accumulation_steps": 1,
                "logging_steps": 2,
                "save_strategy": "no",
                "report_to": "none",
                "seed": settings.seed,
                "use_cpu": not torch.cuda.is_available(),
            },
        }
        logger.info("fine-tuning %s", method)
        start = time.perf_counter()
        with PeakMemory() as memory:
            summary = sft.run(recipe)
        seconds = time.perf_counter() - start
        model = method_registry.load(AutoModelForCausalLM.from_pretrained(base_dir), output_dir / method)
        accuracy, average, recall = evaluate_model(model, tokenizer, tests, people, generation)
        results.append(
            MethodResult(
                method,
                accuracy,
                average,
                recall,
                summary["trainable_parameters"],
                summary["total_parameters"],
                seconds,
                summary.get("peak_memory_bytes", memory.peak_bytes),
            )
        )
    return results


def comparison_table(results: list[MethodResult]):
    """The rich table printed at the end."""
    from rich.table import Table

    from fura.reporting import human_bytes, human_count

    table = Table(title="fura quickstart: held-out accuracy (%) after few, noisy fine-tuning examples")
    table.add_column("method")
    for task in TASK_PATTERNS:
        table.add_column(task.replace("_", "-"), justify="right")
    table.add_column("avg", justify="right", style="bold")
    table.add_column("recall", justify="right")
    table.add_column("trainable", justify="right")
    table.add_column("time", justify="right")
    table.add_column("peak mem", justify="right")
    for r in results:
        table.add_row(
            r.method,
            *[f"{100 * r.accuracy[t]:.1f}" for t in TASK_PATTERNS],
            f"{100 * r.average:.1f}",
            f"{100 * r.recall:.1f}",
            f"{human_count(r.trainable)} {100 * r.trainable / r.total:.0f}%" if r.trainable else "0",
            f"{r.seconds:.0f} s" if r.seconds else "-",
            human_bytes(r.peak_memory_bytes) if r.peak_memory_bytes else "-",
        )
    return table


def plot_comparison(results: list[MethodResult], path: Path) -> Path | None:
    """Bar chart of held-out accuracy and recall per method."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no plot written (pip install matplotlib)")
        return None
    labels = [r.method for r in results]
    xs = range(len(results))
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    ax.bar([x - 0.2 for x in xs], [100 * r.average for r in results], width=0.4, label="held-out accuracy")
    ax.bar([x + 0.2 for x in xs], [100 * r.recall for r in results], width=0.4, label="recall (pre-trained)")
    ax.set_xticks(list(xs), labels)
    ax.set_ylabel("%")
    ax.set_ylim(0, 100)
    ax.set_title("fura quickstart")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output-dir", default="runs/quickstart", help="where data, adapters and results go")
    parser.add_argument("--methods", default="fura,lora,full", help="comma-separated subset of fura,lora,full")
    parser.add_argument("--fast", action="store_true", help="smaller world and shorter pre-training (CI smoke run)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the world, data and training")
    parser.add_argument("--fresh", action="store_true", help="pre-train again instead of reusing the cached model")


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from fura.reporting import cache_dir

    console = Console()
    settings = QuickstartSettings.fast() if args.fast else QuickstartSettings()
    settings.seed = args.seed
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in settings.methods]
    if unknown:
        raise UserError(f"unknown quickstart method(s) {unknown}; choose from {list(settings.methods)}")
    if args.fresh:
        shutil.rmtree(cache_dir() / "quickstart" / f"base-{settings.model_key()}", ignore_errors=True)
    output_dir = Path(args.output_dir)
    start = time.perf_counter()
    results = run_quickstart(output_dir, settings, methods)
    wall = time.perf_counter() - start
    console.print(comparison_table(results))
    plot = plot_comparison(results, output_dir / "comparison.png")
    (output_dir / "results.json").write_text(
        json.dumps(
            {"settings": asdict(settings), "results": [asdict(r) for r in results], "wall_seconds": wall}, indent=2
        )
    )
    console.print(f"total {wall:.0f} s; results in {output_dir / 'results.json'}" + (f", plot {plot}" if plot else ""))
    return 0
