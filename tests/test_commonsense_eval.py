"""`fura eval commonsense`: every answer pattern, and the CLI on a tiny model with fixture files in the real format."""

from __future__ import annotations

import json
import re

import pytest
import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from fura.cli import main
from fura.evaluation.commonsense import ANSWER_PATTERNS, TASKS, GenerationSettings, extract_answer

CANDIDATES = {
    "boolq": ("true", "false"),
    "piqa": ("solution1", "solution2"),
    "social_i_qa": ("answer1", "answer2", "answer3", "answer4", "answer5"),
    "ARC-Challenge": ("answer1", "answer2", "answer3", "answer4", "answer5"),
    "ARC-Easy": ("answer1", "answer2", "answer3", "answer4", "answer5"),
    "openbookqa": ("answer1", "answer2", "answer3", "answer4", "answer5"),
    "hellaswag": ("ending1", "ending2", "ending3", "ending4"),
    "winogrande": ("option1", "option2"),
}


def test_the_eight_tasks_of_the_paper():
    assert set(TASKS) == set(CANDIDATES)


@pytest.mark.parametrize("task", TASKS)
def test_each_candidate_is_found(task):
    for candidate in CANDIDATES[task]:
        assert extract_answer(ANSWER_PATTERNS[task], f"the correct answer is {candidate}") == candidate
        assert extract_answer(ANSWER_PATTERNS[task], f"  The Correct Answer Is {candidate.upper()}.\n") == candidate


@pytest.mark.parametrize("task", TASKS)
def test_several_candidates_first_wins_and_none_gives_empty(task):
    first, second = CANDIDATES[task][-1], CANDIDATES[task][0]
    assert extract_answer(ANSWER_PATTERNS[task], f"{first} because {second} is wrong") == first
    assert extract_answer(ANSWER_PATTERNS[task], f"not {second}; it is {first}") == second
    assert extract_answer(ANSWER_PATTERNS[task], "i do not know") == ""
    assert extract_answer(ANSWER_PATTERNS[task], "") == ""


def test_out_of_range_candidates_do_not_match():
    assert extract_answer(ANSWER_PATTERNS["hellaswag"], "ending5") == ""
    assert extract_answer(ANSWER_PATTERNS["winogrande"], "option3") == ""
    # like LLM-Adapters, the pattern is not anchored: "answer12" still reads as answer1
    assert extract_answer(ANSWER_PATTERNS["ARC-Easy"], "answer12") == "answer1"


def test_generation_defaults_are_the_papers():
    settings = GenerationSettings()
    assert (settings.num_beams, settings.temperature, settings.top_p, settings.top_k, settings.max_new_tokens) == (
        4,
        0.1,
        0.75,
        40,
        256,
    )
    assert settings.generate_kwargs() == {"num_beams": 4, "max_new_tokens": 256, "do_sample": False}
    sampled = GenerationSettings(do_sample=True).generate_kwargs()
    assert sampled["temperature"] == 0.1 and sampled["top_p"] == 0.75 and sampled["top_k"] == 40


@pytest.fixture(scope="module")
def always_true_model(tmp_path_factory):
    """A tiny Llama that answers "true true …" to anything, by construction.

    Every embedding row is the same vector and every layer adds zero to the residual stream, so the
    final hidden state is constant; only the head row of "true" is non-zero, so it wins every step.
    """
    words = ["true", "<pad>", "</s>", "<unk>", "false", "solution1", "solution2", "question", "the", "correct"]
    core = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    config = LlamaConfig(
        vocab_size=len(words),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        pad_token_id=1,
        eos_token_id=2,
        bos_token_id=2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.model.embed_tokens.weight.fill_(1.0)
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.lm_head.weight.zero_()
        model.lm_head.weight[words.index("true")] = 1.0
    path = tmp_path_factory.mktemp("model")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("dataset")
    records = {
        "boolq": [("question true or false", "true"), ("question", "false"), ("the question", "true")],
        "piqa": [("question solution1 or solution2", "solution1"), ("question", "solution2")],
    }
    for task, items in records.items():
        (root / task).mkdir()
        rows = [{"instruction": q, "input": "", "output": f"the correct answer is {a}", "answer": a} for q, a in items]
        (root / task / "test.json").write_text(json.dumps(rows))
    return root


def _eval(model_path, dataset_dir, out, *extra):
    argv = [
        "eval",
        "commonsense",
        "--model",
        str(model_path),
        "--dataset-dir",
        str(dataset_dir),
        "--tasks",
        "boolq,piqa",
        "--max-new-tokens",
        "3",
        "--output",
        str(out),
        *extra,
    ]
    assert main(argv) == 0
    return json.loads(out.read_text())


def test_cli_on_base_model_parses_expected_answers(always_true_model, dataset_dir, tmp_path):
    result = _eval(always_true_model, dataset_dir, tmp_path / "r.json", "--num-beams", "2", "--batch-size", "2")
    boolq, piqa = result["predictions"]["boolq"], result["predictions"]["piqa"]
    assert [p["response"].split() for p in boolq] == [["true"] * 3] * 3
    assert [p["predicted"] for p in boolq] == ["true", "true", "true"]
    assert [p["predicted"] for p in piqa] == ["", ""]  # no candidate in the output: counted wrong
    assert result["tasks"]["boolq"] == {"accuracy": pytest.approx(2 / 3), "correct": 2, "total": 3}
    assert result["tasks"]["piqa"]["accuracy"] == 0.0
    assert result["average"] == pytest.approx(1 / 3)
    assert result["generation"]["num_beams"] == 2


def test_cli_on_adapter_directory_and_limit(always_true_model, dataset_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from fura import methods
    from fura.loading import load_for_inference

    # o_proj and down_proj are zero in this model (FuRA has no spectrum there), so only lm_head's
    # adapter reaches the logits: a random non-identity one rescales the "true" logit but keeps it first
    targets = ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "lm_head"]
    base = AutoModelForCausalLM.from_pretrained(always_true_model)
    torch.manual_seed(0)
    model = methods.build(base, "fura", target_modules=targets, init_weights=False)
    adapter = tmp_path / "adapter"
    methods.save(model, adapter)
    inputs = torch.tensor([[7, 8, 9]])
    expected = model.eval()(inputs).logits
    with model.disable_adapter():
        base_logits = model(inputs).logits
    assert not torch.allclose(expected, base_logits, atol=1e-3)  # the adapter matters
    loaded, _ = load_for_inference(adapter)
    torch.testing.assert_close(loaded(inputs).logits, expected)
    result = _eval(adapter, dataset_dir, tmp_path / "r.json", "--limit", "2", "--num-beams", "1")
    assert result["tasks"]["boolq"] == {"accuracy": 0.5, "correct": 1, "total": 2}
    assert result["tasks"]["piqa"]["total"] == 2


def test_cli_errors_on_missing_task_file_and_unknown_task(always_true_model, dataset_dir, tmp_path, capsys):
    argv = ["eval", "commonsense", "--model", str(always_true_model), "--dataset-dir", str(dataset_dir)]
    assert main([*argv, "--tasks", "hellaswag"]) == 2
    assert re.search(r"hellaswag/test\.json: test file of task 'hellaswag' not found", capsys.readouterr().err)
    assert main([*argv, "--tasks", "nope"]) == 2
    assert "task 'nope' not found" in capsys.readouterr().err
