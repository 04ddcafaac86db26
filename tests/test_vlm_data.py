"""LLaVA-1.5 assembly from three parts, and mix665k data: template, labels, image tokens, errors, mixed batches."""

from __future__ import annotations

import json
import re

import pytest
import torch

from fura.data.commonsense import DataFormatError
from fura.vlm.assemble import PartError, assemble, load_projector_state, projector_weights
from fura.vlm.data import (
    IGNORE_INDEX,
    SYSTEM,
    LlavaCollator,
    LlavaDataset,
    load_records,
    modality_length_grouped_indices,
    render,
)
from vlm_tiny import IMAGE_SIZE, colour_image, write_colour_data, write_parts


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(root, parts, llava dir, model, processor)."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("vlm")
    parts = write_parts(root / "parts")
    llava = assemble(**{k: str(v) for k, v in parts.items()}, output=root / "llava", dtype="float32")
    yield root, parts, llava, LlavaForConditionalGeneration.from_pretrained(llava), AutoProcessor.from_pretrained(llava)
    torch.set_num_threads(threads)


def dataset(tiny, records, folder, **kwargs):
    _, _, _, model, processor = tiny
    kwargs.setdefault("max_length", 128)
    return LlavaDataset(
        records, processor.tokenizer, processor.image_processor, folder, model.config.image_seq_length, **kwargs
    )


