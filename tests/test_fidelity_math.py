"""Track 2 as the paper's released code (issue 19, items 1-5): grader, thinking, prompt, loss and training reward.

Items 6 and 7 (baseline settings, bf16 R and S) are recipe values, pinned to docs/fidelity.md by tests/test_configs.py.
"""

from __future__ import annotations

import argparse

import pytest

import math_tiny
from fura.data.math import PROMPTS, MathProblem, format_prompt, user_message
from fura.evaluation import math as math_eval
from fura.recipes import grpo
from fura.recipes.catalog import RECIPE_DIR
from fura.recipes.config import RecipeError, load_recipe
from fura.rewards import GRADERS, REWARDS, is_correct, is_equiv, is_equiv_reward, paper_is_correct

RL_RECIPES = sorted(p.stem for p in (RECIPE_DIR / "rl").glob("*.yaml"))

# The released rl/boxed.prompt, as the issue quotes it: its backslashes are doubled in the file itself.
PAPER_PROMPT = (
    r"Think for a bit about the question and then put your final answer as a number inside \\boxed{}. "
    r"(i.e. \\boxed{answer here})" + "\nQuestion: {question}"
)


# ----------------------------------------------------------------------------------------- 1. the grader
@pytest.mark.parametrize("gold", ["p - q", "6 - 5i", r"11\sqrt2", r"\text{Evelyn}", "3, 5, 7"])
def test_paper_grader_misses_golds_that_do_not_parse_raw(gold):
    perfect = f"The answer is $\\boxed{{{gold}}}$."
    assert is_correct(perfect, gold)  # fura's boxed grader credits the perfect answer
    assert not paper_is_correct(perfect, gold)  # the paper's does not: the raw gold does not parse


def test_paper_grader_credits_answers_without_a_box_and_grades_the_whole_text():
    assert paper_is_correct("So the final answer is 42.", "42")
    assert not is_correct("So the final answer is 42.", "42")
    assert paper_is_correct(r"Thus $\boxed{\frac{1}{2}}$.", r"\frac{1}{2}")
    assert not paper_is_correct(r"Thus $\boxed{\frac{1}{3}}$.", r"\frac{1}{2}")
    assert not paper_is_correct("", "1") and not paper_is_correct("}{$$\\boxed{", "1")


class _Scripted:
    def __init__(self, completions):
        self.completions = completions

    def generate(self, prompts, n, temperature, top_p, max_new_tokens, seed):
        return self.completions


def test_eval_math_grades_with_the_papers_grader_by_default():
    problems = [MathProblem("p", "p - q"), MathProblem("q", "42")]
    generator = _Scripted([[r"\boxed{p - q}"], ["it is 42"]])
    tok = math_tiny.tokenizer()
    default = math_eval.evaluate_benchmark("math500", problems, generator, tok)
    boxed = math_eval.evaluate_benchmark("math500", problems, generator, tok, grader="boxed")
    assert [row["correct"] for row in default.problems] == [[False], [True]]
    assert [row["correct"] for row in boxed.problems] == [[True], [False]]
    parser = argparse.ArgumentParser()
    math_eval.add_arguments(parser)
    args = parser.parse_args(["--model", "m"])
    assert (args.grader, args.prompt, args.no_thinking) == ("paper", "paper", False)
    assert set(GRADERS) == {"paper", "boxed"}


# ------------------------------------------------------------------------------- 2. thinking, 4. loss
@pytest.mark.parametrize("name", RL_RECIPES)
def test_rl_recipes_train_as_fura_eval_math_evaluates_thinking_on_with_the_grpo_loss(name, tmp_path):
    recipe = load_recipe(f"rl/{name}", {"output_dir": str(tmp_path)}, ["training.bf16=false"])  # a CPU here
    config = grpo.grpo_config(recipe)
    eval_kwargs = math_eval.chat_template_kwargs(no_thinking=False)  # what `fura eval math` passes by default
    assert (config.chat_template_kwargs or {}) == (eval_kwargs or {})
    assert (config.chat_template_kwargs or {}).get("enable_thinking", True) is True  # Qwen3's default: on
    assert config.loss_type == "grpo"  # each sequence's token mean, then the batch mean
    assert recipe["prompt"] == "paper"


