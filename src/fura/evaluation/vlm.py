"""`fura eval vlm`: LLaVA-1.5's evaluation protocol on seven benchmarks, for transformers' Llava.

Every benchmark is decoded greedily with the ``vicuna_v1`` prompt (system line, ``USER: <image>\\n{question}
ASSISTANT:``) and a short-answer or letter suffix. Five are scored here; VQAv2 test-dev and VizWiz test
have no public answers, so they get the server's submission file instead:

============  ==================================  ============================================================
benchmark     input (under ``--data-dir/<name>``) score
============  ==================================  ============================================================
gqa           testdev_balanced_questions.json,    exact match of ``response.rstrip('.').lower()``
              images/
pope          coco/coco_pope_{random,popular,     yes/no (``no`` when the first sentence has No/no/not);
              adversarial}.json, val2014/         F1 per split, their mean
sqa           problems.json, pid_splits.json,     option letter, image problems of the test split;
              images/test/<pid>/                  unparseable answers are wrong
textvqa       llava_textvqa_val_v051_ocr.jsonl,   VQA soft accuracy (min(1, #humans/3), leave-one-out over 10)
              TextVQA_0.5.1_val.json,             after the EvalAI answer normalisation
              train_images/
mmbench       mmbench_dev_20230712.tsv            CircularEval: a question counts only if every option shift
                                                  is answered right
vqav2         llava_vqav2_mscoco_test-dev2015     submission ``[{"question_id", "answer"}]`` for EvalAI
              .jsonl, test2015/
vizwiz        test.json, test/                    submission ``[{"image", "answer"}]`` for EvalAI
============  ==================================  ============================================================

Prompts are tokenized as LLaVA does, the text around ``<image>`` chunk by chunk
(`fura.vlm.data.tokenize_around_images`). By default questions are decoded in batches of 8 (left padded)
in the model's dtype; ``--paper`` decodes as LLaVA-1.5's scripts do, in fp16 one question at a time, for
like-for-like numbers (batching and bf16 can flip a greedy answer). See docs/vlm_eval.md for the data
layout and the paper's numbers.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import logging
import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fura.errors import UserError

logger = logging.getLogger(__name__)

SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
SHORT_ANSWER = "Answer the question using a single word or phrase."
LETTER_ANSWER = "Answer with the option's letter from the given choices directly."
UNANSWERABLE = "When the provided information is insufficient, respond with 'Unanswerable'."
POPE_SPLITS = ("random", "popular", "adversarial")
DEFAULT_BATCH_SIZE = 8
PAPER_DTYPES = ("fp16", "float16")  # LLaVA-1.5 loads in fp16 (model/builder.py), batch 1 (eval/model_vqa_loader.py)
LETTERS = "ABCDE"
#: LLaVA-1.5's table order; VQAv2 and VizWiz are scored by their servers.
BENCHMARKS = ("vqav2", "gqa", "vizwiz", "sqa", "textvqa", "pope", "mmbench")
SERVER_SCORED = ("vqav2", "vizwiz")
COLUMN = {
    "vqav2": "VQAv2",
    "gqa": "GQA",
    "vizwiz": "VizWiz",
    "sqa": "SQA-IMG",
    "textvqa": "TextVQA",
    "pope": "POPE",
    "mmbench": "MMBench",
}
#: Directory of each benchmark under --data-dir (LLaVA's playground/data/eval names).
DEFAULT_DIRS = {
    "vqav2": "vqav2",
    "gqa": "gqa",
    "vizwiz": "vizwiz",
    "sqa": "scienceqa",
    "textvqa": "textvqa",
    "pope": "pope",
    "mmbench": "mmbench",
}


class VLMDataError(UserError):
    """A benchmark file is missing or not in its benchmark's format."""


@dataclass
class Sample:
    """One generation: the question text after ``<image>\\n`` (suffix included), its image, what scoring needs."""

    id: Any
    question: str
    image: Path | str  # a file, or base64 bytes (MMBench)
    meta: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------- prompts
def build_prompt(question: str, image_token: str = "<image>") -> str:
    """The ``vicuna_v1`` single-turn prompt with the image first, as LLaVA-1.5 evaluates."""
    return f"{SYSTEM} USER: {image_token}\n{question} ASSISTANT:"


def with_suffix(question: str, *suffixes: str) -> str:
    """``question`` followed by each instruction on its own line, unless the text already ends with them."""
    tail = "\n".join(suffixes)
    question = question.rstrip()
    return question if question.endswith(tail) else f"{question}\n{tail}"


def lettered(options: Sequence[str]) -> str:
    """``A. first\\nB. second …`` as in LLaVA-1.5's multiple-choice prompts."""
    return "\n".join(f"{LETTERS[i]}. {option}" for i, option in enumerate(options))


