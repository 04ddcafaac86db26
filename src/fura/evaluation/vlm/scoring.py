"""Reading an answer out of a response and scoring a benchmark as its own scorer does (or writing the server's rows)."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from fura.evaluation.vlm.benchmarks import LETTERS, POPE_SPLITS, Sample


# ------------------------------------------------------------------------------------------- answers
def gqa_answer(response: str) -> str:
    """GQA's prediction: the response without trailing periods, lower-cased."""
    return response.strip().rstrip(".").lower()


def pope_answer(response: str) -> str:
    """``"no"`` when the first sentence has the word No, no or not (commas ignored), else ``"yes"``."""
    first = response.split(".")[0].replace(",", "")
    return "no" if {"No", "no", "not"} & set(first.split(" ")) else "yes"


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


# ------------------------------------------------------------------------------------------- metrics
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


def circular_accuracy(verdicts: Mapping[Any, Sequence[bool]]) -> float:
    """CircularEval: the share of questions whose every pass is right."""
    return sum(all(v) for v in verdicts.values()) / len(verdicts) if verdicts else 0.0


# ------------------------------------------------------------------------------------------- per benchmark
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


def score_submission(
    make: Callable[[Sequence[Sample], Sequence[str]], list[dict[str, Any]]],
) -> Callable[[Sequence[Sample], Sequence[str]], tuple[dict[str, Any], list[dict[str, Any]]]]:
    def score(samples: Sequence[Sample], responses: Sequence[str]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        return {"score": None, "metric": "scored by the evaluation server", "total": len(samples)}, make(
            samples, responses
        )

    return score
