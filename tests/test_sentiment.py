"""`fura experiment sentiment --fast` (what CI runs) on the real all-MiniLM-L6-v2 and VADER's ratings: every method
learns the clean task, retention is a similarity in (0, 1] that is exactly 1 for the base model, every grid rate
is a frontier point, and results.json holds what the docs promise."""

from __future__ import annotations

import contextlib
import io
import json

import pytest

from fura.cli import main
from fura.experiments.sentiment.cli import SentimentSettings


@pytest.fixture(scope="module")
def fast_run(tmp_path_factory):
    """One `fura experiment sentiment --fast` run, with what it printed."""
    out = tmp_path_factory.mktemp("sentiment") / "run"
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        assert main(["experiment", "sentiment", "--fast", "--output-dir", str(out)]) == 0
    return out, json.loads((out / "results.json").read_text()), buffer.getvalue()


def test_every_method_beats_the_majority_class_on_clean_labels_and_never_answers_constantly(fast_run):
    _, summary, _ = fast_run
    settings = SentimentSettings.fast()
    rows = summary["results"]
    assert {(r["method"], r["label_noise"], r["train_size"]) for r in rows} == {
        (m, n, s) for m in ("fura", "lora", "full") for n in settings.label_noise for s in settings.sizes
    }
    majority = summary["majority_accuracy"]
    assert 0.5 <= majority < 0.7  # VADER has more negative than positive words
    for row in rows:
        where = f"{row['method']} at noise {row['label_noise']}"
        if row["label_noise"] == 0:
            assert row["accuracy"] >= majority + 0.10, where
        for seed_row in row["per_seed"]:
            assert len(set(seed_row["predictions"])) > 1, f"{where}, seed {seed_row['seed']}: constant predictions"
            assert len(seed_row["predictions"]) == summary["settings"]["test_words"]


def test_retention_is_a_similarity_in_0_1_and_exactly_1_for_the_base_model(fast_run):
    _, summary, _ = fast_run
    assert summary["base_retention"] == 1.0
    assert summary["retention_words"] == summary["settings"]["neutral_words"]
    for row in summary["results"]:
        values = [s["retention"] for s in row["per_seed"]] + [p["retention"] for p in row["lr_search"].values()]
        assert all(0 < v <= 1 for v in values), row["method"]
        assert row["retention"] < 1.0  # fine-tuning moves the embeddings at all


def test_results_json_has_the_protocol_the_paired_intervals_and_a_frontier_point_per_rate(fast_run):
    out, summary, printed = fast_run
    settings = SentimentSettings.fast()
    for row in summary["results"]:
        grid = settings.lr_grid[row["method"]]
        assert len(grid) >= 4 and row["seeds"] == list(settings.seeds)
        assert set(row["lr_search"]) == {f"{lr:g}" for lr in grid}
        validation = {float(lr): r["validation_accuracy"] for lr, r in row["lr_search"].items()}
        best = max(validation.values())
        assert row["learning_rate"] == min(lr for lr, v in validation.items() if v == best)  # ties: the smaller rate
        chosen = row["lr_search"][f"{row['learning_rate']:g}"]
        assert chosen["test_accuracy"] == row["per_seed"][0]["accuracy"]  # seed 0 at the chosen rate is that run
        accuracies = [s["accuracy"] for s in row["per_seed"]]
        assert row["accuracy"] == pytest.approx(sum(accuracies) / len(accuracies))
        assert row["accuracy_std"] > 0 or len(set(accuracies)) == 1
        key = f"{row['train_size']}/{row['label_noise']:g}"
        points = summary["frontier"][key]["points"][row["method"]]
        assert sorted(p["learning_rate"] for p in points) == sorted(grid)  # every grid rate is a frontier point
    by = {(r["method"], r["label_noise"]): r for r in summary["results"]}
    fura, lora = by["fura", 0.0], by["lora", 0.0]
    assert abs(lora["trainable"] - fura["trainable"]) <= 0.1 * fura["trainable"]  # LoRA's r matches FuRA's count
    assert by["full", 0.0]["trainable"] == by["full", 0.0]["total"]
    for key, pairs in summary["paired"].items():
        assert set(pairs) == {"fura-lora", "fura-full"}
        noise = float(key.split("/")[1])
        for name, metrics in pairs.items():
            other = by[name.split("-")[1], noise]
            for metric, interval in metrics.items():
                diffs = [a[metric] - b[metric] for a, b in zip(by["fura", noise]["per_seed"], other["per_seed"])]
                assert interval["differences"] == pytest.approx(diffs)
                assert interval["low"] <= interval["mean"] <= interval["high"]
        assert summary["frontier"][key]["matched"]["retains_most"] in {"fura", "lora", "full"}
        assert f"{key.split('/')[0]} words, label noise {noise:.0%}, frontier: at accuracy" in printed
    assert "fura experiment sentiment" in printed and "fura − lora accuracy" in printed
    for size in settings.sizes:
        assert (out / f"frontier-{size}.png").stat().st_size > 0
        assert (out / f"comparison-{size}.png").stat().st_size > 0


def test_user_mistakes_are_one_line_and_exit_2(tmp_path, capsys):
    bad = tmp_path / "lexicon.txt"
    bad.write_text("good\tvery\n")
    assert main(["experiment", "sentiment", "--fast", "--lexicon", str(bad), "--output-dir", str(tmp_path)]) == 2
    assert main(["experiment", "sentiment", "--seeds", "1", "--output-dir", str(tmp_path)]) == 2
    assert main(["experiment", "sentiment", "--methods", "fura,vera", "--output-dir", str(tmp_path)]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 3 and all(line.startswith("fura: error: ") for line in errors)
    assert "lexicon.txt:1" in errors[0] and "--seeds 1" in errors[1] and "vera" in errors[2]
