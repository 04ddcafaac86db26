"""The commonsense record format: template, prompt masking, length cap, validation split, errors naming file+index."""

from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from fura.data.commonsense import (
    IGNORE_INDEX,
    DataFormatError,
    build_datasets,
    generate_prompt,
    load_records,
    tokenize_record,
)

RECORD = {
    "instruction": "Please answer the following question with true or false, question: is the sky blue?",
    "input": "",
    "output": "the correct answer is true",
    "answer": "true",
}


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer whose ids can be checked by hand."""
    words = set()
    pre = pre_tokenizers.Whitespace()
    for text in (generate_prompt(RECORD["instruction"], "some context") + RECORD["output"] + " false",):
        words.update(w for w, _ in pre.pre_tokenize_str(text.lower()))
    vocab = {w: i for i, w in enumerate(["<pad>", "</s>", "<unk>", *sorted(words)])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="</s>", pad_token="<pad>", unk_token="<unk>")


def test_template_is_the_alpaca_prompt_with_and_without_input():
    no_input = generate_prompt("Do X.")
    assert no_input.startswith("Below is an instruction that describes a task. Write a response")
    assert no_input.endswith("### Instruction:\nDo X.\n\n### Response:\n")
    with_input = generate_prompt("Do X.", "ctx")
    assert "paired with an input that provides further context" in with_input
    assert with_input.endswith("### Instruction:\nDo X.\n\n### Input:\nctx\n\n### Response:\n")


def test_prompt_tokens_are_masked_and_response_ends_with_eos(tokenizer):
    encoded = tokenize_record(RECORD | {"input": "some context"}, tokenizer, max_length=512)
    prompt_len = len(tokenizer(generate_prompt(RECORD["instruction"], "some context"))["input_ids"])
    response = tokenizer(RECORD["output"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert encoded["input_ids"][prompt_len:] == response
    assert encoded["labels"][:prompt_len] == [IGNORE_INDEX] * prompt_len
    assert encoded["labels"][prompt_len:] == response
    assert encoded["attention_mask"] == [1] * len(encoded["input_ids"])
    unmasked = tokenize_record(RECORD, tokenizer, max_length=512, train_on_prompt=True)
    assert unmasked["labels"] == unmasked["input_ids"]


def test_length_cap_truncates_and_drops_records_left_without_response(tokenizer, tmp_path):
    prompt_len = len(tokenizer(generate_prompt(RECORD["instruction"]))["input_ids"])
    capped = tokenize_record(RECORD, tokenizer, max_length=prompt_len + 2)
    assert len(capped["input_ids"]) == prompt_len + 2
    assert sum(label != IGNORE_INDEX for label in capped["labels"]) == 2
    path = tmp_path / "train.json"
    path.write_text(json.dumps([RECORD] * 5))
    with pytest.raises(DataFormatError, match=r"train\.json: every training record .* data_args\.max_length"):
        build_datasets(path, tokenizer, max_length=prompt_len, val_size=0)  # nothing left to learn from
    train, val = build_datasets(path, tokenizer, max_length=prompt_len + 1, val_size=0)
    assert val is None and len(train) == 5


def test_validation_split_and_jsonl(tokenizer, tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps(RECORD | {"answer": str(i)}) for i in range(10)) + "\n")
    train, val = build_datasets(path, tokenizer, max_length=512, val_size=3, seed=1)
    assert (len(train), len(val)) == (7, 3)
    assert set(train.column_names) == {"input_ids", "attention_mask", "labels"}


@pytest.mark.parametrize(
    ("records", "message"),
    [
        ([RECORD, {"input": "", "output": "x"}], "record 1: missing field 'instruction'"),
        ([RECORD, RECORD, {"instruction": "q", "output": 3}], "record 2: field 'output' must be a string"),
        ([RECORD, "not an object"], "record 1: expected an object"),
        ([{"instruction": "  ", "output": "x"}], "record 0: field 'instruction' is empty"),
        ({"instruction": "q"}, "expected a JSON list"),
    ],
)
def test_malformed_records_name_file_and_index(tmp_path, records, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(records))
    with pytest.raises(DataFormatError) as err:
        load_records(path)
    assert message in str(err.value)
    assert str(path) in str(err.value)


def test_bad_jsonl_line_and_missing_answer_for_eval(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(RECORD) + "\n{not json\n")
    with pytest.raises(DataFormatError, match=r"bad\.jsonl: line 2 \(record 1\)"):
        load_records(path)
    path = tmp_path / "test.json"
    path.write_text(json.dumps([RECORD, {"instruction": "q", "output": "x"}]))
    with pytest.raises(DataFormatError, match=r"test\.json: record 1: missing field 'answer'"):
        load_records(path, require_answer=True)
    with pytest.raises(DataFormatError, match="not found"):
        load_records(tmp_path / "missing.json")


# ------------------------------------------------------------------------------ the paper's prompt strings
# The released code's strings, spelled out here with their whitespace: training (data_utils.py) has two spaces
# after "request." and a line of 16 spaces; evaluation (run_commonsense_parallel.py) one space and no such line.
PAPER_TRAIN = (
    "<s> Below is an instruction that describes a task. Write a response that appropriately completes the request.  \n"
    "\n### Instruction:\n{}\n                \n### Response:\n"
)
PAPER_EVAL = (
    "<s> Below is an instruction that describes a task. Write a response that appropriately completes the request. \n"
    "\n### Instruction:\n{}\n\n### Response:\n"
)


def test_paper_prompt_trains_on_the_released_strings_with_a_llama_tokenizer(llama_tokenizer):
    tok = llama_tokenizer
    for record, shown in ((RECORD, RECORD["instruction"]), (RECORD | {"input": "ctx"}, "ctx")):  # input wins
        source = PAPER_TRAIN.format(shown)
        encoded = tokenize_record(record, tok, max_length=512, prompt="paper")
        assert encoded["input_ids"] == tok(source + RECORD["output"] + " </s>")["input_ids"]  # tokenized whole
        prompt_len = len(tok(source)["input_ids"])
        assert encoded["labels"][:prompt_len] == [IGNORE_INDEX] * prompt_len
        assert encoded["labels"][prompt_len:] == encoded["input_ids"][prompt_len:]
        assert encoded["input_ids"][0] == tok.bos_token_id and encoded["input_ids"][-1] == tok.eos_token_id
    alpaca = tokenize_record(RECORD, tok, max_length=512)
    assert alpaca["input_ids"] != tokenize_record(RECORD, tok, max_length=512, prompt="paper")["input_ids"]


def test_paper_prompt_evaluates_on_the_released_eval_string(tmp_path):
    from fura.data.commonsense import eval_prompt

    record = RECORD | {"input": "ignored at evaluation"}
    assert eval_prompt(record, "paper") == PAPER_EVAL.format(RECORD["instruction"])
    assert eval_prompt(record) == generate_prompt(RECORD["instruction"], "ignored at evaluation")  # the default
    from fura.evaluation.commonsense import evaluate_tasks

    seen = []

    def generate(prompts, desc):
        seen.extend(prompts)
        return ["the correct answer is true"] * len(prompts)

    tasks, patterns = {"boolq": [record]}, {"boolq": "true|false"}
    results = evaluate_tasks(None, None, tasks, patterns, generate=generate, prompt="paper")
    assert seen == [PAPER_EVAL.format(RECORD["instruction"])] and results["boolq"].accuracy == 1.0
    (tmp_path / "d.json").write_text(json.dumps([RECORD] * 3))
    with pytest.raises(DataFormatError, match="unknown prompt style 'llama'"):
        build_datasets(tmp_path / "d.json", None, val_size=0, prompt="llama")
