"""The shared experiment pieces (`fura.experiments`): statistics, CKA, the protocol, frontiers, and the lexicon's
word splits. Fast unit tests; the experiments themselves run in test_quickstart.py and test_sentiment.py."""

from __future__ import annotations

import math

import pytest
import torch

from fura.errors import UserError
from fura.experiments import frontier, stats
from fura.experiments.runner import tune_and_repeat
from fura.experiments.sentiment import lexicon


def test_linear_cka_is_one_on_itself_invariant_to_rotation_and_scale_and_lower_otherwise():
    torch.manual_seed(0)
    x = torch.randn(50, 8)
    assert stats.linear_cka(x, x.clone()) == 1.0  # exactly
    rotation, _ = torch.linalg.qr(torch.randn(8, 8))
    assert stats.linear_cka(x, 3 * x @ rotation + 1) == pytest.approx(1.0, abs=1e-6)
    assert 0 < stats.linear_cka(x, torch.randn(50, 8)) < 0.5
    mixed = stats.linear_cka(x, x + 0.5 * torch.randn(50, 8))
    assert 0.5 < mixed < 1.0


def test_paired_interval_is_a_student_t_interval_of_the_per_seed_differences():
    a, b = [3.0, 5.0, 7.0, 9.0, 11.0], [2.0, 3.0, 4.0, 5.0, 6.0]  # differences 1..5
    interval = stats.paired_interval(a, b)
    assert interval["differences"] == [1.0, 2.0, 3.0, 4.0, 5.0]
    half = 2.7764451 * math.sqrt(2.5) / math.sqrt(5)  # t(0.975, 4) from a table, sd of 1..5 = sqrt(2.5)
    assert interval["mean"] == 3.0
    assert interval["low"] == pytest.approx(3.0 - half) and interval["high"] == pytest.approx(3.0 + half)
    assert "higher" in stats.describe_interval("fura − lora", interval)
    flat = stats.paired_interval([1.0, 2.0, 3.0], [2.0, 1.0, 3.0])
    assert "not distinguishable" in stats.describe_interval("x", flat)
    with pytest.raises(ValueError):
        stats.paired_interval([1.0], [2.0])


def test_ordering_names_ties_within_one_std():
    rows = [
        {"method": "lora", "accuracy": 0.80, "accuracy_std": 0.05, "seeds": [0, 1, 2]},
        {"method": "fura", "accuracy": 0.90, "accuracy_std": 0.01, "seeds": [0, 1, 2]},
        {"method": "full", "accuracy": 0.78, "accuracy_std": 0.01, "seeds": [0, 1, 2]},
    ]
    text = stats.ordering(rows, "accuracy")
    assert text.startswith("fura 90.0 ± 1.0 > lora 80.0 ± 5.0 > full 78.0 ± 1.0")
    assert "lora vs full: within one std" in text and "FuRA ranks 1 of 3" in text


def test_matched_retention_compares_at_the_highest_accuracy_every_method_reaches():
    points = {
        "a": [{"accuracy": 0.6, "retention": 0.99}, {"accuracy": 0.9, "retention": 0.5}],
        "b": [{"accuracy": 0.7, "retention": 0.9}, {"accuracy": 0.8, "retention": 0.6}],
    }
    matched = frontier.matched_retention(points)
    assert matched["accuracy"] == 0.8  # b never gets past 0.8
    assert matched["retention"] == {"a": 0.5, "b": 0.6}  # a needs its 0.9-accuracy point to reach 0.8
    assert matched["retains_most"] == "b"
    assert "b retains the most" in frontier.describe_matched(matched, "retention")
    search = {"0.01": {"test_accuracy": 0.9, "retention": 0.2}, "0.001": {"test_accuracy": 0.7, "retention": 0.8}}
    assert [p["learning_rate"] for p in frontier.frontier_points(search, "test_accuracy", "retention")] == [1e-3, 1e-2]