# ------------------------------------------------------------------------------------------------ assembly
def test_assembled_model_is_llava_15_wired_from_the_three_parts(tiny):
    from transformers import CLIPVisionModel, LlamaForCausalLM

    _, parts, _, model, processor = tiny
    config = model.config
    assert (config.vision_feature_layer, config.vision_feature_select_strategy) == (-2, "default")
    assert config.image_seq_length == (IMAGE_SIZE // 14) ** 2 == 4  # CLS dropped
    assert processor.num_additional_image_tokens == 1 and processor.image_processor.do_pad
    # the projector keys mm_projector.0/2 became linear_1/2, tensor for tensor
    state = torch.load(parts["projector"], weights_only=True)
    projector = model.model.multi_modal_projector
    assert torch.equal(projector.linear_1.weight, state["model.mm_projector.0.weight"])
    assert torch.equal(projector.linear_2.bias, state["model.mm_projector.2.bias"])
    vicuna = LlamaForCausalLM.from_pretrained(parts["language_model"])
    clip = CLIPVisionModel.from_pretrained(parts["vision_tower"])
    old_vocab = vicuna.config.vocab_size
    embed = model.get_input_embeddings().weight
    assert torch.equal(embed[:old_vocab], vicuna.get_input_embeddings().weight)
    assert torch.equal(model.lm_head.weight[:old_vocab], vicuna.lm_head.weight)
    assert torch.equal(
        model.model.language_model.layers[1].mlp.down_proj.weight, vicuna.model.layers[1].mlp.down_proj.weight
    )
    tower_q = model.model.vision_tower.encoder.layers[0].self_attn.q_proj.weight
    assert torch.equal(tower_q, clip.encoder.layers[0].self_attn.q_proj.weight)
    # <image> is a new token whose row sits near the mean of the old rows; the table is padded to a multiple of 64
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert image_id == config.image_token_id >= old_vocab - 1 and embed.shape[0] % 64 == 0
    old = vicuna.get_input_embeddings().weight
    mean = old.mean(0)
    assert (embed[image_id] - mean).norm() < 0.2 * (old - mean).norm(dim=1).mean()
    # the processor expands <image> into exactly as many tokens as the model fills
    batch = processor(
        images=[colour_image("red", __import__("random").Random(0))], text=["USER: <image>\nhi"], return_tensors="pt"
    )
    assert (batch["input_ids"] == image_id).sum() == config.image_seq_length
    assert model(**batch).logits.isfinite().all()


def test_images_are_padded_to_a_square_with_the_mean_colour(tiny):
    from PIL import Image

    processor = tiny[4].image_processor
    wide = Image.new("RGB", (56, 28), (255, 0, 0))
    pixels = processor(images=wide, return_tensors="pt")["pixel_values"][0]
    assert pixels.shape == (3, IMAGE_SIZE, IMAGE_SIZE)
    assert pixels[:, 0].abs().max() < 0.02  # the top band is padding: the mean colour normalizes to ~0
    assert pixels[0, IMAGE_SIZE // 2].min() > 1.5 and pixels[1, IMAGE_SIZE // 2].max() < -1  # the middle is red


def test_projector_formats_and_mismatches(tiny, tmp_path):
    _, parts, *_ = tiny
    from safetensors.torch import save_file

    state = torch.load(parts["projector"], weights_only=True)
    save_file({k.removeprefix("model."): v for k, v in state.items()}, tmp_path / "p.safetensors")
    weights = projector_weights(load_projector_state(tmp_path / "p.safetensors"), "p", 64, 32)
    assert torch.equal(weights["linear_1.weight"], state["model.mm_projector.0.weight"])
    with pytest.raises(PartError, match=r"mm_projector.0.weight has shape \(64, 32\).*need \(64, 48\)"):
        projector_weights(state, "p", 64, 48)
    with pytest.raises(PartError, match=r"mm_projector.2.bias"):
        projector_weights({k: v for k, v in state.items() if "2.bias" not in k}, "p", 64, 32)
    torch.save({"x": object()}, tmp_path / "evil.bin")  # weights_only refuses arbitrary pickles
    with pytest.raises(PartError, match=r"evil.bin: cannot read"):
        load_projector_state(tmp_path / "evil.bin")


def test_each_missing_or_wrong_part_is_named(tiny, tmp_path, capsys):
    from fura.cli import main

    _, parts, *_ = tiny
    good = {k: str(v) for k, v in parts.items()}
    with pytest.raises(PartError, match=r"--language-model .*no config.json"):
        assemble(**{**good, "language_model": str(tmp_path / "nope")}, output=tmp_path / "o")
    with pytest.raises(PartError, match=r"--vision-tower .*CLIP model is expected"):
        assemble(**{**good, "vision_tower": good["language_model"]}, output=tmp_path / "o")
    assert (  # through the CLI: one line on stderr, exit status 2
        main(
            [
                "vlm",
                "assemble",
                "--language-model",
                good["language_model"],
                "--vision-tower",
                good["vision_tower"],
                "--projector",
                str(tmp_path / "mm_projector.bin"),
                "--output",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and re.search(r"--projector .*no such file", error), error
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------------ data
def test_vicuna_v1_template_and_image_moved_to_the_front():
    turns = [
        {"from": "human", "value": "What is this?\n<image>"},
        {"from": "gpt", "value": "A cat."},
        {"from": "human", "value": "Colour?"},
        {"from": "gpt", "value": "Black."},
    ]
    text, spans = render(turns, "r1")
    assert text == f"{SYSTEM} USER: <image>\nWhat is this? ASSISTANT: A cat.</s>USER: Colour? ASSISTANT: Black.</s>"
    assert [text[a:b] for a, b in spans] == [" A cat.</s>", " Black.</s>"]  # from the space: LLaVA's "▁" target


def test_labels_only_on_answers_and_eos_never_on_image_tokens(tiny, tmp_path):
    _, _, _, model, processor = tiny
    tok = processor.tokenizer
    colour_image("red", __import__("random").Random(0)).save(tmp_path / "a.png")
    record = {
        "id": "m",
        "image": "a.png",
        "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is the image?"},
            {"from": "gpt", "value": "red"},
            {"from": "human", "value": "what is two plus two?"},
            {"from": "gpt", "value": "four"},
        ],
    }
    ex = dataset(tiny, [record], tmp_path).tokenize(record)
    image_id = model.config.image_token_id
    assert ex.input_ids.count(image_id) == model.config.image_seq_length
    assert all(label == IGNORE_INDEX for t, label in zip(ex.input_ids, ex.labels) if t == image_id)
    assert tok.convert_ids_to_tokens([t for t, label in zip(ex.input_ids, ex.labels) if label != IGNORE_INDEX]) == [
        "red",
        "</s>",
        "four",
        "</s>",
    ]
    # truncation counts the expanded image tokens; a limit that would cut the image is an error
    image_end = ex.input_ids.index(image_id) + model.config.image_seq_length
    short = dataset(tiny, [record], tmp_path, max_length=image_end + 3).tokenize(record)
    assert (short.input_ids, short.labels) == (ex.input_ids[: image_end + 3], ex.labels[: image_end + 3])
    with pytest.raises(DataFormatError, match=f"record 'm': max_length {image_end - 1} would cut its 4 image tokens"):
        dataset(tiny, [record], tmp_path, max_length=image_end - 1).tokenize(record)


def test_data_errors_name_the_record_and_path(tiny, tmp_path):
    ok = [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]
    with pytest.raises(DataFormatError, match=r"record 'gone': .*missing\.png"):
        dataset(tiny, [{"id": "gone", "image": "missing.png", "conversations": ok}], tmp_path)
    (tmp_path / "broken.png").write_bytes(b"not an image")
    ds = dataset(tiny, [{"id": "bad", "image": "broken.png", "conversations": ok}], tmp_path)
    with pytest.raises(DataFormatError, match=r"record 'bad': cannot read image .*broken\.png"):
        ds[0]
    # a wrong <image> count is refused when the dataset is built, before any record is reached
    colour_image("red", __import__("random").Random(0)).save(tmp_path / "a.png")
    no_token = [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]
    good = {"id": "g", "image": "a.png", "conversations": ok}
    stray = {"id": "t", "conversations": ok}
    missing = {"id": "i", "image": "a.png", "conversations": no_token}
    with pytest.raises(DataFormatError, match=r"2 record.*'t' has no image but 1 <image>.*'i' has an image but 0"):
        dataset(tiny, [good, stray, missing], tmp_path)
    with pytest.raises(DataFormatError, match="record 'x': turn 1 is from 'human'"):
        render([{"from": "human", "value": "q"}, {"from": "human", "value": "q"}], "x")
    (tmp_path / "d.json").write_text(json.dumps([{"id": 3, "turns": []}]))
    with pytest.raises(DataFormatError, match=r"record 0 .*no 'conversations'"):
        load_records(tmp_path / "d.json")


def test_mixed_image_and_text_only_batch(tiny, tmp_path):
    """A text-only row in a batch with images gives the same logits as alone; pixel values only for image rows."""
    model, processor = tiny[3], tiny[4]
    path = write_colour_data(tmp_path, n_image=2, n_text=1, seed=1)
    records = load_records(path)
    ds = dataset(tiny, records, tmp_path)
    collate = LlavaCollator(processor.tokenizer.pad_token_id)
    batch = collate([ds[i] for i in range(3)])
    is_text = ["image" not in r for r in records]
    assert batch["pixel_values"].shape[0] == 2 and sum(is_text) == 1
    with torch.no_grad():
        mixed = model(**batch).logits
        text_row = is_text.index(True)
        alone = model(**collate([ds[text_row]])).logits
    n = alone.shape[1]
    valid = batch["attention_mask"][text_row, :n].bool()
    torch.testing.assert_close(mixed[text_row, :n][valid], alone[0][valid], atol=1e-5, rtol=1e-5)
    assert model(**batch).loss.isfinite()


def test_modality_grouping_gives_single_modality_batches():
    lengths = [5, -3, 7, -2, 9, 4, -8, 6, -1, 3, 2, -4, 8]  # 8 image records, 5 text-only
    order = modality_length_grouped_indices(
        lengths, batch_size=2, world_size=2, generator=torch.Generator().manual_seed(0)
    )
    assert sorted(order) == list(range(len(lengths)))
    megabatches = [order[i : i + 4] for i in range(0, 12, 4)]  # 2 of image records, 1 of text-only, then 1 leftover
    assert sorted(sum(lengths[i] > 0 for i in chunk) for chunk in megabatches) == [0, 4, 4]
    assert all(
        [abs(lengths[i]) for i in chunk] == sorted((abs(lengths[i]) for i in chunk), reverse=True)
        for chunk in megabatches
    )


def test_text_only_batch_with_a_dummy_image_is_unchanged_but_runs_the_projector(tiny, tmp_path):
    """Several processes: a text-only batch gets a masked zero image so every rank runs the vision path (ZeRO-3)."""
    model, processor = tiny[3], tiny[4]
    records = load_records(write_colour_data(tmp_path, n_image=0, n_text=3))
    ds = dataset(tiny, records, tmp_path)
    config = model.config
    dummy = (config.image_token_id, config.image_seq_length, (3, IMAGE_SIZE, IMAGE_SIZE))
    plain = LlavaCollator(processor.tokenizer.pad_token_id)([ds[i] for i in range(3)])
    padded = LlavaCollator(processor.tokenizer.pad_token_id, dummy_image=dummy)([ds[i] for i in range(3)])
    assert "pixel_values" not in plain and padded["pixel_values"].shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert (padded["input_ids"] == config.image_token_id).sum() == config.image_seq_length
    assert padded["labels"][padded["input_ids"] == config.image_token_id].eq(IGNORE_INDEX).all()
    model.zero_grad()
    loss = model(**padded).loss
    loss.backward()
    with torch.no_grad():
        reference = model(**plain)
    torch.testing.assert_close(loss.detach(), reference.loss, atol=1e-6, rtol=1e-6)
    n = plain["input_ids"].shape[1]
    valid = plain["attention_mask"].bool()
    torch.testing.assert_close(
        model(**padded).logits[:, :n][valid].detach(), reference.logits[valid], atol=1e-5, rtol=1e-5
    )
    assert model.model.multi_modal_projector.linear_2.weight.grad is not None
    model.zero_grad(set_to_none=True)


# ------------------------------------------------------------------------------- with Llama's tokenizer
@pytest.fixture(scope="module")
def spm(spm_llava):
    """(model config, tokenizer, image processor) of the tiny LLaVA with a sentencepiece (Llama) tokenizer."""
    from transformers import AutoConfig, AutoProcessor

    processor = AutoProcessor.from_pretrained(spm_llava)
    return AutoConfig.from_pretrained(spm_llava), processor.tokenizer, processor.image_processor


def _tokenize(spm, tmp_path, conversations):
    config, tokenizer, image_processor = spm
    colour_image("red", __import__("random").Random(0)).save(tmp_path / "a.png")
    record = {"id": "r", "image": "a.png", "conversations": conversations}
    ds = LlavaDataset([record], tokenizer, image_processor, tmp_path, config.image_seq_length, max_length=256)
    return ds.tokenize(record), tokenizer


def test_the_lone_space_token_before_a_digit_answer_is_trained_as_in_llava(spm, tmp_path):
    turns = [
        {"from": "human", "value": "<image>\nWhat year is it?"},
        {"from": "gpt", "value": "2013"},
        {"from": "human", "value": "What colour is the image?"},
        {"from": "gpt", "value": "red"},
    ]
    example, tokenizer = _tokenize(spm, tmp_path, turns)
    targets = tokenizer.convert_ids_to_tokens([t for t in example.labels if t != IGNORE_INDEX])
    # Llama's tokenizer: ": 2013" is ":", "▁", "2", "0", "1", "3"; LLaVA's mask starts at the "▁"
    assert targets[:6] == ["▁", "2", "0", "1", "3", "</s>"]
    assert tokenizer.convert_tokens_to_string(targets[6:]).strip() == "red</s>"
    assert targets[6].startswith("▁")  # a word answer's first token carries its own "▁"
    # nothing of the prompt is a target: the token before the first target is the ":" of "ASSISTANT:"
    first = next(i for i, t in enumerate(example.labels) if t != IGNORE_INDEX)
    assert tokenizer.convert_ids_to_tokens(example.input_ids[first - 1]) == ":"


def test_text_around_the_image_is_tokenized_in_chunks_as_in_llava(spm, tmp_path):
    config = spm[0]
    turns = [{"from": "human", "value": "What colour is the image?\n<image>"}, {"from": "gpt", "value": "red"}]
    example, tokenizer = _tokenize(spm, tmp_path, turns)
    image_id = config.image_token_id
    start = example.input_ids.index(image_id)
    end = start + config.image_seq_length
    around = tokenizer.convert_ids_to_tokens([example.input_ids[start - 1], *example.input_ids[end : end + 2]])
    assert around == ["▁", "▁", "<0x0A>"]  # LLaVA's "USER: " chunk, the image, then "\n..." with its dummy prefix
    whole = tokenizer(f"{SYSTEM} USER: <image>\nWhat")["input_ids"]
    after = whole[whole.index(image_id) + 1]
    assert tokenizer.convert_ids_to_tokens(after) == "<0x0A>"  # tokenizing the whole prompt loses that "▁"
    assert example.input_ids[0] == tokenizer.bos_token_id and example.input_ids.count(tokenizer.bos_token_id) == 1