# ---------------------------------------------------------------------------------------------- 3. prompt
def test_the_default_prompt_is_the_released_boxed_prompt_and_fura_s_stays_selectable():
    problem = "What is $\\{1, 2\\}$ in {braces}?"
    assert user_message(problem) == PAPER_PROMPT.replace("{question}", problem)
    assert user_message(problem, "fura").startswith("Solve the following math problem.")
    assert set(PROMPTS) == {"paper", "fura"}
    chat = math_tiny.tokenizer(chat_template=True)
    assert format_prompt(problem, chat, prompt="fura") == f"user : {user_message(problem, 'fura')} assistant : "


# ------------------------------------------------------------------------------------- 5. training reward
@pytest.mark.parametrize(
    ("prediction", "reference"),
    [
        ("0.5", r"\frac{1}{2}"),
        (r"\frac12", r"\frac{1}{2}"),
        (r"\dfrac{3}{4}", r"\frac34"),
        (r"\tfrac1{72}", r"\frac{1}{72}"),
        ("3/4", r"\frac{3}{4}"),
        ("x = 5", "5"),
        (r"5\text{ cm}", "5"),
        (r"90^\circ", "90"),
        (r"10\%", "10"),
        (r"\$18.90", "18.90"),
        (r"2\sqrt3", r"2\sqrt{3}"),
        (r"\left( 1, 2 \right)", "(1,2)"),
        (".5", "0.5"),
        (r"\!1\,000", r"1\,000"),
    ],
)
def test_is_equiv_normalises_notation(prediction, reference):
    assert is_equiv(prediction, reference) and is_equiv(reference, prediction)


@pytest.mark.parametrize(
    ("prediction", "reference"),
    [
        ("3", "4"),
        ("0.50", r"\frac{1}{2}"),  # a string check: no arithmetic
        (r"\frac{2}{4}", r"\frac{1}{2}"),
        ("x+y=5", "5"),  # the left side is longer than two characters: kept
        ("1/2/3", r"\frac{1}{2}"),
        (r"1\text{ m}\text{ s}", "1"),  # two units: the original gives up and compares the raw strings
        (None, "1"),
    ],
)
def test_is_equiv_is_a_string_check(prediction, reference):
    assert not is_equiv(prediction, reference)


def test_is_equiv_reward_reads_the_last_box_and_the_recipe_selects_it(tmp_path):
    completions = [r"first \boxed{1}, finally \boxed{\dfrac12}", r"\boxed{0.50}", "1/2 without a box"]
    assert is_equiv_reward(completions, answer=[r"\frac{1}{2}"] * 3) == [1.0, 0.0, 0.0]
    assert REWARDS["math_verify"]([r"\boxed{0.50}"], answer=[r"\frac{1}{2}"]) == [1.0]  # fura's default: math-verify
    assert set(REWARDS) == {"math_verify", "is_equiv"}
    for key, value in (("reward", "exact"), ("prompt", "mine")):
        recipe = load_recipe("rl/fura", {"output_dir": str(tmp_path), "model": str(tmp_path / "absent")})
        recipe[key] = value
        with pytest.raises(RecipeError, match=rf"{key}: '{value}' is not one of"):
            grpo.run(recipe, dry_run=True)  # refused before any model or data is read


def test_grader_gap_benchmark_counts_the_golds_the_paper_grader_misses(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    golds = ["p - q", "42", "3, 5, 7", r"\frac{1}{2}"]
    data = math_tiny.write_jsonl(
        tmp_path / "math500.jsonl", [{"problem": f"p{i}", "answer": g} for i, g in enumerate(golds)]
    )
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "grader_gap.py"
    out = tmp_path / "gap.json"
    done = subprocess.run(
        [sys.executable, str(script), "--data", str(data), "--json", str(out)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert result["boxed"] == {"correct": 4, "missed": []}
    assert result["paper"] == {"correct": 2, "missed": ["p - q", "3, 5, 7"]}
