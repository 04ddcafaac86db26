"""Human word ratings as a noisy-label classification task: reading a lexicon, and the experiment's word splits.

A lexicon is any file of ``token<TAB>score[<TAB>…]`` lines: VADER's (each token's mean rating by ten
people on −4…+4, the default) or AFINN's (−5…+5) both fit. Polar words (|score| ≥ 1) are the task,
labelled by the sign of the score; neutral words (|score| < 0.5) are real inputs the task never
trains on, where retention is measured.
"""

from __future__ import annotations

import importlib.util
import random
from dataclasses import dataclass
from pathlib import Path

from fura.errors import UserError


def vader_lexicon_path() -> Path:
    """``vaderSentiment/vader_lexicon.txt`` of the installed `vadersentiment` package."""
    spec = importlib.util.find_spec("vaderSentiment")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the VADER lexicon comes with the vadersentiment package: pip install vadersentiment")
    return Path(next(iter(spec.submodule_search_locations))) / "vader_lexicon.txt"


def read_lexicon(path: str | Path) -> dict[str, float]:
    """Token → score from ``token<TAB>score[<TAB>…]`` lines; blank lines skipped, malformed ones refused."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError as err:
        raise UserError(f"cannot read the lexicon {path}: {err.strerror or err}") from None
    scores: dict[str, float] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        try:
            scores[fields[0].strip()] = float(fields[1])
        except (IndexError, ValueError):
            raise UserError(f"{path}:{number}: expected token<TAB>score, got {line[:60]!r}") from None
    return scores


@dataclass
class WordSplits:
    """Disjoint polar word lists (each word with its clean label: 1 positive, 0 negative) and the neutral words."""

    test: list[tuple[str, int]]
    val: list[tuple[str, int]]
    pool: list[tuple[str, int]]
    neutral: list[str]


def split_words(
    scores: dict[str, float], test_words: int, val_words: int, neutral_words: int, largest_size: int, seed: int = 0
) -> WordSplits:
    """Alphabetic words only; polar ones shuffled (deterministically in ``seed``) into test, validation and the
    pool the training sets are drawn from; up to ``neutral_words`` neutral words."""
    polar = sorted((w, int(s > 0)) for w, s in scores.items() if w.isalpha() and abs(s) >= 1)
    neutral = sorted(w for w, s in scores.items() if w.isalpha() and abs(s) < 0.5)
    needed = test_words + val_words + largest_size
    if len(polar) < needed:
        raise UserError(f"the lexicon has {len(polar)} alphabetic words with |score| >= 1; this run needs {needed}")
    rng = random.Random(seed)
    rng.shuffle(polar)
    rng.shuffle(neutral)
    return WordSplits(
        polar[:test_words],
        polar[test_words : test_words + val_words],
        polar[test_words + val_words :],
        neutral[:neutral_words],
    )


def unrated_words(vocabulary: list[str], scores: dict[str, float], count: int, seed: int = 0) -> list[str]:
    """Whole alphabetic words of the model's vocabulary that the lexicon does not rate: retention's inputs when a
    lexicon (such as AFINN) has too few neutral words."""
    words = sorted(w for w in vocabulary if w.isalpha() and len(w) > 2 and w not in scores)
    return random.Random(seed).sample(words, min(count, len(words)))


def training_words(pool: list[tuple[str, int]], size: int, noise: float, seed: int) -> list[tuple[str, int]]:
    """``size`` words of the pool (the same ones at every noise level for a seed) with exactly ``round(noise·size)``
    labels flipped, in a seeded order."""
    words = random.Random(f"words/{seed}").sample(pool, size)
    flips = set(random.Random(f"flips/{seed}/{noise}").sample(range(size), round(noise * size)))
    return [(w, 1 - y if i in flips else y) for i, (w, y) in enumerate(words)]