# ------------------------------------------------------------------------------------------- scoring
def gqa_answer(response: str) -> str:
    """GQA's prediction: the response without trailing periods, lower-cased."""
    return response.strip().rstrip(".").lower()


def pope_answer(response: str) -> str:
    """``"no"`` when the first sentence has the word No, no or not (commas ignored), else ``"yes"``."""
    first = response.split(".")[0].replace(",", "")
    return "no" if {"No", "no", "not"} & set(first.split(" ")) else "yes"


def binary_metrics(predictions: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """Accuracy, precision, recall, F1 (``yes`` is positive) and the share of ``yes`` answers."""
    pairs = list(zip(predictions, labels, strict=True))
    tp = sum(p == "yes" and y == "yes" for p, y in pairs)
    fp = sum(p == "yes" and y == "no" for p, y in pairs)
    fn = sum(p == "no" and y == "yes" for p, y in pairs)
    tn = sum(p == "no" and y == "no" for p, y in pairs)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    n = len(pairs)
    return {
        "accuracy": (tp + tn) / n if n else 0.0,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": sum(p == "yes" for p in predictions) / n if n else 0.0,
    }


def option_letter(response: str, num_options: int) -> str | None:
    """The option letter of a multiple-choice answer, or None when it cannot be read (counted wrong).

    Accepted, as in LLaVA's ScienceQA scorer: the bare letter, ``"B. …"``, or ``"The answer is B"``;
    a letter beyond the question's options is not an answer.
    """
    valid = LETTERS[:num_options]
    text = response.strip().replace("\n", ". ")
    if len(text) == 1 and text in LETTERS:
        letter: str | None = text
    elif len(text) >= 3 and text[0] in LETTERS and text[1:3] == ". ":
        letter = text[0]
    else:
        match = re.search(r"The answer is ([A-E])", text)
        letter = match.group(1) if match else None
    return letter if letter is not None and letter in valid else None


# EvalAI / VQA answer normalisation. Contractions written without their apostrophes are restored; the
# table below lists the restored forms, and a key is each form with exactly one apostrophe dropped.
_CONTRACTED = (
    "ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't he'd "
    "he'd've he's how'd how'll how's isn't it'd it'd've it'll ma'am mightn't mightn't've might've mustn't must've "
    "needn't not've o'clock oughtn't 'ow's'at shan't she'd've should've shouldn't shouldn't've somebody'd "
    "somebody'd've somebody'll somebody's someone'd someone'd've someone'll someone's something'd something'd've "
    "something'll that's there'd there'd've there're there's they'd they'd've they'll they're they've 'twas "
    "wasn't we'd've we've weren't what'll what're what's what've when's where'd where's where've who'd who'd've "
    "who'll who's who've why'll why're why's won't would've wouldn't wouldn't've y'all y'all'll y'all'd've you'd "
    "you'd've you'll you're you've"
).split()
CONTRACTIONS: dict[str, str] = {
    form[:i] + form[i + 1 :]: form for form in _CONTRACTED for i, char in enumerate(form) if char == "'"
}
NUMBER_WORDS = dict(
    zip("none zero one two three four five six seven eight nine ten".split(), "0 0 1 2 3 4 5 6 7 8 9 10".split())
)
ARTICLES = frozenset(("a", "an", "the"))
_PUNCTUATION = tuple(';/[]"{}()=+\\_-><@`,?!')
_PERIOD = re.compile(r"\.(?!\d)")


def normalize_vqa_answer(answer: str) -> str:
    """The EvalAI answer normalisation of VQAv2/VizWiz/TextVQA: case, punctuation, number words, articles, contractions.

    Lower-case; drop ``,`` ``?`` and split ``'s``; each other punctuation mark is removed where it touches a
    space somewhere in the answer and becomes a space otherwise; periods not followed by a digit go; number
    words up to ten become digits, articles are dropped, apostrophe-less contractions are restored. (EvalAI
    also removes marks when a digit-comma-digit is present, which cannot happen once commas are dropped.)
    """
    text = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = original = text.replace("\n", " ").replace("\t", " ").strip()
    for mark in _PUNCTUATION:
        touches_space = f"{mark} " in original or f" {mark}" in original
        text = text.replace(mark, "" if touches_space else " ")
    text = _PERIOD.sub("", text)
    words = [NUMBER_WORDS.get(word, word) for word in text.split()]
    return " ".join(CONTRACTIONS.get(word, word) for word in words if word not in ARTICLES)


def vqa_soft_scores(human_answers: Sequence[str]) -> dict[str, float]:
    """Score of each distinct (normalised) human answer: mean over the 10 leave-one-out subsets of min(1, matches/3)."""
    answers = [normalize_vqa_answer(a) for a in human_answers]
    scores = {}
    for candidate in set(answers):
        matches = sum(a == candidate for a in answers)
        # leaving out a matching human removes one match; leaving out another one keeps them all
        per_subset = [min(1.0, (matches - (a == candidate)) / 3) for a in answers]
        scores[candidate] = sum(per_subset) / len(per_subset)
    return scores


def vqa_accuracy(response: str, human_answers: Sequence[str]) -> float:
    """VQA soft accuracy of one response against its human answers (0 for an answer no human gave)."""
    return vqa_soft_scores(human_answers).get(normalize_vqa_answer(response), 0.0)


def circular_shifts(options: Sequence[str], answer: str) -> list[tuple[list[str], str]]:
    """Every rotation of the options with the letter of the right one (LLaVA's ``--all-rounds`` order)."""
    index = LETTERS.index(answer)
    n = len(options)
    return [(list(options[r:]) + list(options[:r]), LETTERS[(index - r) % n]) for r in range(n)]


def circular_accuracy(verdicts: Mapping[Any, Sequence[bool]]) -> float:
    """CircularEval: the share of questions whose every pass is right."""
    return sum(all(v) for v in verdicts.values()) / len(verdicts) if verdicts else 0.0


# ------------------------------------------------------------------------------------------- loading data
def _read_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise VLMDataError(f"{path}: {what} not found (see docs/vlm_eval.md for the data layout)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise VLMDataError(f"{path}: not valid JSON ({err})") from None


def _read_jsonl(path: Path, what: str) -> list[dict[str, Any]]:
    if not path.is_file():
        raise VLMDataError(f"{path}: {what} not found (see docs/vlm_eval.md for the data layout)")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise VLMDataError(f"{path}:{number}: not a JSON line ({err})") from None
    return rows


def _field(record: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in record:
        raise VLMDataError(f"{where}: missing field {key!r} (has {sorted(record)})")
    return record[key]


def load_gqa(root: Path, limit: int | None = None) -> list[Sample]:
    """GQA testdev-balanced: ``testdev_balanced_questions.json`` ({qid: {question, imageId, answer, …}}), images/."""
    path = root / "testdev_balanced_questions.json"
    questions = _read_json(path, "GQA questions")
    samples = []
    for qid, q in list(questions.items())[:limit]:
        where = f"{path} question {qid}"
        image = root / "images" / f"{_field(q, 'imageId', where)}.jpg"
        answer = _field(q, "answer", where)
        samples.append(Sample(qid, with_suffix(_field(q, "question", where), SHORT_ANSWER), image, {"answer": answer}))
    return samples


def load_pope(root: Path, limit: int | None = None) -> list[Sample]:
    """POPE on COCO: ``coco/coco_pope_<split>.json`` (JSON lines: question_id, image, text, label), ``val2014/``."""
    samples = []
    for split in POPE_SPLITS:
        path = root / "coco" / f"coco_pope_{split}.json"
        for number, row in enumerate(_read_jsonl(path, f"POPE {split} split")[:limit], 1):
            where = f"{path}:{number}"
            label = str(_field(row, "label", where)).strip().lower()
            if label not in ("yes", "no"):
                raise VLMDataError(f"{where}: label must be 'yes' or 'no', got {label!r}")
            question = with_suffix(_field(row, "text", where), SHORT_ANSWER)
            image = root / "val2014" / _field(row, "image", where)
            samples.append(
                Sample(f"{split}/{row.get('question_id', number)}", question, image, {"split": split, "label": label})
            )
    return samples


def load_sqa(root: Path, limit: int | None = None) -> list[Sample]:
    """ScienceQA-IMG test: ``problems.json`` + ``pid_splits.json``, image problems only, ``images/test/<pid>/<image>``.

    The question is ``Context: <hint>`` (when there is one), the question, and the lettered choices; when
    LLaVA's ``llava_test_CQM-A.json`` is there, its text for the problem is used instead.
    """
    problems = _read_json(root / "problems.json", "ScienceQA problems")
    llava_file = root / "llava_test_CQM-A.json"
    llava_text = {}
    if llava_file.is_file():
        for record in _read_json(llava_file, "LLaVA's ScienceQA prompts"):
            turns = _field(record, "conversations", f"{llava_file} record {record.get('id')}")
            llava_text[str(record.get("id"))] = turns[0]["value"].replace("<image>", "").strip()
    splits = _read_json(root / "pid_splits.json", "ScienceQA splits")
    if "test" not in splits:
        raise VLMDataError(f"{root / 'pid_splits.json'}: no 'test' split (has {sorted(splits)})")
    samples = []
    for pid in splits["test"]:
        where = f"{root / 'problems.json'} problem {pid}"
        problem = _field(problems, str(pid), f"{root / 'problems.json'}")
        if not problem.get("image"):
            continue
        choices = _field(problem, "choices", where)
        answer = _field(problem, "answer", where)
        if not 0 <= answer < len(choices) <= len(LETTERS):
            raise VLMDataError(f"{where}: answer {answer} is not an index into its {len(choices)} choices")
        parts = [f"Context: {problem['hint']}"] if problem.get("hint") else []
        parts += [_field(problem, "question", where), lettered(choices)]
        question = with_suffix(llava_text.get(str(pid), "\n".join(parts)), LETTER_ANSWER)
        image = root / "images" / "test" / str(pid) / problem["image"]
        samples.append(Sample(str(pid), question, image, {"answer": LETTERS[answer], "num_options": len(choices)}))
        if limit and len(samples) >= limit:
            break
    return samples


def textvqa_question(prompt: str) -> str:
    """The question line of a LLaVA TextVQA prompt (the line that is not ``Reference OCR token: …``), lower-cased."""
    lines = [line for line in prompt.split("\n") if line.strip()]
    return next(line for line in lines if not line.startswith("Reference OCR token:")).strip().lower()


def load_textvqa(root: Path, limit: int | None = None) -> list[Sample]:
    """TextVQA val: LLaVA's ``llava_textvqa_val_v051_ocr.jsonl`` prompts (question + OCR tokens), answers from
    ``TextVQA_0.5.1_val.json`` matched by (image_id, question), images in ``train_images/``."""
    prompts_path = root / "llava_textvqa_val_v051_ocr.jsonl"
    rows = _read_jsonl(prompts_path, "TextVQA prompts (LLaVA's jsonl with OCR tokens)")[:limit]
    annotations_path = root / "TextVQA_0.5.1_val.json"
    data = _read_json(annotations_path, "TextVQA annotations")
    answers = {}
    for entry in _field(data, "data", str(annotations_path)):
        answers[(entry["image_id"], entry["question"].strip().lower())] = entry["answers"]
    samples = []
    for number, row in enumerate(rows, 1):
        where = f"{prompts_path}:{number}"
        text, image_id = _field(row, "text", where), _field(row, "question_id", where)
        key = (image_id, textvqa_question(text))
        if key not in answers:
            raise VLMDataError(
                f"{where}: no annotation in {annotations_path} for image {image_id!r}, question {key[1]!r}"
            )
        image = root / "train_images" / _field(row, "image", where)
        samples.append(
            Sample(f"{image_id}/{number}", with_suffix(text, SHORT_ANSWER), image, {"answers": answers[key]})
        )
    return samples


def _missing(value: Any) -> bool:
    return (
        value is None or (isinstance(value, float) and math.isnan(value)) or str(value).lower() in ("nan", "none", "")
    )


def load_mmbench(root: Path, limit: int | None = None) -> list[Sample]:
    """MMBench dev: ``mmbench_dev_20230712.tsv`` (index, question, hint, A–D, answer, image as base64, …).

    Rows whose ``index`` differs by a multiple of 1e6 are passes of one question with shifted options, as
    in MMBench's own files; a file with single rows gets LLaVA's rotations of the options. ``limit`` counts
    questions, not passes.
    """
    import pandas as pd

    path = root / "mmbench_dev_20230712.tsv"
    if not path.is_file():
        raise VLMDataError(f"{path}: MMBench dev TSV not found (see docs/vlm_eval.md for the data layout)")
    table = pd.read_table(path)
    missing = {"index", "question", "hint", "A", "B", "answer", "image"} - set(table.columns)
    if missing:
        raise VLMDataError(f"{path}: missing column(s) {sorted(missing)}")
    rows = table.to_dict("records")
    has_passes = any(int(row["index"]) >= 1_000_000 for row in rows)
    samples: list[Sample] = []
    questions: list[int] = []
    for row in rows:
        group = int(row["index"]) % 1_000_000
        if group not in questions:
            if limit and len(questions) >= limit:
                continue
            questions.append(group)
        options = []
        for letter in "ABCD":
            if letter not in row or _missing(row[letter]):
                break
            options.append(str(row[letter]))
        answer = str(row["answer"]).strip()
        if answer not in LETTERS[: len(options)]:
            raise VLMDataError(f"{path} index {row['index']}: answer {answer!r} is not one of its options")
        passes = [(options, answer)] if has_passes else circular_shifts(options, answer)
        for shift, (shifted, letter) in enumerate(passes):
            parts = ([] if _missing(row["hint"]) else [str(row["hint"])]) + [str(row["question"]), lettered(shifted)]
            question = with_suffix("\n".join(parts), LETTER_ANSWER)
            meta = {"group": group, "answer": letter, "num_options": len(shifted), "category": row.get("category")}
            samples.append(Sample(f"{row['index']}/{shift}", question, str(row["image"]), meta))
    return samples


def load_vqav2(root: Path, limit: int | None = None) -> list[Sample]:
    """VQAv2 test-dev: LLaVA's ``llava_vqav2_mscoco_test-dev2015.jsonl`` (question_id, image, text), ``test2015/``."""
    path = root / "llava_vqav2_mscoco_test-dev2015.jsonl"
    samples = []
    for number, row in enumerate(_read_jsonl(path, "VQAv2 test-dev questions")[:limit], 1):
        where = f"{path}:{number}"
        question = with_suffix(_field(row, "text", where), SHORT_ANSWER)
        samples.append(
            Sample(_field(row, "question_id", where), question, root / "test2015" / _field(row, "image", where))
        )
    return samples


def load_vizwiz(root: Path, limit: int | None = None) -> list[Sample]:
    """VizWiz test: the official ``test.json`` (a list of {image, question}), images in ``test/``."""
    path = root / "test.json"
    records = _read_json(path, "VizWiz test questions")
    samples = []
    for number, record in enumerate(records[:limit]):
        where = f"{path} record {number}"
        image = _field(record, "image", where)
        question = with_suffix(_field(record, "question", where), UNANSWERABLE, SHORT_ANSWER)
        samples.append(Sample(image, question, root / "test" / image))
    return samples


# ------------------------------------------------------------------------------------------- scoring
def score_gqa(samples: Sequence[Sample], responses: Sequence[str]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    rows = [
        {
            "id": s.id,
            "prediction": gqa_answer(r),
            "answer": s.meta["answer"],
            "correct": gqa_answer(r) == s.meta["answer"],
        }
        for s, r in zip(samples, responses, strict=True)
    ]
    return {"score": sum(r["correct"] for r in rows) / len(rows), "metric": "accuracy", "total": len(rows)}, rows


def score_pope(samples: Sequence[Sample], responses: Sequence[str]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    rows = [
        {"id": s.id, "split": s.meta["split"], "prediction": pope_answer(r), "label": s.meta["label"]}
        for s, r in zip(samples, responses, strict=True)
    ]
    splits = {}
    for split in POPE_SPLITS:
        part = [r for r in rows if r["split"] == split]
        if part:
            splits[split] = binary_metrics([r["prediction"] for r in part], [r["label"] for r in part]) | {
                "total": len(part)
            }
    score = sum(m["f1"] for m in splits.values()) / len(splits)
    return {"score": score, "metric": "mean F1 over splits", "splits": splits, "total": len(rows)}, rows


def score_letters(samples: Sequence[Sample], responses: Sequence[str]) -> list[dict[str, Any]]:
    rows = []
    for s, r in zip(samples, responses, strict=True):
        letter = option_letter(r, s.meta["num_options"])
        rows.append(
            {"id": s.id, "prediction": letter, "answer": s.meta["answer"], "correct": letter == s.meta["answer"]}
        )
    return rows


def score_sqa(samples: Sequence[Sample], responses: Sequence[str]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    rows = score_letters(samples, responses)
    unparsed = sum(r["prediction"] is None for r in rows)
    summary = {"score": sum(r["correct"] for r in rows) / len(rows), "metric": "accuracy (image problems)"}
    return summary | {"total": len(rows), "unparseable": unparsed}, rows


def score_textvqa(samples: Sequence[Sample], responses: Sequence[str]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    rows = [
        {"id": s.id, "prediction": normalize_vqa_answer(r), "accuracy": vqa_accuracy(r, s.meta["answers"])}
        for s, r in zip(samples, responses, strict=True)
    ]
    return {"score": sum(r["accuracy"] for r in rows) / len(rows), "metric": "VQA accuracy", "total": len(rows)}, rows


def score_mmbench(samples: Sequence[Sample], responses: Sequence[str]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    rows = score_letters(samples, responses)
    verdicts: dict[Any, list[bool]] = {}
    for sample, row in zip(samples, rows):
        row["group"] = sample.meta["group"]
        verdicts.setdefault(sample.meta["group"], []).append(row["correct"])
    single = sum(r["correct"] for r in rows) / len(rows)
    summary = {"score": circular_accuracy(verdicts), "metric": "CircularEval accuracy", "total": len(verdicts)}
    return summary | {"passes": len(rows), "single_pass_accuracy": single}, rows


def vqav2_submission(samples: Sequence[Sample], responses: Sequence[str]) -> list[dict[str, Any]]:
    """EvalAI's VQAv2 format: ``[{"question_id": int, "answer": str}]`` with normalised answers."""
    return [{"question_id": s.id, "answer": normalize_vqa_answer(r)} for s, r in zip(samples, responses, strict=True)]


def vizwiz_submission(samples: Sequence[Sample], responses: Sequence[str]) -> list[dict[str, Any]]:
    """EvalAI's VizWiz format: ``[{"image": "VizWiz_test_….jpg", "answer": str}]`` with normalised answers."""
    return [{"image": s.id, "answer": normalize_vqa_answer(r)} for s, r in zip(samples, responses, strict=True)]


SUBMISSION_KEYS = {"vqav2": ("question_id", "answer"), "vizwiz": ("image", "answer")}


def fill_unanswered(rows: list[dict[str, Any]], all_questions: Path) -> list[dict[str, Any]]:
    """VQAv2's server wants an answer for every test2015 question: add ``""`` for those of ``all_questions``
    (LLaVA's ``llava_vqav2_mscoco_test2015.jsonl``) not answered; without that file, ``rows`` as they are."""
    if not all_questions.is_file():
        logger.warning("%s not found: the VQAv2 submission holds the test-dev answers only", all_questions)
        return rows
    answered = {row["question_id"] for row in rows}
    extra = [r["question_id"] for r in _read_jsonl(all_questions, "VQAv2 test2015 questions")]
    return rows + [{"question_id": qid, "answer": ""} for qid in extra if qid not in answered]


def score_submission(
    make: Callable[[Sequence[Sample], Sequence[str]], list[dict[str, Any]]],
) -> Callable[[Sequence[Sample], Sequence[str]], tuple[dict[str, Any], list[dict[str, Any]]]]:
    def score(samples: Sequence[Sample], responses: Sequence[str]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        return {"score": None, "metric": "scored by the evaluation server", "total": len(samples)}, make(
            samples, responses
        )

    return score


@dataclass(frozen=True)
class Benchmark:
    """How to read a benchmark's files into samples, and how to score the responses to them."""

    load: Callable[[Path, int | None], list[Sample]]
    score: Callable[[Sequence[Sample], Sequence[str]], tuple[dict[str, Any], list[dict[str, Any]]]]


SPECS: dict[str, Benchmark] = {
    "vqav2": Benchmark(load_vqav2, score_submission(vqav2_submission)),
    "gqa": Benchmark(load_gqa, score_gqa),
    "vizwiz": Benchmark(load_vizwiz, score_submission(vizwiz_submission)),
    "sqa": Benchmark(load_sqa, score_sqa),
    "textvqa": Benchmark(load_textvqa, score_textvqa),
    "pope": Benchmark(load_pope, score_pope),
    "mmbench": Benchmark(load_mmbench, score_mmbench),
}


# ------------------------------------------------------------------------------------------- generation
def open_image(sample: Sample, benchmark: str):
    """The sample's image in RGB; a missing or unreadable file is a `VLMDataError` naming it."""
    from PIL import Image, UnidentifiedImageError

    try:
        if isinstance(sample.image, Path):
            with Image.open(sample.image) as image:
                return image.convert("RGB")
        return Image.open(io.BytesIO(base64.b64decode(sample.image))).convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError) as err:
        where = sample.image if isinstance(sample.image, Path) else "its base64 image"
        raise VLMDataError(f"{benchmark} sample {sample.id}: cannot read {where} ({err})") from None


def prompt_inputs(tokenizer: Any, prompts: Sequence[str], image_token_id: int, image_tokens: int) -> dict[str, Any]:
    """Left-padded ``input_ids`` and ``attention_mask`` of ``prompts``, tokenized around ``<image>`` as LLaVA does,
    each image token repeated ``image_tokens`` times (the model's ``image_seq_length``)."""
    import torch

    from fura.vlm.data import tokenize_around_images

    rows = []
    for prompt in prompts:
        ids, _ = tokenize_around_images(tokenizer, prompt, image_token_id)
        rows.append([t for token in ids for t in ([token] * image_tokens if token == image_token_id else [token])])
    longest = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), longest), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), longest), dtype=torch.long)
    for index, row in enumerate(rows):
        input_ids[index, longest - len(row) :] = torch.tensor(row)
        attention_mask[index, longest - len(row) :] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def generate_answers(
    model: Any,
    processor: Any,
    samples: Sequence[Sample],
    benchmark: str,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_new_tokens: int = 128,
) -> tuple[list[str], list[str]]:
    """(prompts, responses): greedy batched generation with left padding, the new text of each, stripped."""
    import torch
    from tqdm.auto import tqdm

    tokenizer = processor.tokenizer
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    image_token = getattr(processor, "image_token", "<image>")
    image_token_id = tokenizer.convert_tokens_to_ids(image_token)
    device = next(model.parameters()).device
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    prompts = [build_prompt(s.question, image_token) for s in samples]
    responses: list[str] = []
    for start in tqdm(range(0, len(samples), batch_size), desc=benchmark, unit="batch", leave=False):
        images = [open_image(s, benchmark) for s in samples[start : start + batch_size]]
        batch = processor(images=images, text=prompts[start : start + batch_size], return_tensors="pt", padding=True)
        # the processor gives the pixels and the image-token count; LLaVA's tokenization gives the ids
        image_tokens = int((batch["input_ids"][0] == image_token_id).sum())
        batch.update(prompt_inputs(tokenizer, prompts[start : start + batch_size], image_token_id, image_tokens))
        batch = {k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in batch.items()}
        with torch.no_grad():
            generated = model.generate(
                **batch,
                do_sample=False,
                num_beams=1,
                max_new_tokens=max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
            )
        new = generated[:, batch["input_ids"].shape[1] :]
        responses.extend(text.strip() for text in tokenizer.batch_decode(new, skip_special_tokens=True))
    return prompts, responses


def evaluate_benchmark(
    name: str, samples: Sequence[Sample], generate: Callable[[Sequence[Sample], str], tuple[list[str], list[str]]]
) -> dict[str, Any]:
    """Generate for every sample and score: the summary with one row per sample (prompt and response included)."""
    if not samples:
        raise VLMDataError(f"{name}: no samples to evaluate")
    prompts, responses = generate(samples, name)
    summary, rows = SPECS[name].score(samples, responses)
    for row, prompt, response in zip(rows, prompts, responses, strict=True):
        row.update(prompt=prompt, response=response)
    summary["predictions"] = rows
    shown = "server" if summary["score"] is None else f"{100 * summary['score']:.2f}"
    logger.info("%s: %s (%d samples)", name, shown, len(samples))
    return summary


def results_table(scores: Mapping[str, float | None], title: str):
    """The paper's table: one column per benchmark in LLaVA-1.5's order and the average over the scored ones."""
    from rich.table import Table

    table = Table(title=title)
    names = [n for n in BENCHMARKS if n in scores]
    for name in names:
        table.add_column(COLUMN[name], justify="right")
    table.add_column("Avg.", justify="right", style="bold")
    known = [scores[n] for n in names if scores[n] is not None]
    cells = ["server" if scores[n] is None else f"{100 * scores[n]:.1f}" for n in names]
    average = f"{100 * sum(known) / len(known):.1f}" if known else "-"
    if len(known) < len(names):
        average += f" ({len(known)}/{len(names)})"
    table.add_row(*cells, average)
    return table


# ------------------------------------------------------------------------------------------- CLI
def parse_names(text: str) -> list[str]:
    names = [n.strip().lower() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in SPECS]
    if unknown or not names:
        raise UserError(f"--benchmarks: unknown {unknown or text!r}; choose from {','.join(BENCHMARKS)}")
    return names


def parse_pairs(items: Sequence[str], knob: str, names: Sequence[str] = BENCHMARKS) -> dict[str, str]:
    """``NAME=VALUE`` items (each may also be comma-separated) as a dict, NAME checked against ``names``."""
    pairs = {}
    for item in (part for entry in items for part in entry.split(",") if part.strip()):
        name, sep, value = item.partition("=")
        if not sep or name.strip() not in names:
            raise UserError(f"{knob} expects NAME=VALUE with NAME one of {','.join(names)}, got {item!r}")
        pairs[name.strip()] = value.strip()
    return pairs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="Llava model directory, merged model, or adapter directory")
    parser.add_argument("--base-model", help="base Llava model of an adapter directory (default: adapter_config.json)")
    parser.add_argument(
        "--benchmarks", default=",".join(BENCHMARKS), help=f"comma-separated subset of {','.join(BENCHMARKS)}"
    )
    parser.add_argument(
        "--data-dir",
        default="playground/data/eval",
        help="root with one directory per benchmark, named as LLaVA's playground/data/eval (see docs/vlm_eval.md)",
    )
    parser.add_argument(
        "--data", action="append", default=[], metavar="NAME=DIR", help="a benchmark's directory elsewhere"
    )
    parser.add_argument("--limit", type=int, help="first N questions of each benchmark (POPE: of each split)")
    parser.add_argument("--batch-size", type=int, help=f"prompts per generate call (default {DEFAULT_BATCH_SIZE})")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="LLaVA's short-answer budget (default 128)")
    parser.add_argument("--dtype", help="auto (the default), bf16/bfloat16, fp16/float16 or fp32/float32")
    parser.add_argument(
        "--paper",
        action="store_true",
        help="decode as LLaVA-1.5's scripts: fp16, one question at a time (like-for-like with the paper's numbers)",
    )
    parser.add_argument(
        "--server-scores",
        action="append",
        default=[],
        metavar="NAME=PERCENT",
        help="fill in a server's score (vqav2=78.5,vizwiz=50.0) so the table's average covers all seven",
    )
    parser.add_argument("--output-dir", help="where JSON results and submission files go (default: <model>/eval_vlm)")


def decoding(args: argparse.Namespace) -> tuple[str, int]:
    """(dtype, batch size) of the run: fura's defaults, or with ``--paper`` LLaVA's fp16 and batch 1."""
    if not args.paper:
        return args.dtype or "auto", args.batch_size or DEFAULT_BATCH_SIZE
    if args.dtype not in (None, *PAPER_DTYPES) or args.batch_size not in (None, 1):
        raise UserError("--paper decodes in fp16 one question at a time, as LLaVA-1.5: drop --dtype and --batch-size")
    return "float16", 1


def load_model(model: str, base_model: str | None, dtype: str) -> tuple[Any, Any]:
    """(Llava model, processor): a model directory, or an adapter directory over its base (processor from
    the adapter directory when saved there, else from the base)."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from fura.loading import adapter_base_model, is_adapter_dir, load_for_inference

    loaded, processor = load_for_inference(
        model, base_model, dtype, model_class=LlavaForConditionalGeneration, tokenizer_class=AutoProcessor
    )
    if not hasattr(processor, "image_processor"):  # the adapter directory holds only a tokenizer
        source = (base_model or adapter_base_model(model)) if is_adapter_dir(model) else model
        processor = AutoProcessor.from_pretrained(source)
        if not hasattr(processor, "image_processor"):
            raise UserError(f"{source}: no image processor saved beside the model (save the LlavaProcessor there)")
    if not pads_to_square(processor.image_processor):
        logger.warning(
            "%s: the image processor (%s) does not pad images to a square; LLaVA-1.5 evaluates with "
            "image_aspect_ratio=pad (LlavaImageProcessor with do_pad=True), so scores may differ from the paper's",
            model,
            type(processor.image_processor).__name__,
        )
    return loaded, processor


def pads_to_square(image_processor: Any) -> bool:
    """Whether images are padded to a square before resizing, as LLaVA-1.5 does (a centre crop cuts them)."""
    return type(image_processor).__name__.startswith("LlavaImageProcessor") and bool(
        getattr(image_processor, "do_pad", False)
    )


def write_submission(name: str, predictions: Sequence[Mapping[str, Any]], data: Path, output: Path) -> Path:
    """``<output>/submissions/<name>.json`` in the server's format (VQAv2: unanswered test2015 ids added)."""
    rows = [{key: row[key] for key in SUBMISSION_KEYS[name]} for row in predictions]
    if name == "vqav2":
        rows = fill_unanswered(rows, data / "llava_vqav2_mscoco_test2015.jsonl")
    path = output / "submissions" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows))
    return path


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    names = parse_names(args.benchmarks)
    dirs = {name: Path(args.data_dir) / DEFAULT_DIRS[name] for name in names}
    dirs.update({name: Path(path) for name, path in parse_pairs(args.data, "--data", names).items()})
    server: dict[str, float] = {}
    for name, value in parse_pairs(args.server_scores, "--server-scores", SERVER_SCORED).items():
        try:
            server[name] = float(value) / 100
        except ValueError:
            raise UserError(f"--server-scores {name}={value}: the score must be a percentage, e.g. 78.5") from None
    # every data file is read (and every format error raised) before the model is loaded
    samples = {name: SPECS[name].load(dirs[name], args.limit) for name in names}
    if args.output_dir:
        output = Path(args.output_dir)
    else:
        output = Path(args.model) / "eval_vlm" if Path(args.model).is_dir() else Path("eval_vlm")
    output.mkdir(parents=True, exist_ok=True)

    dtype, batch_size = decoding(args)
    model, processor = load_model(args.model, args.base_model, dtype)

    def generate(batch: Sequence[Sample], name: str) -> tuple[list[str], list[str]]:
        return generate_answers(model, processor, batch, name, batch_size, args.max_new_tokens)

    scores: dict[str, float | None] = {}
    for name in names:
        start = time.perf_counter()
        result = evaluate_benchmark(name, samples[name], generate)
        seconds = time.perf_counter() - start
        result.update(benchmark=name, model=args.model, data=str(dirs[name]), limit=args.limit, seconds=seconds)
        (output / f"{name}.json").write_text(json.dumps(result, indent=2, default=str))
        if name in SERVER_SCORED:
            path = write_submission(name, result["predictions"], dirs[name], output)
            logger.info("%s: submission file for the evaluation server: %s", name, path)
        scores[name] = server.get(name, result["score"])
    known = [s for s in scores.values() if s is not None]
    summary = {"model": args.model, "scores": scores, "server_scores": server, "output_dir": str(output)}
    summary.update(dtype=dtype, batch_size=batch_size, paper_decoding=args.paper)
    summary["average"] = sum(known) / len(known) if known else None
    (output / "summary.json").write_text(json.dumps(summary, indent=2))
    Console().print(results_table(scores, f"LLaVA-1.5 benchmarks (%) — {args.model}"))
    Console().print(f"results in {output}")
    return 0
