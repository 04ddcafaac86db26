"""`fura eval vlm`: each benchmark's scorer on fixture files in its real format, and the CLI on a tiny Llava."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from fura.errors import UserError
from fura.evaluation import vlm

WORDS = ["<unk>", "<s>", "</s>", "<pad>", "yes", "no", "A", "B", "<image>"]


# ----------------------------------------------------------------------------------------- tiny Llava
def tiny_llava_processor(image_size: int = 28):
    """A LlavaProcessor: word-level tokenizer (``<image>`` is one token), PIL image processor padding to a square."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlavaProcessor, PreTrainedTokenizerFast
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    core = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"},
    )
    image_processor = LlavaImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}, do_pad=True
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )


def tiny_llava(answer: str | None = None, image_size: int = 28, seed: int = 0):
    """A LlavaForConditionalGeneration from configs (2-layer CLIP, 2-layer Llama, 2-layer GELU projector).

    With ``answer``, the language model says that word after any prompt: every text embedding is the same
    vector and no layer writes to the residual stream, so the last position's logits are constant and only
    the head row of ``answer`` is non-zero (the image still runs through the tower and the projector).
    """
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=14,
        projection_dim=16,
    )
    text = LlamaConfig(
        vocab_size=len(WORDS),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        pad_token_id=WORDS.index("<pad>"),
        bos_token_id=WORDS.index("<s>"),
        eos_token_id=WORDS.index("</s>"),
        tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=WORDS.index("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    if answer is not None:
        language = model.model.language_model
        with torch.no_grad():
            language.embed_tokens.weight.fill_(1.0)
            for layer in language.layers:
                layer.self_attn.o_proj.weight.zero_()
                layer.mlp.down_proj.weight.zero_()
            model.lm_head.weight.zero_()
            model.lm_head.weight[WORDS.index(answer)] = 1.0
    return model


def image_file(path: Path, colour: str = "red", size: tuple[int, int] = (40, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def image_base64(colour: str) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 24), colour).save(buffer, format="JPEG")
    return base64.b64encode(buffer.getvalue()).decode()


# ----------------------------------------------------------------------------------------- fixture data
def write_gqa(root: Path) -> None:
    questions = {
        "20968379": {
            "question": "Do the shorts have dark color?",
            "imageId": "n288870",
            "answer": "yes",
            "isBalanced": True,
        },
        "20968380": {"question": "What color is the sky?", "imageId": "n288870", "answer": "blue", "isBalanced": True},
    }
    (root / "gqa").mkdir(parents=True)
    (root / "gqa" / "testdev_balanced_questions.json").write_text(json.dumps(questions))
    image_file(root / "gqa" / "images" / "n288870.jpg")


def write_pope(root: Path) -> None:
    (root / "pope" / "coco").mkdir(parents=True)
    for split, labels in {"random": ["yes", "no"], "popular": ["yes", "yes"], "adversarial": ["no", "no"]}.items():
        lines = [
            {
                "question_id": i + 1,
                "image": "COCO_val2014_000000310196.jpg",
                "text": "Is there a dog in the image?",
                "label": label,
            }
            for i, label in enumerate(labels)
        ]
        (root / "pope" / "coco" / f"coco_pope_{split}.json").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    image_file(root / "pope" / "val2014" / "COCO_val2014_000000310196.jpg")


def write_sqa(root: Path) -> None:
    base = {"task": "closed choice", "subject": "natural science", "lecture": "", "solution": "", "split": "test"}
    problems = {
        "5": base
        | {
            "question": "Which animal is shown?",
            "choices": ["cat", "dog", "owl"],
            "answer": 1,
            "hint": "Look.",
            "image": "image.png",
        },
        "7": base
        | {"question": "Which is a mammal?", "choices": ["frog", "bat"], "answer": 1, "hint": "", "image": "image.png"},
        "9": base | {"question": "No picture here?", "choices": ["yes", "no"], "answer": 0, "hint": "", "image": None},
        "11": base
        | {"question": "Training only", "choices": ["a", "b"], "answer": 0, "hint": "", "image": "image.png"},
    }
    (root / "scienceqa").mkdir(parents=True)
    (root / "scienceqa" / "problems.json").write_text(json.dumps(problems))
    (root / "scienceqa" / "pid_splits.json").write_text(
        json.dumps({"train": ["11"], "val": [], "test": ["5", "7", "9"]})
    )
    for pid in ("5", "7"):
        image_file(root / "scienceqa" / "images" / "test" / pid / "image.png")


def write_textvqa(root: Path) -> None:
    answers = ["nokia"] * 3 + ["Nokia."] + ["samsung"] * 6
    data = {
        "dataset_type": "val",
        "dataset_version": "0.5.1",
        "data": [
            {
                "question": "What is the brand of phone?",
                "image_id": "0054c91397f2fe05",
                "question_id": 34602,
                "answers": answers,
            },
            {
                "question": "how many?",
                "image_id": "00685bc495504d61",
                "question_id": 34603,
                "answers": ["two"] * 2 + ["2"] * 8,
            },
        ],
    }
    prompts = [
        {
            "question_id": "0054c91397f2fe05",
            "image": "0054c91397f2fe05.jpg",
            "text": "what is the brand of phone?\nReference OCR token: NOKIA, 12:30\n" + vlm.SHORT_ANSWER,
        },
        {
            "question_id": "00685bc495504d61",
            "image": "00685bc495504d61.jpg",
            "text": "how many?\nReference OCR token: 2",
        },
    ]
    (root / "textvqa").mkdir(parents=True)
    (root / "textvqa" / "TextVQA_0.5.1_val.json").write_text(json.dumps(data))
    (root / "textvqa" / "llava_textvqa_val_v051_ocr.jsonl").write_text("\n".join(json.dumps(p) for p in prompts))
    for p in prompts:
        image_file(root / "textvqa" / "train_images" / p["image"])


def write_mmbench(root: Path, with_passes: bool = False) -> None:
    import pandas as pd

    rows = [
        {
            "index": 0,
            "question": "What colour?",
            "hint": None,
            "A": "red",
            "B": "blue",
            "C": "green",
            "D": None,
            "answer": "A",
        },
        {
            "index": 1,
            "question": "Which shape?",
            "hint": "Look closely.",
            "A": "cube",
            "B": "ball",
            "C": None,
            "D": None,
            "answer": "B",
        },
    ]
    if with_passes:  # MMBench's own circular copies: index + k * 1e6 with the options shifted
        rows += [
            {
                "index": 1_000_000,
                "question": "What colour?",
                "hint": None,
                "A": "blue",
                "B": "green",
                "C": "red",
                "D": None,
                "answer": "C",
            },
            {
                "index": 1_000_001,
                "question": "Which shape?",
                "hint": "Look closely.",
                "A": "ball",
                "B": "cube",
                "C": None,
                "D": None,
                "answer": "A",
            },
        ]
    for row in rows:
        row.update(category="attribute_recognition", image=image_base64("red"), source="x", split="dev", comment=None)
    (root / "mmbench").mkdir(parents=True)
    pd.DataFrame(rows).to_csv(root / "mmbench" / "mmbench_dev_20230712.tsv", sep="\t", index=False)


def write_vqav2(root: Path) -> None:
    rows = [
        {
            "question_id": 262144000,
            "image": "COCO_test2015_000000262144.jpg",
            "text": "Is the ball flying?\nAnswer the question using a single word or phrase.",
            "category": "default",
        },
        {
            "question_id": 262144001,
            "image": "COCO_test2015_000000262144.jpg",
            "text": "How many players?",
            "category": "default",
        },
    ]
    (root / "vqav2").mkdir(parents=True)
    (root / "vqav2" / "llava_vqav2_mscoco_test-dev2015.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    everything = [*rows, {"question_id": 5, "image": "COCO_test2015_000000000005.jpg", "text": "Other?"}]
    (root / "vqav2" / "llava_vqav2_mscoco_test2015.jsonl").write_text("\n".join(json.dumps(r) for r in everything))
    image_file(root / "vqav2" / "test2015" / "COCO_test2015_000000262144.jpg")


def write_vizwiz(root: Path) -> None:
    records = [
        {"image": "VizWiz_test_00000000.jpg", "question": "What is this?"},
        {"image": "VizWiz_test_00000001.jpg", "question": "What colour is it?"},
    ]
    (root / "vizwiz").mkdir(parents=True)
    (root / "vizwiz" / "test.json").write_text(json.dumps(records))
    for r in records:
        image_file(root / "vizwiz" / "test" / r["image"], "blue")


WRITERS = {
    "gqa": write_gqa,
    "pope": write_pope,
    "sqa": write_sqa,
    "textvqa": write_textvqa,
    "mmbench": write_mmbench,
    "vqav2": write_vqav2,
    "vizwiz": write_vizwiz,
}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    for write in WRITERS.values():
        write(root)
    return root


def _score(name: str, root: Path, responses: list[str]):
    samples = vlm.SPECS[name].load(root / vlm.DEFAULT_DIRS[name], None)
    return samples, *vlm.SPECS[name].score(samples, responses)


# ----------------------------------------------------------------------------------------- prompts
def test_prompt_is_vicuna_v1_with_the_image_first():
    prompt = vlm.build_prompt(vlm.with_suffix("Is it red?", vlm.SHORT_ANSWER))
    assert prompt == (
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions. USER: <image>\nIs it red?\n"
        "Answer the question using a single word or phrase. ASSISTANT:"
    )
    # LLaVA's question files already carry the suffix: it is not added twice
    assert vlm.with_suffix("Q?\n" + vlm.SHORT_ANSWER, vlm.SHORT_ANSWER) == "Q?\n" + vlm.SHORT_ANSWER


# ----------------------------------------------------------------------------------------- GQA
def test_gqa_exact_match_after_rstrip_period_lower(data_dir):
    assert vlm.gqa_answer("Yes.") == "yes" and vlm.gqa_answer("Blue sky..") == "blue sky"
    samples, summary, rows = _score("gqa", data_dir, ["Yes.", "Light blue"])
    assert samples[0].question == "Do the shorts have dark color?\n" + vlm.SHORT_ANSWER
    assert samples[0].image == data_dir / "gqa" / "images" / "n288870.jpg"
    assert [r["correct"] for r in rows] == [True, False]
    assert summary["score"] == 0.5


# ----------------------------------------------------------------------------------------- POPE
@pytest.mark.parametrize(
    ("response", "label"),
    [
        ("Yes", "yes"),
        ("Yes, there is a dog.", "yes"),
        ("No, there is no dog.", "no"),
        ("No", "no"),
        ("There is not a dog", "no"),
        ("Yes. But there is no cat.", "yes"),  # only the first sentence counts
        ("no,", "no"),  # commas are dropped before splitting
        ("Nope", "yes"),
        ("NO", "yes"),  # LLaVA matches the words No/no/not only
    ],
)
def test_pope_yes_no_rule(response, label):
    assert vlm.pope_answer(response) == label


def test_pope_f1_per_split_and_mean(data_dir):
    # random: labels yes,no; popular: yes,yes; adversarial: no,no
    samples, summary, _rows = _score("pope", data_dir, ["Yes", "No", "Yes", "No", "Yes", "No"])
    assert [s.meta["split"] for s in samples] == ["random"] * 2 + ["popular"] * 2 + ["adversarial"] * 2
    splits = summary["splits"]
    assert splits["random"]["f1"] == 1.0 and splits["random"]["accuracy"] == 1.0
    assert splits["popular"]["precision"] == 1.0 and splits["popular"]["recall"] == 0.5
    assert splits["popular"]["f1"] == pytest.approx(2 / 3)
    assert splits["adversarial"]["f1"] == 0.0 and splits["adversarial"]["yes_ratio"] == 0.5  # no true positive
    assert summary["score"] == pytest.approx((1 + 2 / 3 + 0) / 3)
    assert samples[0].question.endswith(vlm.SHORT_ANSWER)


def test_binary_metrics_counts():
    metrics = vlm.binary_metrics(["yes", "yes", "no", "no", "yes"], ["yes", "no", "yes", "no", "yes"])
    assert metrics["precision"] == pytest.approx(2 / 3) and metrics["recall"] == pytest.approx(2 / 3)
    assert metrics["accuracy"] == pytest.approx(3 / 5) and metrics["yes_ratio"] == pytest.approx(3 / 5)


# ----------------------------------------------------------------------------------------- ScienceQA / letters
@pytest.mark.parametrize(
    ("response", "n", "letter"),
    [
        ("B", 3, "B"),
        (" C\n", 3, "C"),
        ("A. cat", 3, "A"),
        ("The answer is B.", 3, "B"),
        ("I think The answer is C", 4, "C"),
        ("D", 3, None),  # beyond the question's options
        ("b", 3, None),
        ("cat", 3, None),
        ("", 2, None),
        ("A dog", 3, None),  # a word, not the letter
    ],
)
def test_option_letter(response, n, letter):
    assert vlm.option_letter(response, n) == letter


def test_sqa_image_test_problems_lettered_and_unparseable_wrong(data_dir):
    samples, summary, rows = _score("sqa", data_dir, ["B", "I am not sure"])
    assert [s.id for s in samples] == ["5", "7"]  # no text-only problem, no training problem
    assert samples[0].question == (
        "Context: Look.\nWhich animal is shown?\nA. cat\nB. dog\nC. owl\n" + vlm.LETTER_ANSWER
    )
    assert samples[1].question.startswith("Which is a mammal?\nA. frog\nB. bat")
    assert samples[0].image == data_dir / "scienceqa" / "images" / "test" / "5" / "image.png"
    assert [r["prediction"] for r in rows] == ["B", None]
    assert summary["score"] == 0.5 and summary["unparseable"] == 1


def test_sqa_takes_llavas_prompt_file_when_present(tmp_path):
    write_sqa(tmp_path)
    record = {
        "id": "7",
        "image": "7/image.png",
        "conversations": [{"from": "human", "value": "<image>\nMammal?\nA. frog\nB. bat"}],
    }
    (tmp_path / "scienceqa" / "llava_test_CQM-A.json").write_text(json.dumps([record]))
    samples = vlm.load_sqa(tmp_path / "scienceqa")
    assert samples[1].question == "Mammal?\nA. frog\nB. bat\n" + vlm.LETTER_ANSWER
    assert samples[0].question.startswith("Context: Look.")  # not in the file: built from problems.json


# ----------------------------------------------------------------------------------------- TextVQA / VQA accuracy
@pytest.mark.parametrize(
    ("raw", "normalised"),
    [
        ("Two", "2"),
        ("The dog.", "dog"),
        ("a red car", "red car"),
        ("dont", "don't"),
        ("couldnt've", "couldn't've"),
        ("Yes!", "yes"),
        ("3.5", "3.5"),
        ("coca-cola", "coca cola"),  # a mark inside a word becomes a space
        ("coca - cola", "coca cola"),  # a mark touching a space is removed
        ("1,000", "1000"),
        ("What's that?", "what 's that"),
        ("ten", "10"),
        ("eleven", "eleven"),
        ("none", "0"),
        ("  Nokia\n", "nokia"),
    ],
)
def test_vqa_answer_normalisation(raw, normalised):
    assert vlm.normalize_vqa_answer(raw) == normalised


def test_vqa_soft_accuracy_leave_one_out():
    def humans(k):
        return ["cat"] * k + ["dog"] * (10 - k)

    assert vlm.vqa_accuracy("cat", humans(1)) == pytest.approx(0.3)
    assert vlm.vqa_accuracy("cat", humans(2)) == pytest.approx(0.6)
    assert vlm.vqa_accuracy("Cat.", humans(3)) == pytest.approx(0.9)
    assert vlm.vqa_accuracy("a cat", humans(4)) == 1.0
    assert vlm.vqa_accuracy("bird", humans(4)) == 0.0


def test_textvqa_matches_annotations_by_image_and_question(data_dir):
    samples, summary, rows = _score("textvqa", data_dir, ["Nokia", "two"])
    assert samples[1].question == "how many?\nReference OCR token: 2\n" + vlm.SHORT_ANSWER
    assert "NOKIA, 12:30" in samples[0].question and samples[0].question.count(vlm.SHORT_ANSWER) == 1
    assert rows[0]["accuracy"] == 1.0  # "nokia" x3 + "Nokia." normalise to the same answer: 4 humans
    assert rows[1]["accuracy"] == 1.0  # "two" -> "2": all 10 humans
    assert summary["score"] == 1.0
    _, summary, _ = _score("textvqa", data_dir, ["samsung galaxy", "3"])
    assert summary["score"] == 0.0


def test_textvqa_question_without_annotation_is_an_error(tmp_path):
    write_textvqa(tmp_path)
    path = tmp_path / "textvqa" / "llava_textvqa_val_v051_ocr.jsonl"
    path.write_text(json.dumps({"question_id": "0054c91397f2fe05", "image": "x.jpg", "text": "other question?"}))
    with pytest.raises(vlm.VLMDataError, match=r"llava_textvqa_val_v051_ocr\.jsonl:1: no annotation"):
        vlm.load_textvqa(tmp_path / "textvqa")


# ----------------------------------------------------------------------------------------- MMBench / CircularEval
def test_circular_shifts_follow_the_right_option():
    shifts = vlm.circular_shifts(["red", "blue", "green"], "A")
    assert shifts == [(["red", "blue", "green"], "A"), (["blue", "green", "red"], "C"), (["green", "red", "blue"], "B")]
    assert vlm.circular_accuracy({0: [True, True, True], 1: [True, False], 2: [False]}) == pytest.approx(1 / 3)


def test_mmbench_rotates_single_rows_and_counts_a_question_only_if_all_passes_right(data_dir):
    samples = vlm.load_mmbench(data_dir / "mmbench")
    assert [s.meta["answer"] for s in samples] == ["A", "C", "B", "B", "A"]  # 3 passes, then 2
    assert samples[0].question == "What colour?\nA. red\nB. blue\nC. green\n" + vlm.LETTER_ANSWER
    assert samples[1].question.startswith("What colour?\nA. blue\nB. green\nC. red")
    assert samples[3].question.startswith("Look closely.\nWhich shape?\nA. cube\nB. ball")
    summary, _rows = vlm.score_mmbench(samples, ["A", "C", "B", "B", "B"])  # question 1: last pass wrong
    assert summary["score"] == 0.5 and summary["total"] == 2
    assert summary["single_pass_accuracy"] == pytest.approx(4 / 5)
    summary, _ = vlm.score_mmbench(samples, ["A"] * 5)  # always the first letter: never all passes
    assert summary["score"] == 0.0
    assert vlm.open_image(samples[0], "mmbench").size == (32, 24)
    assert len(vlm.load_mmbench(data_dir / "mmbench", limit=1)) == 3  # limit counts questions


def test_mmbench_file_with_its_own_circular_passes(tmp_path):
    write_mmbench(tmp_path, with_passes=True)
    samples = vlm.load_mmbench(tmp_path / "mmbench")
    assert [(s.meta["group"], s.meta["answer"]) for s in samples] == [(0, "A"), (1, "B"), (0, "C"), (1, "A")]
    summary, _ = vlm.score_mmbench(samples, ["A", "B", "C", "B"])
    assert summary["score"] == 0.5


# ----------------------------------------------------------------------------------------- submissions
def test_vqav2_and_vizwiz_submission_formats(data_dir):
    samples = vlm.load_vqav2(data_dir / "vqav2")
    assert samples[1].question == "How many players?\n" + vlm.SHORT_ANSWER
    rows = vlm.vqav2_submission(samples, ["Yes.", "Two"])
    assert rows == [{"question_id": 262144000, "answer": "yes"}, {"question_id": 262144001, "answer": "2"}]
    filled = vlm.fill_unanswered(rows, data_dir / "vqav2" / "llava_vqav2_mscoco_test2015.jsonl")
    assert filled[2:] == [{"question_id": 5, "answer": ""}]
    assert vlm.fill_unanswered(rows, data_dir / "missing.jsonl") == rows

    samples = vlm.load_vizwiz(data_dir / "vizwiz")
    assert samples[0].question == (
        "What is this?\nWhen the provided information is insufficient, respond with 'Unanswerable'.\n"
        + vlm.SHORT_ANSWER
    )
    rows = vlm.vizwiz_submission(samples, ["Unanswerable", "The Red"])
    assert rows == [
        {"image": "VizWiz_test_00000000.jpg", "answer": "unanswerable"},
        {"image": "VizWiz_test_00000001.jpg", "answer": "red"},
    ]


# ----------------------------------------------------------------------------------------- errors
def test_clear_errors_for_missing_files_and_bad_records(tmp_path):
    with pytest.raises(vlm.VLMDataError, match=r"testdev_balanced_questions\.json: GQA questions not found"):
        vlm.load_gqa(tmp_path / "gqa")
    write_pope(tmp_path)
    path = tmp_path / "pope" / "coco" / "coco_pope_popular.json"
    path.write_text(json.dumps({"question_id": 1, "image": "x.jpg", "text": "Is there a cat?", "label": "maybe"}))
    with pytest.raises(vlm.VLMDataError, match=r"coco_pope_popular\.json:1: label must be"):
        vlm.load_pope(tmp_path / "pope")
    path.write_text(json.dumps({"question_id": 1, "text": "Is there a cat?", "label": "no"}))
    with pytest.raises(vlm.VLMDataError, match=r"coco_pope_popular\.json:1: missing field 'image'"):
        vlm.load_pope(tmp_path / "pope")
    sample = vlm.Sample(1, "q", tmp_path / "nope.jpg")
    with pytest.raises(vlm.VLMDataError, match=r"gqa sample 1: cannot read .*nope\.jpg"):
        vlm.open_image(sample, "gqa")
    with pytest.raises(UserError, match="unknown"):
        vlm.parse_names("gqa,mme")
    with pytest.raises(UserError, match="--server-scores expects NAME=VALUE"):
        vlm.parse_pairs(["gqa=50"], "--server-scores", vlm.SERVER_SCORED)


# ----------------------------------------------------------------------------------------- generation
class ColourModel(torch.nn.Module):
    """Stands in for Llava in `generate_answers`: answers "yes" when its own row's image is red, else "no"."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.calls = []

    def generate(self, input_ids, attention_mask, pixel_values, **kwargs):
        self.calls.append({"input_ids": input_ids, "attention_mask": attention_mask, **kwargs})
        red = pixel_values[:, 0].mean(dim=(1, 2)) > pixel_values[:, 2].mean(dim=(1, 2))
        token = torch.where(red, WORDS.index("yes"), WORDS.index("no"))[:, None]
        return torch.cat([input_ids, token, torch.full_like(token, WORDS.index("</s>"))], dim=1)


def test_batched_generation_keeps_each_image_with_its_prompt(tmp_path):
    processor = tiny_llava_processor()
    colours = ["red", "blue", "blue", "red", "red"]
    samples = [
        vlm.Sample(i, "q " * (i + 1), image_file(tmp_path / f"{i}.png", colour, (20 + 7 * i, 30)))
        for i, colour in enumerate(colours)
    ]
    model = ColourModel()
    prompts, responses = vlm.generate_answers(model, processor, samples, "test", batch_size=2, max_new_tokens=5)
    assert responses == ["yes" if c == "red" else "no" for c in colours]
    assert all(p.count("<image>") == 1 for p in prompts)
    first = model.calls[0]
    assert first["do_sample"] is False and first["num_beams"] == 1 and first["max_new_tokens"] == 5
    image_id = WORDS.index("<image>")
    assert ((first["input_ids"] == image_id).sum(dim=1) == 4).all()  # (28/14)^2 patches: CLS dropped
    assert first["attention_mask"][0, 0] == 0 and first["attention_mask"][:, -1].all()  # left padding


def test_pad_to_square_check():
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    assert vlm.pads_to_square(tiny_llava_processor().image_processor)
    assert not vlm.pads_to_square(CLIPImageProcessorPil())  # llava-hf's default: resize and centre crop


# ----------------------------------------------------------------------------------------- CLI end to end
@pytest.fixture(scope="module")
def yes_llava(tmp_path_factory):
    path = tmp_path_factory.mktemp("llava")
    tiny_llava(answer="yes").save_pretrained(path)
    tiny_llava_processor().save_pretrained(path)
    return path


def test_cli_end_to_end_on_a_tiny_llava(yes_llava, data_dir, tmp_path):
    from fura.cli import main

    out = tmp_path / "out"
    argv = ["eval", "vlm", "--model", str(yes_llava), "--data-dir", str(data_dir), "--output-dir", str(out)]
    argv += ["--max-new-tokens", "1", "--batch-size", "3", "--server-scores", "vqav2=80,vizwiz=50"]
    assert main(argv) == 0
    gqa = json.loads((out / "gqa.json").read_text())
    assert [p["response"] for p in gqa["predictions"]] == ["yes", "yes"]
    assert all("USER: <image>\n" in p["prompt"] and p["prompt"].endswith(" ASSISTANT:") for p in gqa["predictions"])
    assert gqa["score"] == 0.5
    pope = json.loads((out / "pope.json").read_text())
    assert pope["splits"]["random"]["f1"] == pytest.approx(2 / 3) and pope["splits"]["popular"]["f1"] == 1.0
    assert json.loads((out / "sqa.json").read_text())["score"] == 0.0  # "yes" is no letter
    assert json.loads((out / "mmbench.json").read_text())["score"] == 0.0
    assert json.loads((out / "textvqa.json").read_text())["score"] == 0.0
    vqav2 = json.loads((out / "submissions" / "vqav2.json").read_text())
    assert vqav2[:2] == [{"question_id": 262144000, "answer": "yes"}, {"question_id": 262144001, "answer": "yes"}]
    assert vqav2[2] == {"question_id": 5, "answer": ""}
    vizwiz = json.loads((out / "submissions" / "vizwiz.json").read_text())
    assert vizwiz == [
        {"image": "VizWiz_test_00000000.jpg", "answer": "yes"},
        {"image": "VizWiz_test_00000001.jpg", "answer": "yes"},
    ]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["scores"]["vqav2"] == 0.8 and summary["scores"]["gqa"] == 0.5
    expected = (0.8 + 0.5 + 0.5 + 0 + 0 + pope["score"] + 0) / 7
    assert summary["average"] == pytest.approx(expected)


def test_adapter_directory_loads_over_its_base_and_runs_with_limit(data_dir, tmp_path):
    from peft import PeftModel

    from fura import methods
    from fura.cli import main

    base_dir = tmp_path / "base"
    tiny_llava(seed=1).save_pretrained(base_dir)
    tiny_llava_processor().save_pretrained(base_dir)
    from transformers import LlavaForConditionalGeneration

    base = LlavaForConditionalGeneration.from_pretrained(base_dir)
    torch.manual_seed(0)
    targets = r".*language_model.*\.(q_proj|v_proj|o_proj|up_proj|down_proj)"
    model = methods.build(base, "fura", target_modules=targets, block_shape="closest", init_weights=False).eval()
    adapter = tmp_path / "adapter"
    methods.save(model, adapter)  # no processor in the adapter directory: it comes from the base
    inputs = {"input_ids": torch.tensor([[1, 4, 5, 6]])}
    with torch.no_grad():
        expected = model(**inputs).logits
        with model.disable_adapter():
            assert not torch.allclose(model(**inputs).logits, expected, atol=1e-4)  # the adapter matters
    loaded, processor = vlm.load_model(str(adapter), None, "fp32")
    assert isinstance(loaded, PeftModel) and hasattr(processor, "image_processor")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, expected)

    out = tmp_path / "out"
    argv = ["eval", "vlm", "--model", str(adapter), "--data-dir", str(data_dir), "--benchmarks", "gqa,pope"]
    assert main([*argv, "--limit", "1", "--max-new-tokens", "2", "--output-dir", str(out)]) == 0
    assert json.loads((out / "gqa.json").read_text())["total"] == 1
    assert json.loads((out / "pope.json").read_text())["total"] == 3  # one per split


# ----------------------------------------------------------------------------------------- as LLaVA decodes
def test_prompts_are_tokenized_around_the_image_as_in_llava(spm_llava):
    from transformers import AutoProcessor

    tokenizer = AutoProcessor.from_pretrained(spm_llava).tokenizer
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    prompts = [vlm.build_prompt("What colour is the image? " * 3), vlm.build_prompt("What colour is the image?")]
    batch = vlm.prompt_inputs(tokenizer, prompts, image_id, image_tokens=3)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    for row in range(len(prompts)):
        tokens = tokenizer.convert_ids_to_tokens(ids[row][mask[row] == 1].tolist())
        start = tokens.index("<image>")
        # LLaVA's chunks: "... USER: " ends in "▁", then the image, then "\n..." with its own dummy-prefix "▁"
        assert tokens[start - 1 : start + 5] == ["▁", "<image>", "<image>", "<image>", "▁", "<0x0A>"]
        assert tokens.count("<s>") == 1 and tokens[0] == "<s>"
        assert tokenizer.decode(ids[row], skip_special_tokens=True).endswith("ASSISTANT:")
    assert mask[1, 0] == 0 and mask[:, -1].all()  # the shorter prompt is left padded


def test_paper_decoding_is_fp16_one_question_at_a_time(yes_llava, data_dir, tmp_path, capsys):
    from fura.cli import main

    out = tmp_path / "out"
    argv = ["eval", "vlm", "--model", str(yes_llava), "--data-dir", str(data_dir), "--benchmarks", "gqa"]
    assert main([*argv, "--paper", "--max-new-tokens", "1", "--output-dir", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["dtype"], summary["batch_size"], summary["paper_decoding"]) == ("float16", 1, True)
    assert summary["scores"]["gqa"] == 0.5
    assert main([*argv, "--max-new-tokens", "1", "--output-dir", str(out)]) == 0
    assert json.loads((out / "summary.json").read_text())["batch_size"] == 8  # fura's default: batched
    capsys.readouterr()
    assert main([*argv, "--paper", "--batch-size", "4", "--output-dir", str(out)]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "--paper decodes in fp16 one question at a time" in error
