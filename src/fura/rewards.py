"""The math rewards and graders: the last ``\\boxed{}`` answer checked against the reference, or the paper's grader.

- ``boxed_accuracy_reward`` (recipe ``reward: math_verify``, fura's default) and ``is_correct`` (the ``boxed``
  grader of ``fura eval math``): math-verify equivalence of the last box (fractions, radicals, intervals,
  sets, matrices, units and ``\\text{}`` answers). A completion without a box scores 0.
- ``is_equiv_reward`` (``reward: is_equiv``): the released code's training reward, Hendrycks' MATH string
  normalisation of the last box (`is_equiv`).
- ``paper_is_correct`` (the ``paper`` grader): the released code's evaluation, math-verify's ``parse`` on the
  model's whole text and on the *raw* reference, then ``verify``. It credits answers without a box and
  misses references that do not parse raw (``p - q``, ``3, 5, 7``, ``\\text{Evelyn}``), so it and the boxed
  grader give different numbers (docs/fidelity.md).

No input makes these functions raise: a reward that crashes stops a training run, so malformed LaTeX
is simply "not equivalent". The ``*_reward`` functions have the signature TRL's `GRPOTrainer` calls.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import Any

logger = logging.getLogger(__name__)

BOX_COMMANDS = ("\\boxed", "\\fbox")


def _box_at(text: str, start: int) -> str | None:
    """The content of the box command whose argument starts at ``start``, or None if it is not closed."""
    rest = text[start:]
    if rest.startswith(" ") and not rest.lstrip().startswith("{"):  # "\boxed 5": the argument is the next word
        word = rest.strip().split(maxsplit=1)
        return word[0].rstrip("$.,") if word else None
    offset = len(rest) - len(rest.lstrip())
    if not rest[offset:].startswith("{"):
        return None
    depth = 0
    for index in range(start + offset, len(text)):
        if text[index] == "{":
            depth += 1
        elif text[index] == "}":
            depth -= 1
            if depth == 0:
                return text[start + offset + 1 : index]
    return None


def last_boxed(text: str) -> str | None:
    """The content of the last complete ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``, or None.

    Braces are matched, so ``\\boxed{\\frac{1}{2}}`` gives ``\\frac{1}{2}``. A box left unclosed (a
    completion cut at the token limit) is skipped in favour of the last closed one before it.
    """
    starts = sorted(index + len(command) for command in BOX_COMMANDS for index in _find_all(text, command))
    for start in reversed(starts):
        if start < len(text) and text[start].isalpha():  # \boxedfoo is another command
            continue
        content = _box_at(text, start)
        if content is not None:
            return content
    return None


def _find_all(text: str, needle: str) -> list[int]:
    found, index = [], text.find(needle)
    while index != -1:
        found.append(index)
        index = text.find(needle, index + 1)
    return found


def _timeout() -> int | None:
    # math-verify's timeouts use signal.alarm, which only works in the main thread.
    return 5 if threading.current_thread() is threading.main_thread() else None


@lru_cache(maxsize=8192)
def _parse(answer: str) -> tuple[Any, ...]:
    """math-verify's parse of one answer (LaTeX or plain), cached: each reference is checked for many samples."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    config = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]
    return tuple(parse(f"\\boxed{{{answer}}}", extraction_config=config, parsing_timeout=_timeout()))


def answers_match(prediction: str, reference: str) -> bool:
    """Whether two final answers (box contents, not whole solutions) are mathematically equivalent."""
    from math_verify import verify

    prediction, reference = prediction.strip(), reference.strip()
    if not prediction or not reference:
        return False
    try:
        gold, pred = _parse(reference), _parse(prediction)
        if not gold or not pred:  # neither sympy nor a string fallback came out: compare the raw text
            return prediction == reference
        return bool(verify(list(gold), list(pred), timeout_seconds=_timeout()))
    except Exception:  # math-verify swallows most errors; anything left must not stop training
        logger.debug("answer comparison failed for %r vs %r", prediction, reference, exc_info=True)
        return False


def is_correct(completion: str, reference: str) -> bool:
    """Whether the last boxed answer of ``completion`` is equivalent to ``reference``; False when there is no box."""
    boxed = last_boxed(completion)
    return boxed is not None and answers_match(boxed, reference)


def _completion_text(completion: str | Sequence[dict[str, Any]]) -> str:
    if isinstance(completion, str):
        return completion
    # conversational: a list of messages; the answer is in the last assistant turn
    contents = [
        message.get("content") or "" for message in completion if message.get("role", "assistant") == "assistant"
    ]
    return contents[-1] if contents else ""


