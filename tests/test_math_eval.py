"""`fura eval math` on a tiny model and fixture files in each benchmark's record format, plus the record loader.

The tiny model is taught to answer every prompt with ``\\boxed{ 7 }``, so each benchmark's score is
known in advance: the share of its problems whose reference answer is equivalent to 7.
"""

from __future__ import annotations

import json

import pytest
import torch
from datasets import Dataset

import math_tiny
from fura import cli, methods
from fura.data.math import (
    BENCHMARKS,
    PLAIN_SUFFIX,
    MathDataError,
    format_prompt,
    grpo_dataset,
    load_benchmark,
    load_problems,
    to_problem,
    user_message,
)
from fura.evaluation.math import TransformersGenerator, evaluate_benchmark

# Fixture records in the formats of the public releases (see fura.data.math).
MATH500 = [  # HuggingFaceH4/MATH-500
    {
        "problem": "What is $3+4$?",
        "solution": "$3+4=\\boxed{7}$",
        "answer": "7",
        "subject": "Prealgebra",
        "level": 1,
        "unique_id": "test/prealgebra/1.json",
    },
    {
        "problem": "Simplify $\\frac{14}{2}$.",
        "solution": "\\boxed{7}",
        "answer": "7",
        "subject": "Algebra",
        "level": 1,
        "unique_id": "test/algebra/2.json",
    },
    {
        "problem": "Compute $\\frac12+\\frac14$.",
        "solution": "\\boxed{\\frac34}",
        "answer": "\\frac{3}{4}",
        "subject": "Algebra",
        "level": 2,
        "unique_id": "test/algebra/3.json",
    },
    {
        "problem": "Which choice?",
        "solution": "\\boxed{\\text{(C)}}",
        "answer": "\\text{(C)}",
        "subject": "Geometry",
        "level": 3,
        "unique_id": "test/geometry/4.json",
    },
]
AMC23 = [{"id": 0, "question": "Find $x$ if $x-7=0$.", "answer": 7.0}, {"id": 1, "question": "3^3?", "answer": 27.0}]
AIME24 = [  # HuggingFaceH4/aime_2024
    {
        "id": 60,
        "problem": "Find the remainder.",
        "solution": "... \\boxed{7}",
        "answer": "7",
        "url": "u",
        "year": "2024",
    },
    {"id": 61, "problem": "Find $m+n$.", "solution": "... \\boxed{204}", "answer": "204", "url": "u", "year": "2024"},
]
AIME25 = [
    {"problem": "Find $N$.", "answer": "70"},
    {"problem": "Find $k$.", "answer": "7"},
    {"problem": "?", "answer": "8"},
]
EXPECTED = {"math500": 0.5, "amc23": 0.5, "aime24": 0.5, "aime25": 1 / 3}


@pytest.fixture(scope="module")
def bench_dir(tmp_path_factory):
    """One file per benchmark, in the file types the loader accepts (jsonl, json, parquet)."""
    root = tmp_path_factory.mktemp("bench")
    math_tiny.write_jsonl(root / "math500.jsonl", MATH500)
    math_tiny.write_jsonl(root / "amc23.jsonl", AMC23)
    (root / "aime24.json").write_text(json.dumps(AIME24))
    Dataset.from_list(AIME25).to_parquet(str(root / "aime25.parquet"))
    return root


