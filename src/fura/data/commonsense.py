"""The LLM-Adapters commonsense data: records, the paper's prompt template, tokenization with a masked prompt.

A record is ``{"instruction", "input", "output", "answer"}`` (``commonsense_170k.json`` and every
``dataset/<task>/test.json`` use it). Training sees ``template(instruction, input) + output + EOS`` with
the prompt tokens masked out of the loss; evaluation generates after the template and parses the answer.

Two prompt styles (`PROMPT_STYLES`, a recipe's ``data_args.prompt``, ``fura eval commonsense --prompt``):

- ``alpaca`` (the default): the plain Alpaca template, the same for training and evaluation; prompt and
  response are tokenized separately, so the mask boundary is exact for any tokenizer.
- ``paper``: the released code's strings, byte for byte. Training (``commonsense/src/utils/data_utils.py``)
  prefixes a literal ``"<s> "``, has two spaces after "request." and a line of 16 spaces before
  ``### Response:``, uses the record's ``input`` in place of its instruction when there is one, and
  appends ``" " + EOS`` to the output; the text is tokenized whole and the prompt's own token count is
  masked. Evaluation (``run_commonsense_parallel.py``) uses another string: one space after "request."
  and no line of spaces.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from fura.data import load_hub_dataset, read_text_file
from fura.errors import UserError

logger = logging.getLogger(__name__)

# The Alpaca prompt the paper's commonsense recipe trains and evaluates with (LLM-Adapters).
PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
# The released code's training and evaluation prompts (see the module docstring), whitespace included.
PAPER_TRAIN_PROMPT = (
    "<s> Below is an instruction that describes a task. Write a response that appropriately completes the request.  "
    "\n\n### Instruction:\n{instruction}\n" + " " * 16 + "\n### Response:\n"
)
PAPER_EVAL_PROMPT = (
    "<s> Below is an instruction that describes a task. Write a response that appropriately completes the request. "
    "\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
PROMPT_STYLES = ("alpaca", "paper")
IGNORE_INDEX = -100


class DataFormatError(UserError):
    """A data file or record does not follow the commonsense record format; the message names file and index."""


def generate_prompt(instruction: str, input: str | None = None) -> str:
    """The prompt up to and including ``### Response:\\n``; the model's answer follows it."""
    if input:
        return PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return PROMPT_NO_INPUT.format(instruction=instruction)


def eval_prompt(record: dict[str, str], style: str = "alpaca") -> str:
    """The evaluation prompt of a record in a `PROMPT_STYLES` style; the model's answer follows it."""
    if style == "paper":
        return PAPER_EVAL_PROMPT.format(instruction=record["instruction"])
    return generate_prompt(record["instruction"], record["input"])


def check_prompt_style(style: str, where: str) -> None:
    if style not in PROMPT_STYLES:
        raise DataFormatError(f"{where}: unknown prompt style {style!r}; choose from {', '.join(PROMPT_STYLES)}")


def validate_record(record: Any, index: int, source: str, require_answer: bool = False) -> dict[str, str]:
    """Check one record and return it normalized (``input`` defaults to ""); raise naming ``source`` and ``index``."""
    where = f"{source}: record {index}"
    if not isinstance(record, dict):
        raise DataFormatError(
            f"{where}: expected an object with instruction/input/output/answer, got {type(record).__name__}"
        )
    required = ("instruction", "answer") if require_answer else ("instruction", "output")
    for key in required:
        if key not in record or record[key] is None:
            raise DataFormatError(f"{where}: missing field {key!r} (has {sorted(record)})")
    out: dict[str, str] = {}
    for key in ("instruction", "input", "output", "answer"):
        value = record.get(key)
        if value is None:
            value = ""
        if not isinstance(value, str):
            raise DataFormatError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
        out[key] = value
    if not out["instruction"].strip():
        raise DataFormatError(f"{where}: field 'instruction' is empty")
    return out


def _read_local(path: Path) -> list[Any]:
    text = read_text_file(path, DataFormatError)
    if path.suffix == ".jsonl":
        rows = []
        for line_no, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise DataFormatError(f"{path}: line {line_no} (record {len(rows)}) is not valid JSON: {err}") from err
        return rows
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataFormatError(f"{path}: not valid JSON: {err}") from err
    if not isinstance(data, list):
        raise DataFormatError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    return data