def boxed_accuracy_reward(
    completions: list[str] | list[list[dict[str, Any]]], answer: list[str], **kwargs: Any
) -> list[float]:
    """TRL reward function: 1.0 per completion whose last boxed answer matches the ``answer`` column, else 0.0."""
    return [float(is_correct(_completion_text(c), ref)) for c, ref in zip(completions, answer, strict=True)]


def paper_is_correct(completion: str, reference: str) -> bool:
    """The paper's grader: math-verify ``parse`` on the whole completion and on the raw reference, then ``verify``."""
    from math_verify import parse, verify

    try:
        prediction = parse(completion, parsing_timeout=_timeout())
        gold = _parse_raw(reference)
        return bool(prediction) and bool(verify(list(gold), prediction, timeout_seconds=_timeout()))
    except Exception:  # as the released grader: an error is a wrong answer
        logger.debug("paper grader failed for %r vs %r", completion, reference, exc_info=True)
        return False


@lru_cache(maxsize=8192)
def _parse_raw(reference: str) -> tuple[Any, ...]:
    from math_verify import parse

    return tuple(parse(reference, parsing_timeout=_timeout()))


#: ``fura eval math --grader``: the paper's (comparable with its table) and fura's last-box check.
GRADERS: dict[str, Callable[[str, str], bool]] = {"paper": paper_is_correct, "boxed": is_correct}


# Hendrycks' MATH normalisation, written from its description: each step rewrites one notational variant.
_UNITS = "\\text{ "  # in MATH, "\text{ " (with the space) only ever starts a unit on the right
_ONE_CHAR_SQRT = re.compile(r"\\sqrt([^{])")
_ONE_CHAR_FRACS = (re.compile(r"\\frac([^{])([^{])"), re.compile(r"\\frac([^{])\{"))
_INTEGER_RATIO = re.compile(r"(-?[1-9]\d*|0)/(-?[1-9]\d*|0)")


def _normalise(answer: str) -> str:
    """Hendrycks' canonical form of a MATH answer string; raises ValueError where the original gives up."""
    text = answer.replace("\n", "").replace("\\!", "").replace("\\\\", "\\")
    text = text.replace("tfrac", "frac").replace("dfrac", "frac").replace("\\left", "").replace("\\right", "")
    text = text.replace("^{\\circ}", "").replace("^\\circ", "").replace("\\$", "")
    if _UNITS in text:
        value, *units = text.split(_UNITS)
        if len(units) != 1:
            raise ValueError("more than one unit")
        text = value
    text = text.replace("\\%", "").replace(" .", " 0.").replace("{.", "{0.")
    if not text:
        return text
    if text.startswith("."):
        text = "0" + text
    left, *right = text.split("=")
    if len(right) == 1 and len(left) <= 2:  # "x = 5", "k=3": keep the value
        text = right[0]
    if text.endswith("\\sqrt"):
        raise ValueError("\\sqrt without an argument")
    text = _ONE_CHAR_SQRT.sub(r"\\sqrt{\1}", text).replace(" ", "")
    if re.search(r"\\frac[^{]?$", text):
        return text  # "\frac" with fewer than two characters left: left as it is
    text = _ONE_CHAR_FRACS[1].sub(r"\\frac{\1}{", _ONE_CHAR_FRACS[0].sub(r"\\frac{\1}{\2}", text))
    if text == "0.5":
        return "\\frac{1}{2}"
    ratio = _INTEGER_RATIO.fullmatch(text)
    return f"\\frac{{{ratio[1]}}}{{{ratio[2]}}}" if ratio else text


def is_equiv(prediction: str | None, reference: str | None) -> bool:
    """Hendrycks' MATH equivalence: the normalised strings are equal (the raw ones, where normalising fails)."""
    if prediction is None or reference is None:
        return prediction is None and reference is None
    try:
        return _normalise(prediction) == _normalise(reference)
    except ValueError:
        return prediction == reference


def is_equiv_reward(
    completions: list[str] | list[list[dict[str, Any]]], answer: list[str], **kwargs: Any
) -> list[float]:
    """TRL reward function: 1.0 per completion whose last box is `is_equiv` to the ``answer`` column (the paper's)."""
    rewards = []
    for completion, reference in zip(completions, answer, strict=True):
        boxed = last_boxed(_completion_text(completion))
        rewards.append(float(boxed is not None and is_equiv(boxed, reference)))
    return rewards


#: The recipe's ``reward`` key: fura's math-verify check of the last box, or the paper's Hendrycks string check.
REWARDS = {"math_verify": boxed_accuracy_reward, "is_equiv": is_equiv_reward}