@pytest.fixture(scope="module")
def seven_dir(tmp_path_factory):
    """A tiny Llama (with a chat template) that answers ``\\boxed{ 7 }`` + EOS to any of our prompts."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    tok = math_tiny.tokenizer(chat_template=True)
    net = math_tiny.model(len(tok), seed=1)
    problems = [r["problem"] for r in MATH500 + AIME24 + AIME25] + [r["question"] for r in AMC23]
    prompts = [tok(format_prompt(p, tok), add_special_tokens=False)["input_ids"] for p in problems]
    target = tok("\\boxed{ 7 }", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(60):
        losses = [
            net(input_ids=torch.tensor([p + target]), labels=torch.tensor([[-100] * len(p) + target])).loss
            for p in prompts
        ]
        optimizer.zero_grad()
        torch.stack(losses).mean().backward()
        optimizer.step()
    torch.set_num_threads(threads)
    return math_tiny.save_model_dir(tmp_path_factory.mktemp("seven"), chat_template=True, net=net.eval())


def _eval(argv: list[str]) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert cli.main(["eval", "math", *argv]) == 0
    finally:
        torch.set_num_threads(threads)
    return json.loads(open(argv[argv.index("--output") + 1]).read())


def test_eval_math_cli_scores_every_benchmark_with_its_protocol(seven_dir, bench_dir, tmp_path):
    out = tmp_path / "eval.json"
    result = _eval(
        [
            "--model",
            str(seven_dir),
            "--data-dir",
            str(bench_dir),
            "--max-new-tokens",
            "8",
            "--output",
            str(out),
            "--backend",
            "transformers",
        ]
    )
    scores = result["results"]
    assert list(scores) == ["math500", "amc23", "aime24", "aime25"]
    for name, expected in EXPECTED.items():
        assert scores[name]["accuracy"] == pytest.approx(expected), name
    assert (scores["math500"]["num_samples"], scores["math500"]["temperature"]) == (1, 0.0)  # greedy
    assert (scores["amc23"]["num_samples"], scores["amc23"]["temperature"]) == (1, 0.0)
    for name in ("aime24", "aime25"):  # 8 samples at T=0.6, top_p 0.95, averaged
        assert (scores[name]["num_samples"], scores[name]["temperature"], scores[name]["top_p"]) == (8, 0.6, 0.95)
        assert all(len(row["predicted"]) == 8 for row in scores[name]["problems"])
    first = scores["math500"]["problems"][0]
    assert first["predicted"] == [" 7 "] and first["correct"] == [True]
    assert scores["math500"]["problems"][2]["correct"] == [False]  # 7 is not 3/4
    assert result["max_new_tokens"] == 8


def test_eval_math_respects_the_token_limit(seven_dir, bench_dir, tmp_path):
    # Two new tokens cannot close the box ("\boxed{", "7"): under the boxed grader every answer is missing, every
    # score 0. The paper's grader reads the unclosed "7" all the same (it credits answers without a box).
    argv = ["--model", str(seven_dir), "--data-dir", str(bench_dir), "--benchmarks", "math500"]
    paper = _eval([*argv, "--max-new-tokens", "2", "--output", str(tmp_path / "p.json")])
    assert paper["grader"] == "paper" and paper["results"]["math500"]["accuracy"] == 0.5
    result = _eval(
        [
            *argv,
            "--grader",
            "boxed",
            "--max-new-tokens",
            "2",
            "--output",
            str(tmp_path / "e.json"),
        ]
    )
    assert result["results"]["math500"]["accuracy"] == 0.0
    assert result["results"]["math500"]["problems"][0]["predicted"] == [None]


def test_eval_math_loads_an_adapter_directory(seven_dir, bench_dir, tmp_path):
    """A FuRA adapter dir as --model: its base is read from adapter_config.json and the adapter applied.

    The adapter starts off the identity (``init_weights=False``): it changes the logits, not the answers.
    """
    from transformers import AutoModelForCausalLM

    from fura.loading import load_for_inference

    torch.manual_seed(0)
    adapter = methods.build(AutoModelForCausalLM.from_pretrained(seven_dir), "fura", init_weights=False)
    adapter.save_pretrained(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(seven_dir)
    inputs = torch.tensor([[3, 4, 5, 6]])
    expected = adapter.eval()(inputs).logits
    with adapter.disable_adapter():
        assert not torch.allclose(adapter(inputs).logits, expected, atol=1e-3)  # the adapter matters
    loaded, _ = load_for_inference(tmp_path / "adapter")
    torch.testing.assert_close(loaded(inputs).logits, expected)
    result = _eval(
        [
            "--model",
            str(tmp_path / "adapter"),
            "--data",
            f"amc23={bench_dir / 'amc23.jsonl'}",
            "--benchmarks",
            "amc23",
            "--max-new-tokens",
            "8",
            "--output",
            str(tmp_path / "e.json"),
        ]
    )
    assert result["results"]["amc23"]["accuracy"] == pytest.approx(0.5)


class _Scripted:
    """A generator that returns fixed completions, to check the scoring arithmetic on its own."""

    def __init__(self, completions):
        self.completions = completions
        self.calls = []

    def generate(self, prompts, n, temperature, top_p, max_new_tokens, seed):
        self.calls.append((len(prompts), n, temperature, top_p, max_new_tokens))
        return self.completions


def test_averaged_pass_at_1():
    problems = load_problems_from([{"problem": "p", "answer": "1"}, {"problem": "q", "answer": "\\frac12"}])
    samples = [[r"\boxed{1}"] * 6 + ["no box"] * 2, [r"\boxed{0.5}"] * 2 + [r"\boxed{2}"] * 6]
    generator = _Scripted(samples)
    result = evaluate_benchmark(
        "aime24", problems, generator, math_tiny.tokenizer(), max_new_tokens=2048, grader="boxed"
    )
    assert generator.calls == [(2, 8, 0.6, 0.95, 2048)]
    assert result.accuracy == pytest.approx((6 / 8 + 2 / 8) / 2)


def load_problems_from(records):
    return [to_problem(record, index, "inline") for index, record in enumerate(records)]


def test_transformers_generator_greedy_is_deterministic_and_batched(seven_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(seven_dir)
    model = AutoModelForCausalLM.from_pretrained(seven_dir)
    prompts = [format_prompt(r["problem"], tok) for r in MATH500[:3]]
    one = TransformersGenerator(model, tok, batch_size=1).generate(prompts, 1, 0.0, 1.0, 8, seed=0)
    three = TransformersGenerator(model, tok, batch_size=3).generate(prompts, 1, 0.0, 1.0, 8, seed=0)
    assert one == three  # left padding: batching does not change greedy outputs
    assert [len(row) for row in one] == [1, 1, 1]


# ------------------------------------------------------------------------------ records and prompts
def test_record_formats(bench_dir):
    math500 = load_benchmark("math500", bench_dir / "math500.jsonl")
    assert [p.answer for p in math500] == ["7", "7", "\\frac{3}{4}", "\\text{(C)}"]
    assert load_benchmark("amc23", bench_dir / "amc23.jsonl")[1].problem == "3^3?"
    assert [p.answer for p in load_benchmark("aime24", bench_dir / "aime24.json")] == ["7", "204"]
    assert len(load_benchmark("aime25", bench_dir / "aime25.parquet", limit=2)) == 2


def test_math_train_answer_comes_from_the_last_box_of_the_solution(tmp_path):
    records = [
        {
            "problem": "p1",
            "solution": "First $\\boxed{1}$, then $\\boxed{\\frac{2}{3}}$.",
            "level": "Level 2",
            "type": "Algebra",
        },
        {
            "problem": "p2",
            "solution": "\\boxed{\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}}",
            "level": "Level 5",
            "type": "Precalculus",
        },
    ]
    problems = load_problems(math_tiny.write_jsonl(tmp_path / "train.jsonl", records), limit=7500)
    assert [p.answer for p in problems] == ["\\frac{2}{3}", "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}"]


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"solution": "\\boxed{1}"}, "record 1 has no problem text"),
        ({"problem": "p", "solution": "no box here"}, "record 1 has no answer"),
        ({"problem": "p"}, "record 1 has no answer"),
        ({"problem": "p", "answer": "  "}, "record 1 has no answer"),
    ],
)
def test_malformed_records_name_the_file_and_index(tmp_path, record, message):
    path = math_tiny.write_jsonl(tmp_path / "bad.jsonl", [{"problem": "ok", "answer": "1"}, record])
    with pytest.raises(MathDataError, match=rf"{path}: {message}"):
        load_problems(path)


def test_missing_and_unsupported_files(tmp_path):
    with pytest.raises(MathDataError, match="no such file"):
        load_problems(tmp_path / "absent.jsonl")
    (tmp_path / "data.txt").write_text("x")
    with pytest.raises(MathDataError, match="unsupported file type"):
        load_problems(tmp_path / "data.txt")
    with pytest.raises(MathDataError, match="unknown benchmark"):
        load_benchmark("gsm8k", tmp_path / "absent.jsonl")


def test_prompts_with_and_without_chat_template():
    problem = "What is $1+1$?"
    assert "\\boxed{}" in user_message(problem) and user_message(problem).endswith(problem)
    plain = math_tiny.tokenizer(chat_template=False)
    assert format_prompt(problem, plain) == user_message(problem) + PLAIN_SUFFIX
    chat = math_tiny.tokenizer(chat_template=True)
    assert format_prompt(problem, chat) == f"user : {user_message(problem)} assistant : "
    problems = load_problems_from([{"problem": problem, "answer": "2"}])
    conversational = grpo_dataset(problems, conversational=True)
    assert conversational[0] == {"prompt": [{"role": "user", "content": user_message(problem)}], "answer": "2"}
    assert grpo_dataset(problems, conversational=False)[0]["prompt"] == user_message(problem) + PLAIN_SUFFIX


def test_benchmark_protocols_are_the_papers():
    assert {name: (b.num_samples, b.temperature, b.top_p) for name, b in BENCHMARKS.items()} == {
        "math500": (1, 0.0, 1.0),
        "amc23": (1, 0.0, 1.0),
        "aime24": (8, 0.6, 0.95),
        "aime25": (8, 0.6, 0.95),
    }