def test_tune_and_repeat_picks_the_best_validation_rate_ties_to_the_smaller_and_repeats_the_other_seeds():
    from rich.progress import Progress

    validation = {("x", 1.0): 0.5, ("x", 2.0): 0.9, ("x", 3.0): 0.9, ("y", 1.0): 0.7, ("y", 2.0): 0.1}
    calls, chosen = [], []

    def train(cell, lr, seed, search):
        calls.append((cell, lr, seed, search))
        return {"cell": cell, "lr": lr, "seed": seed, "validation_accuracy": validation[cell, lr] if search else None}

    runs = tune_and_repeat(
        ["x", "y"],
        lambda cell: (1.0, 2.0, 3.0) if cell == "x" else (1.0, 2.0),
        (0, 1, 2),
        train,
        lambda run: {"validation_accuracy": run["validation_accuracy"]},
        Progress(disable=True),
        lambda cell, run: chosen.append((cell, run["lr"])),
    )
    assert runs["x"].learning_rate == 2.0 and runs["y"].learning_rate == 1.0
    assert set(runs["x"].lr_search) == {"1", "2", "3"}
    assert [r["seed"] for r in runs["x"].runs] == [0, 1, 2] and all(r["lr"] == 2.0 for r in runs["x"].runs)
    assert chosen == [("x", 2.0), ("y", 1.0)]
    assert sum(1 for c in calls if c[3]) == 5 and sum(1 for c in calls if not c[3]) == 4


def test_read_lexicon_takes_token_tab_score_lines_and_refuses_others(tmp_path):
    good = tmp_path / "afinn.txt"
    good.write_text("abandon\t-2\nabhor\t-3\n\nwow\t4\textra\tcolumns\n")
    assert lexicon.read_lexicon(good) == {"abandon": -2.0, "abhor": -3.0, "wow": 4.0}
    bad = tmp_path / "bad.txt"
    bad.write_text("good\t2\nno score here\n")
    with pytest.raises(UserError, match=r"bad\.txt:2"):
        lexicon.read_lexicon(bad)
    with pytest.raises(UserError, match="cannot read"):
        lexicon.read_lexicon(tmp_path / "missing.txt")


def test_vader_splits_are_disjoint_labelled_by_sign_and_noise_flips_exactly_that_share():
    scores = lexicon.read_lexicon(lexicon.vader_lexicon_path())
    polar = {w: s for w, s in scores.items() if w.isalpha() and abs(s) >= 1}
    assert len(polar) > 5000  # VADER: 5,578 alphabetic words with |mean| >= 1
    words = lexicon.split_words(scores, 500, 250, 500, 1024)
    sets = [{w for w, _ in part} for part in (words.test, words.val, words.pool)]
    assert sum(map(len, sets)) == len(set().union(*sets)) == len(polar)  # disjoint, every polar word used
    assert all(y == int(scores[w] > 0) for w, y in words.test + words.val + words.pool)
    assert len(words.neutral) == 500 and all(abs(scores[w]) < 0.5 for w in words.neutral)
    assert not set(words.neutral) & set().union(*sets)
    clean = dict(lexicon.training_words(words.pool, 256, 0.0, seed=3))
    noisy = dict(lexicon.training_words(words.pool, 256, 0.4, seed=3))
    assert clean.keys() == noisy.keys()  # the same words at every noise level of a seed
    assert sum(clean[w] != noisy[w] for w in clean) == round(0.4 * 256)
    assert clean.keys() != dict(lexicon.training_words(words.pool, 256, 0.0, seed=4)).keys()
    with pytest.raises(UserError, match="needs"):
        lexicon.split_words(scores, 5000, 500, 10, 1024)


def test_unrated_vocabulary_words_stand_in_for_missing_neutral_words():
    vocabulary = ["the", "table", "##ing", "good", "ab", "window", "42", "chair"]
    words = lexicon.unrated_words(vocabulary, {"good": 2.0}, 10, seed=0)
    assert sorted(words) == ["chair", "table", "the", "window"]
