"""`fura quickstart --fast`: the experiment shows something (every method learns), its data is held out, and
results.json carries means, spreads, seeds and the chosen learning rates."""

from __future__ import annotations

import dataclasses
import json
import warnings

import pytest

from fura.cli import main
from fura.experiments.quickstart.settings import TASK_PATTERNS, QuickstartSettings
from fura.experiments.quickstart.world import experiment_data, heldout_records, make_world


def _names(records, world):
    return {n for n in world.colors if any(f" {n} " in r["instruction"] for r in records)}


def _truth(record, world):
    """The right answer of a record, from the world's facts."""
    name = next(n for n in world.colors if f" {n} " in record["instruction"])
    if "true/false" in record["instruction"]:
        return "true" if world.pets[name] == "cat" else "false"
    return "option1" if world.homes[name] == "city" else "option2"


def test_synthetic_data_is_in_the_record_format_held_out_balanced_and_noisy_as_asked():
    settings = QuickstartSettings()
    world = make_world(settings)
    assert len(world.colors) == settings.people
    splits = [set(world.finetune), set(world.val), set(world.test)]
    assert sum(map(len, splits)) == len(set().union(*splits)) == settings.people  # disjoint
    tests = heldout_records(world, settings)
    assert _names([r for rs in tests.values() for r in rs], world) == set(world.test)
    for records in tests.values():
        assert len(records) == settings.test_people
        answers = [r["answer"] for r in records]
        assert len(set(answers)) == 2 and answers.count(answers[0]) == len(answers) / 2  # balanced: chance is 50 %
        assert all(r["answer"] == _truth(r, world) for r in records)  # clean
        assert all(r["output"] == f"the correct answer is {r['answer']}" for r in records)
    for noise in settings.label_noise:
        train, val = experiment_data(world, settings, noise, seed=0)
        assert all(set(r) == {"instruction", "input", "output", "answer"} for r in train + val)
        assert _names(train, world) == set(world.finetune) and _names(val, world) == set(world.val)
        assert all(r["output"] == f"the correct answer is {r['answer']}" for r in train + val)
        wrong = sum(r["answer"] != _truth(r, world) for r in train)  # exactly that share of answers is wrong
        assert wrong == round(noise * len(train) / 2) * 2
        assert all(r["answer"] == _truth(r, world) for r in val)  # validation is clean at every noise level
    assert experiment_data(world, settings, 0.3, 0) == experiment_data(world, settings, 0.3, 0)  # deterministic
    assert experiment_data(world, settings, 0.3, 0) != experiment_data(world, settings, 0.3, 1)  # seeds differ


@pytest.fixture(scope="module")
def fast_run(tmp_path_factory):
    """One `fura quickstart --fast` run (cold cache), with what it printed and the warnings it raised."""
    import os

    root = tmp_path_factory.mktemp("quickstart")
    old = {k: os.environ.get(k) for k in ("FURA_CACHE", "COLUMNS")}
    os.environ.update(FURA_CACHE=str(root / "cache"), COLUMNS="160")
    out = root / "run"
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import contextlib
            import io

            buffer = io.StringIO()
            with contextlib.redirect_stdout(buffer):
                assert main(["quickstart", "--fast", "--output-dir", str(out)]) == 0
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return root, out, buffer.getvalue(), caught


def test_every_method_learns_on_held_out_people(fast_run):
    _, out, printed, _ = fast_run
    summary = json.loads((out / "results.json").read_text())
    base = summary["base"]["average"]
    rows = summary["results"]
    assert {(r["method"], r["label_noise"]) for r in rows} == {
        (m, n) for m in ("fura", "lora", "full") for n in QuickstartSettings.fast().label_noise
    }
    for row in rows:
        where = f"{row['method']} at noise {row['label_noise']}"
        assert row["average"] >= base + 0.15, where
        if row["label_noise"] == 0:
            # the task is learnable: every method learns it clearly from clean data
            assert row["average"] >= 0.60, where
        else:
            # with flipped labels a method may do badly (that is the result the demo reports), but it must stay
            # above the 50 % of a constant answer, or the run shows nothing
            assert row["average"] > 0.50, where
        varied = {  # per task: does the method answer the test questions differently on some seed?
            task: len({p for seed_row in row["per_seed"] for p in seed_row["predictions"][task]}) > 1
            for task in TASK_PATTERNS
        }
        if row["label_noise"] == 0:  # on clean data no task and no seed may collapse
            assert all(varied.values()), f"{where}: constant answer on {varied}"
            for task in TASK_PATTERNS:
                for seed_row in row["per_seed"]:
                    assert len(set(seed_row["predictions"][task])) > 1, f"{where}, seed {seed_row['seed']}, {task}"
        else:  # with flipped labels a method may collapse on one task (a result the table shows), not on all
            assert any(varied.values()), f"{where}: constant answer on every task"
    assert "fura quickstart" in printed and "true-false" in printed
    for noise in QuickstartSettings.fast().label_noise:
        assert f"label noise {noise:.0%}:" in printed  # the ordering, stated from the numbers


