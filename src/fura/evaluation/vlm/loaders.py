"""Each benchmark's files, in their public formats, read into `Sample`s; a format error names the file and record."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fura.evaluation.vlm.benchmarks import (
    LETTER_ANSWER,
    LETTERS,
    POPE_SPLITS,
    SHORT_ANSWER,
    UNANSWERABLE,
    Sample,
    VLMDataError,
    lettered,
    with_suffix,
)


def _read_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise VLMDataError(f"{path}: {what} not found (see docs/vlm_eval.md for the data layout)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise VLMDataError(f"{path}: not valid JSON ({err})") from None


def read_jsonl(path: Path, what: str) -> list[dict[str, Any]]:
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
        for number, row in enumerate(read_jsonl(path, f"POPE {split} split")[:limit], 1):
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
    rows = read_jsonl(prompts_path, "TextVQA prompts (LLaVA's jsonl with OCR tokens)")[:limit]
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


def circular_shifts(options: Sequence[str], answer: str) -> list[tuple[list[str], str]]:
    """Every rotation of the options with the letter of the right one (LLaVA's ``--all-rounds`` order)."""
    index = LETTERS.index(answer)
    n = len(options)
    return [(list(options[r:]) + list(options[:r]), LETTERS[(index - r) % n]) for r in range(n)]


def load_mmbench(root: Path, limit: int | None = None) -> list[Sample]:
    """MMBench dev: ``mmbench_dev_20230712.tsv`` (index, question, hint, A–D, answer, image as base64, …).

    Rows whose ``index`` differs by a multiple of 1e6 are passes of one question with shifted options, as
    in MMBench's own files; a file with single rows gets LLaVA's rotations of the options. ``limit`` counts
    questions, not passes.
    """
    import pandas as pd  # not a dependency of fura (it comes with datasets)

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
    for number, row in enumerate(read_jsonl(path, "VQAv2 test-dev questions")[:limit], 1):
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
