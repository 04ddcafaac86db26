"""`fura eval vlm`: LLaVA-1.5's evaluation protocol on seven benchmarks, for transformers' Llava.

Every benchmark is decoded greedily with the ``vicuna_v1`` prompt (system line, ``USER: <image>\\n{question}
ASSISTANT:``) and a short-answer or letter suffix. Five are scored here; VQAv2 test-dev and VizWiz test
have no public answers, so they get the server's submission file instead:

============  ==================================  ============================================================
benchmark     input (under ``--data-dir/<name>``) score
============  ==================================  ============================================================
gqa           testdev_balanced_questions.json,    exact match of ``response.rstrip('.').lower()``
              images/
pope          coco/coco_pope_{random,popular,     yes/no (``no`` when the first sentence has No/no/not);
              adversarial}.json, val2014/         F1 per split, their mean
sqa           problems.json, pid_splits.json,     option letter, image problems of the test split;
              images/test/<pid>/                  unparseable answers are wrong
textvqa       llava_textvqa_val_v051_ocr.jsonl,   VQA soft accuracy (min(1, #humans/3), leave-one-out over 10)
              TextVQA_0.5.1_val.json,             after the EvalAI answer normalisation
              train_images/
mmbench       mmbench_dev_20230712.tsv            CircularEval: a question counts only if every option shift
                                                  is answered right
vqav2         llava_vqav2_mscoco_test-dev2015     submission ``[{"question_id", "answer"}]`` for EvalAI
              .jsonl, test2015/
vizwiz        test.json, test/                    submission ``[{"image", "answer"}]`` for EvalAI
============  ==================================  ============================================================

Prompts are tokenized as LLaVA does, the text around ``<image>`` chunk by chunk
(`fura.vlm.data.tokenize_around_images`). By default questions are decoded in batches of 8 (left padded)
in the model's dtype; ``--paper`` decodes as LLaVA-1.5's scripts do, in fp16 one question at a time, for
like-for-like numbers (batching and bf16 can flip a greedy answer). See docs/vlm_eval.md for the data
layout and the paper's numbers.

The package reads, generates, then scores; each step is a module whose public names are re-exported here:

- :mod:`fura.evaluation.vlm.benchmarks`: the names, directories and instructions, `Sample`, `build_prompt`.
- :mod:`fura.evaluation.vlm.loaders`: each benchmark's files into samples (`load_gqa`, …, `load_vizwiz`).
- :mod:`fura.evaluation.vlm.scoring`: answer parsing (`option_letter`, `normalize_vqa_answer`, …), metrics and the
  per-benchmark scorers.
- :mod:`fura.evaluation.vlm.specs`: `SPECS`, each benchmark's loader and scorer.
- :mod:`fura.evaluation.vlm.predict`: `generate_answers` (on `fura.evaluation.generation`) and `evaluate_benchmark`.
- :mod:`fura.evaluation.vlm.cli`: ``fura eval vlm``'s `add_arguments` and `run`, the model loading and the output.
"""

from __future__ import annotations

from fura.evaluation.vlm.benchmarks import (
    BENCHMARKS,
    COLUMN,
    DEFAULT_DIRS,
    LETTER_ANSWER,
    LETTERS,
    POPE_SPLITS,
    SERVER_SCORED,
    SHORT_ANSWER,
    UNANSWERABLE,
    Sample,
    VLMDataError,
    build_prompt,
    lettered,
    with_suffix,
)
from fura.evaluation.vlm.cli import (
    PAPER_DTYPES,
    SUBMISSION_KEYS,
    add_arguments,
    decoding,
    fill_unanswered,
    load_model,
    pads_to_square,
    parse_names,
    parse_pairs,
    results_table,
    run,
    write_submission,
)
from fura.evaluation.vlm.loaders import (
    circular_shifts,
    load_gqa,
    load_mmbench,
    load_pope,
    load_sqa,
    load_textvqa,
    load_vizwiz,
    load_vqav2,
    read_jsonl,
    textvqa_question,
)
from fura.evaluation.vlm.predict import (
    DEFAULT_BATCH_SIZE,
    evaluate_benchmark,
    generate_answers,
    open_image,
    prompt_inputs,
)
from fura.evaluation.vlm.scoring import (
    ARTICLES,
    CONTRACTIONS,
    NUMBER_WORDS,
    binary_metrics,
    circular_accuracy,
    gqa_answer,
    normalize_vqa_answer,
    option_letter,
    pope_answer,
    score_gqa,
    score_letters,
    score_mmbench,
    score_pope,
    score_sqa,
    score_submission,
    score_textvqa,
    vizwiz_submission,
    vqa_accuracy,
    vqa_soft_scores,
    vqav2_submission,
)
from fura.evaluation.vlm.specs import (
    SPECS,
    Benchmark,
)

__all__ = [
    "ARTICLES",
    "BENCHMARKS",
    "COLUMN",
    "CONTRACTIONS",
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_DIRS",
    "LETTERS",
    "LETTER_ANSWER",
    "NUMBER_WORDS",
    "PAPER_DTYPES",
    "POPE_SPLITS",
    "SERVER_SCORED",
    "SHORT_ANSWER",
    "SPECS",
    "SUBMISSION_KEYS",
    "UNANSWERABLE",
    "Benchmark",
    "Sample",
    "VLMDataError",
    "add_arguments",
    "binary_metrics",
    "build_prompt",
    "circular_accuracy",
    "circular_shifts",
    "decoding",
    "evaluate_benchmark",
    "fill_unanswered",
    "generate_answers",
    "gqa_answer",
    "lettered",
    "load_gqa",
    "load_mmbench",
    "load_model",
    "load_pope",
    "load_sqa",
    "load_textvqa",
    "load_vizwiz",
    "load_vqav2",
    "normalize_vqa_answer",
    "open_image",
    "option_letter",
    "pads_to_square",
    "parse_names",
    "parse_pairs",
    "pope_answer",
    "prompt_inputs",
    "read_jsonl",
    "results_table",
    "run",
    "score_gqa",
    "score_letters",
    "score_mmbench",
    "score_pope",
    "score_sqa",
    "score_submission",
    "score_textvqa",
    "textvqa_question",
    "vizwiz_submission",
    "vqa_accuracy",
    "vqa_soft_scores",
    "vqav2_submission",
    "with_suffix",
    "write_submission",
]