def test_results_json_has_means_spreads_seeds_and_chosen_rates(fast_run):
    _, out, _, _ = fast_run
    summary = json.loads((out / "results.json").read_text())
    settings = QuickstartSettings.fast()
    assert set(summary["base"]["accuracy"]) == set(TASK_PATTERNS) and 0 <= summary["base"]["recall"] <= 1
    for row in summary["results"]:
        assert row["seeds"] == [0, 1, 2]
        grid = settings.lr_grid[row["method"]]
        assert len(grid) >= 3 and row["learning_rate"] in grid
        assert set(row["lr_search"]) == {f"{lr:g}" for lr in grid}
        accuracy = {float(lr): v["validation_accuracy"] for lr, v in row["lr_search"].items()}
        best = max(accuracy.values())
        assert row["learning_rate"] == min(lr for lr, a in accuracy.items() if a == best)  # ties: the smaller rate
        averages = [s["average"] for s in row["per_seed"]]
        assert row["average"] == pytest.approx(sum(averages) / 3)
        mean = row["average"]
        assert row["average_std"] == pytest.approx((sum((a - mean) ** 2 for a in averages) / 2) ** 0.5)
        assert set(row["accuracy"]) == set(TASK_PATTERNS) and all(0 <= v <= 1 for v in row["accuracy"].values())
        assert 0 <= row["recall"] <= 1 and row["recall_std"] >= 0
        assert 0 < row["trainable"] <= row["total"]
    by = {(r["method"], r["label_noise"]): r for r in summary["results"]}
    assert by["full", 0.0]["trainable"] == by["full", 0.0]["total"]
    assert by["fura", 0.0]["trainable"] < by["fura", 0.0]["total"]
    assert (out / "comparison.png").stat().st_size > 0


def test_one_trained_directory_per_method_and_noise_for_inspection(fast_run):
    from fura.experiments.quickstart.finetune import noise_dir

    _, out, _, _ = fast_run
    for noise in QuickstartSettings.fast().label_noise:
        for method in ("fura", "lora", "full"):
            directory = out / noise_dir(noise) / method
            run = json.loads((directory / "run.json").read_text())
            assert run["method"] == method and run["global_steps"] > 0 and run["seed"] == 0
            assert run["label_noise"] == noise
            assert (directory / ("config.json" if method == "full" else "adapter_config.json")).is_file()
            assert (directory / "loss.png").is_file()


def test_no_warnings_from_the_run(fast_run):
    *_, caught = fast_run
    ours = [w for w in caught if not issubclass(w.category, DeprecationWarning) or "fura" in w.filename]
    assert not ours, [f"{w.category.__name__}: {w.message} ({w.filename}:{w.lineno})" for w in ours]


def test_second_run_reuses_the_cached_base(fast_run):
    root, *_ = fast_run
    assert len(list((root / "cache" / "quickstart").glob("base-*/config.json"))) == 1
    # the cache key ignores what only the fine-tuning depends on
    fast = QuickstartSettings.fast()
    assert fast.model_key() == dataclasses.replace(fast, finetune_epochs=2, label_noise=(0.1,)).model_key()
    assert fast.model_key() != dataclasses.replace(fast, pretrain_steps=10).model_key()


def test_spectral_summary_shows_fura_stays_in_the_pretrained_subspaces(fast_run):
    """The quickstart runs `fura inspect` on each seed-0 run: FuRA's update lies in the pretrained block column
    spaces (to float precision) at full median rank; LoRA's and full fine-tuning's do not."""
    _, out, printed, _ = fast_run
    spectral = json.loads((out / "results.json").read_text())["spectral"]
    assert "fura inspect, label noise 30%" in printed and "out-of-subspace" in printed
    for noise, by_method in spectral.items():
        assert by_method["fura"]["out_of_subspace_max"] <= 1e-6, noise
        assert by_method["fura"]["rank_ratio_median"] == 1.0, noise
        assert by_method["lora"]["out_of_subspace_mean"] > 1e-2, noise
        assert by_method["full"]["out_of_subspace_mean"] > 1e-2, noise
        assert by_method["lora"]["rank_ratio_median"] < 0.5, noise  # rank r=8 of 64..176-wide layers