def load_records(source: str | Path, split: str = "train", require_answer: bool = False) -> list[dict[str, str]]:
    """Read and validate records from a local ``.json``/``.jsonl`` file or a ``datasets`` id (its ``split``)."""
    path = Path(source)
    if path.is_file():
        rows: Iterable[Any] = _read_local(path)
    elif path.suffix in (".json", ".jsonl") or path.exists():
        raise DataFormatError(f"{path}: data file not found (or not a file)")
    else:
        rows = load_hub_dataset(source, split, "data", DataFormatError)
    return [validate_record(row, i, str(source), require_answer) for i, row in enumerate(rows)]


def tokenize_record(
    record: dict[str, str], tokenizer, max_length: int, train_on_prompt: bool = False, prompt: str = "alpaca"
) -> dict:
    """Token ids of prompt + output + EOS, with the prompt masked in ``labels`` and the total capped at ``max_length``.

    ``alpaca``: prompt and response are tokenized separately and concatenated, so the mask boundary is
    exact for any tokenizer (no merge across the boundary). ``paper``: as the released code, see the
    module docstring.
    """
    if prompt == "paper":
        source = PAPER_TRAIN_PROMPT.format(instruction=record["input"] or record["instruction"])
        target = f"{record['output'].replace('</s>', '')} {tokenizer.eos_token}"
        prompt_ids = tokenizer(source)["input_ids"]
        whole = tokenizer(source + target)["input_ids"]
        response_ids = whole[len(prompt_ids) :]
    else:
        prompt_ids = tokenizer(generate_prompt(record["instruction"], record["input"]), add_special_tokens=True)[
            "input_ids"
        ]
        response_ids = tokenizer(record["output"], add_special_tokens=False)["input_ids"]
        if tokenizer.eos_token_id is not None:
            response_ids = [*response_ids, tokenizer.eos_token_id]
    input_ids = (prompt_ids + response_ids)[:max_length]
    labels = list(input_ids) if train_on_prompt else ([IGNORE_INDEX] * len(prompt_ids) + response_ids)[:max_length]
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}


def build_datasets(
    source: str | Path,
    tokenizer,
    max_length: int = 2048,
    val_size: int | float = 120,
    seed: int = 42,
    train_on_prompt: bool = False,
    split: str = "train",
    prompt: str = "alpaca",
):
    """Tokenized (train, validation) ``datasets.Dataset`` pair; validation is None when ``val_size`` is 0.

    Records whose response is cut away entirely by ``max_length`` carry no loss and are dropped (logged);
    if that leaves nothing to train on, or ``val_size`` leaves no training records, a `DataFormatError`
    names the key (``data_args.*``) and the file.
    """
    import datasets

    check_prompt_style(prompt, "data_args.prompt")
    records = load_records(source, split=split)
    if not records:
        raise DataFormatError(f"{source}: no records")
    _check_val_size(val_size, len(records), source)
    dataset = datasets.Dataset.from_list(records)
    if val_size:
        parts = dataset.train_test_split(test_size=val_size, seed=seed, shuffle=True)
        train, val = parts["train"], parts["test"]
    else:
        train, val = dataset, None

    def encode(ds, name):
        if ds is None:
            return None
        tokenized = ds.map(
            lambda r: tokenize_record(r, tokenizer, max_length, train_on_prompt, prompt),
            remove_columns=ds.column_names,
            desc="tokenizing",
        )
        kept = tokenized.filter(lambda r: any(label != IGNORE_INDEX for label in r["labels"]), desc="length cap")
        if len(kept) < len(tokenized):
            logger.warning(
                "%d of %d records dropped: max_length=%d leaves no response tokens",
                len(tokenized) - len(kept),
                len(tokenized),
                max_length,
            )
        if not len(kept):
            raise DataFormatError(
                f"{source}: every {name} record is longer than data_args.max_length={max_length} tokens up to its "
                "response, so none has a token to learn from; raise data_args.max_length"
            )
        return kept

    return encode(train, "training"), encode(val, "validation")


def _check_val_size(val_size: Any, count: int, source: str | Path) -> None:
    """``data_args.val_size`` must leave at least one training record of the ``count`` in ``source``."""
    where = f"data_args.val_size={val_size!r}"
    if isinstance(val_size, bool) or not isinstance(val_size, (int, float)) or val_size < 0:
        raise DataFormatError(f"{where}: expected a record count (int >= 0) or a fraction in (0, 1)")
    if isinstance(val_size, float) and not val_size < 1:
        raise DataFormatError(f"{where}: a float is a fraction of the records and must be below 1")
    size = val_size if isinstance(val_size, int) else int(-(-val_size * count // 1))
    if val_size and size >= count:
        raise DataFormatError(
            f"{where} asks for {size} validation records but {source} has only {count}; "
            "lower data_args.val_size (0: no validation split)"
        )
