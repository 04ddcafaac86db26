"""User errors are one line with exit status 2; bad data and configs are named; dry runs check the data;
hub ids fail fast offline; `fura eval commonsense` discovers tasks and their answer patterns."""

from __future__ import annotations

import json
import random
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import save_tiny_llama_dir
from fura.cli import main
from fura.data.commonsense import DataFormatError, build_datasets, generate_prompt, load_records
from fura.evaluation.commonsense import ANSWER_PATTERNS, discover_tasks, infer_answer_pattern

REPO = Path(__file__).resolve().parents[1]


def records(n: int, seed: int = 0) -> list[dict[str, str]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.sample(("red", "blue", "green", "cat", "dog"), 2)
        answer = rng.choice(("true", "false"))
        out.append({"instruction": f"Is {a} before {b}?", "input": "", "output": f"it is {answer}", "answer": answer})
    return out


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A tiny Llama directory with its tokenizer, 12 training records and a recipe pointing at them."""
    root = tmp_path_factory.mktemp("hardening")
    data = records(12)
    (root / "train.json").write_text(json.dumps(data))
    texts = [generate_prompt(r["instruction"]) + r["output"] + " option1 option2" for r in data]
    save_tiny_llama_dir(root / "model", texts, hidden_size=32)
    recipe = {
        "track": "commonsense",
        "model": str(root / "model"),
        "method": "fura",
        "data": str(root / "train.json"),
        "data_args": {"max_length": 64, "val_size": 2},
        "output_dir": str(root / "out"),
        "training": {"max_steps": 1, "per_device_train_batch_size": 2, "report_to": "none", "save_strategy": "no"},
    }
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return root


def user_error(capsys, argv: list[str]) -> str:
    """Run `fura argv`, check it is a user error (status 2, no traceback, one error line) and return that line."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    return lines[0]


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert re.fullmatch(r"fura \d+\.\d+\.\d+\S*, torch \S+, transformers \S+, peft \S+, trl \S+\n", out), out


def test_missing_config_and_bad_flag_are_one_line(capsys, tmp_path):
    assert user_error(capsys, ["train", "--config", str(tmp_path / "nope.yaml")]).endswith(
        f"recipe {tmp_path / 'nope.yaml'} does not exist"
    )
    line = user_error(capsys, ["train", "--config", "commonsens/fura"])
    assert "neither a file nor a shipped recipe" in line and "commonsense/fura" in line
    with pytest.raises(SystemExit) as exit_:
        main(["train"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and "--config" in err


def test_debug_and_verbose_show_the_traceback(capsys, tmp_path):
    for flags in (["--debug"], ["-v"]):
        assert main([*flags, "train", "--config", str(tmp_path / "nope.yaml")]) == 2
        err = capsys.readouterr().err
        assert "Traceback" in err and "does not exist" in err
    assert main(["train", "--config", str(tmp_path / "nope.yaml"), "--debug"]) == 2  # after the subcommand too
    assert "Traceback" in capsys.readouterr().err


def test_unknown_method_lists_the_choices(capsys, workspace):
    line = user_error(capsys, ["train", "--config", str(workspace / "recipe.yaml"), "--method", "frua"])
    assert "'frua'" in line and "fura, " in line and "lora" in line and "qdora" in line


def test_bad_method_args_and_training_guard_are_one_line(capsys, workspace):
    argv = ["train", "--config", str(workspace / "recipe.yaml"), "--dry-run"]
    line = user_error(capsys, [*argv, "--set", "method_args.rnak=4"])
    assert "method_args" in line and "rnak" in line
    line = user_error(capsys, [*argv, "--set", "training_guard.nonfinite=ignore"])
    assert "training_guard.nonfinite must be one of ['error', 'skip'], got 'ignore'" in line


def test_bad_eval_section_fails_before_training(capsys, workspace, tmp_path):
    """It used to fail only after training, when the evaluation started."""
    argv = ["train", "--config", str(workspace / "recipe.yaml"), "--output-dir", str(tmp_path / "out")]
    line = user_error(capsys, [*argv, "--set", f"eval.dataset_dir={tmp_path}", "--set", "eval.temprature=0"])
    assert "unknown eval keys ['temprature']" in line and "temperature" in line
    line = user_error(capsys, [*argv, "--set", "eval.tasks=[boolq]"])
    assert "eval must be a mapping with dataset_dir" in line
    assert not any((tmp_path / "out").iterdir())  # nothing trained (the directory was checked writable)


def test_missing_model_path_says_it_does_not_exist(capsys, workspace):
    argv = ["train", "--config", str(workspace / "recipe.yaml"), "--model", "/tmp/does/not/exist", "--dry-run"]
    line = user_error(capsys, argv)
    assert "/tmp/does/not/exist: the path does not exist" in line and "Repo id" not in line
    empty = workspace / "empty_dir"
    empty.mkdir(exist_ok=True)
    line = user_error(capsys, [*argv[:3], "--model", str(empty), "--dry-run"])
    assert "holds no config.json" in line


def test_hub_id_offline_fails_fast_with_a_hint(capsys, workspace, monkeypatch):
    argv = ["train", "--config", str(workspace / "recipe.yaml"), "--model", "some-org/some-model", "--dry-run"]
    line = user_error(capsys, argv)  # conftest sets HF_HUB_OFFLINE=1
    assert "HF_HUB_OFFLINE=1" in line and "local directory" in line and "--model" in line
    # No HF_HUB_OFFLINE, but no network: one connection attempt, then the same kind of line.
    import socket

    from fura import loading

    def refuse(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(socket, "create_connection", refuse)
    loading._hub_unreachable.cache_clear()
    try:
        line = user_error(capsys, argv)
    finally:
        loading._hub_unreachable.cache_clear()
    assert "is unreachable" in line and "local directory" in line


@pytest.mark.parametrize(
    "content, expected",
    [
        ("[]".encode("utf-16"), "UTF-16"),
        (json.dumps(records(2)).encode("utf-16-le"), "UTF-16"),
        (bytes(range(256)) * 4, "binary"),
        ('[{"instruction": "caf\xe9"}]'.encode("latin-1"), "not UTF-8"),
    ],
)
def test_binary_or_utf16_data_names_the_file(tmp_path, content, expected):
    path = tmp_path / "data.json"
    path.write_bytes(content)
    with pytest.raises(DataFormatError, match=re.escape(str(path)) + ".*" + expected):
        load_records(path)


def test_val_size_larger_than_the_data_names_key_and_file(tmp_path):
    path = tmp_path / "ten.json"
    path.write_text(json.dumps(records(10)))
    with pytest.raises(DataFormatError, match=r"data_args\.val_size=120 .* " + re.escape(str(path)) + " has only 10"):
        build_datasets(path, tokenizer=None, val_size=120)
    with pytest.raises(DataFormatError, match="fraction"):
        build_datasets(path, tokenizer=None, val_size=1.5)


def test_dry_run_checks_the_data_like_the_run(capsys, workspace):
    """`--dry-run` used to say "valid" here, and the run then failed on the split."""
    argv = ["train", "--config", str(workspace / "recipe.yaml"), "--dry-run", "--set", "data_args.val_size=120"]
    line = user_error(capsys, argv)
    assert "data_args.val_size=120" in line and "train.json has only 12" in line


def test_every_record_longer_than_max_length_is_a_clear_error(capsys, workspace):
    argv = ["train", "--config", str(workspace / "recipe.yaml"), "--dry-run", "--set", "data_args.max_length=4"]
    line = user_error(capsys, argv)
    assert "train.json" in line and "data_args.max_length=4" in line and "num_samples" not in line


def test_answer_patterns_are_inferred_from_the_answers():
    assert infer_answer_pattern(["true", "False", "true"]) == ANSWER_PATTERNS["boolq"]
    assert infer_answer_pattern(["option2", "option1"]) == ANSWER_PATTERNS["winogrande"]
    assert infer_answer_pattern(["answer3", "answer1"]) == ANSWER_PATTERNS["openbookqa"]
    pattern = infer_answer_pattern(["yes", "no", "yes please"])
    assert pattern == r"yes\ please|yes|no"
    assert re.search(pattern, "i say yes please").group(0) == "yes please"


def test_eval_commonsense_discovers_the_quickstart_tasks(capsys, workspace, tmp_path):
    dataset = tmp_path / "dataset"
    tasks = {
        "true_false": [{**r, "answer": r["answer"]} for r in records(3)],
        "fill_blank": [
            {"instruction": "Pick: _ sat.", "input": "", "output": "", "answer": a} for a in ("option1", "option2")
        ],
        "colours": [{"instruction": "Colour?", "input": "", "output": "", "answer": a} for a in ("red", "blue")],
    }
    for task, rows in tasks.items():
        (dataset / task).mkdir(parents=True)
        (dataset / task / "test.json").write_text(json.dumps(rows))
    assert discover_tasks(dataset) == ["colours", "fill_blank", "true_false"]
    out = tmp_path / "eval.json"
    argv = ["eval", "commonsense", "--model", str(workspace / "model"), "--dataset-dir", str(dataset)]
    argv += ["--num-beams", "1", "--max-new-tokens", "2", "--output", str(out), "--answer-pattern", "colours=red|blue"]
    assert main(argv) == 0
    summary = json.loads(out.read_text())
    assert sorted(summary["tasks"]) == ["colours", "fill_blank", "true_false"]
    assert summary["tasks"]["true_false"]["total"] == 3 and summary["tasks"]["fill_blank"]["total"] == 2
    assert summary["answer_patterns"] == {
        "colours": "red|blue",
        "fill_blank": ANSWER_PATTERNS["winogrande"],
        "true_false": ANSWER_PATTERNS["boolq"],
    }
    line = user_error(capsys, [*argv[:6], "--tasks", "true_false,nope"])
    assert "'nope' not found" in line and "true_false" in line


def test_no_tracked_file_mentions_the_private_design_notes():
    name = "DESIGN" + ".md"  # spelt in two parts so that this file does not match itself
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    offenders = [f for f in files if (REPO / f).is_file() and name in (REPO / f).read_text(errors="ignore")]
    assert offenders == []
    assert (REPO / "docs" / "design.md").is_file()


def test_recipes_cp_takes_only_shipped_names_and_never_overwrites(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.yaml").write_text("track: commonsense\n")  # a local file is not a shipped recipe to copy
    assert "not a shipped recipe" in user_error(capsys, ["recipes", "cp", "mine.yaml", "out.yaml"])
    assert not (tmp_path / "out.yaml").exists()
    (tmp_path / "taken.yaml").write_text("mine")
    assert "already exists" in user_error(capsys, ["recipes", "cp", "commonsense/fura", "taken.yaml"])
    assert (tmp_path / "taken.yaml").read_text() == "mine"
