"""`fura.evaluation.generation`: the one batched, left-padded generation loop of the evaluators and the quickstart."""

from __future__ import annotations

import pytest
import torch

from conftest import char_tokenizer, tiny_llama
from fura.evaluation.generation import generate_batched, left_padding

PROMPTS = ["the cat sat on", "hi", "a much longer prompt than the others, by far", "ok then", "x"]


class RecordingModel(torch.nn.Module):
    """Answers each row with the character whose id is its image's mean pixel; records the tokenizer and inputs."""

    def __init__(self, tokenizer, dtype: torch.dtype = torch.float32, fail: bool = False) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1, dtype=dtype))
        self.tokenizer, self.fail, self.calls = tokenizer, fail, []

    def generate(self, input_ids, attention_mask, pad_token_id, pixel_values=None, **kwargs):
        self.calls.append(
            {
                "padding_side": self.tokenizer.padding_side,
                "pad_token": self.tokenizer.pad_token,
                "pad_token_id": pad_token_id,
                "attention_mask": attention_mask,
                "pixel_values": pixel_values,
                **kwargs,
            }
        )
        if self.fail:
            raise RuntimeError("out of memory")
        if pixel_values is None:
            token = torch.full((len(input_ids), 1), self.tokenizer.convert_tokens_to_ids("!"))
        else:
            token = pixel_values.mean(dim=(1, 2, 3)).round().long()[:, None]
        return torch.cat([input_ids, token], dim=1)


def test_left_padding_and_a_pad_token_for_the_call_only():
    tokenizer = char_tokenizer()
    tokenizer.pad_token = None
    assert tokenizer.padding_side == "right"
    model = RecordingModel(tokenizer)
    assert generate_batched(model, tokenizer, PROMPTS, batch_size=2, max_new_tokens=1) == ["!"] * len(PROMPTS)
    assert len(model.calls) == 3
    for call in model.calls:
        assert (call["padding_side"], call["pad_token"]) == ("left", "</s>")
        assert call["pad_token_id"] == tokenizer.convert_tokens_to_ids("</s>") and call["max_new_tokens"] == 1
    assert model.calls[0]["attention_mask"][1, 0] == 0 and model.calls[0]["attention_mask"][:, -1].all()
    assert (tokenizer.padding_side, tokenizer.pad_token) == ("right", None)


def test_tokenizer_state_is_restored_when_generation_raises():
    tokenizer = char_tokenizer()
    tokenizer.pad_token = None
    with pytest.raises(RuntimeError, match="out of memory"):
        generate_batched(RecordingModel(tokenizer, fail=True), tokenizer, PROMPTS)
    assert (tokenizer.padding_side, tokenizer.pad_token) == ("right", None)
    tokenizer.pad_token = "<pad>"
    with pytest.raises(KeyError), left_padding(tokenizer):
        assert (tokenizer.padding_side, tokenizer.pad_token) == ("left", "<pad>")  # an existing pad token is kept
        raise KeyError("boom")
    assert (tokenizer.padding_side, tokenizer.pad_token) == ("right", "<pad>")


@pytest.fixture(scope="module")
def llama():
    return tiny_llama(seed=3)


def test_a_prompt_continues_alike_alone_and_left_padded_beside_a_longer_one(llama):
    tokenizer = char_tokenizer()
    assert tokenizer.padding_side == "right"  # so the padding is generate_batched's doing
    short, long = "ab", "a prompt many times longer"
    alone = generate_batched(llama, tokenizer, [short], max_new_tokens=6, do_sample=False)
    together = generate_batched(llama, tokenizer, [long, short], max_new_tokens=6, do_sample=False)
    assert alone[0].strip()  # it generated something
    assert together[1] == alone[0]
    assert together[0] == generate_batched(llama, tokenizer, [long], max_new_tokens=6, do_sample=False)[0]


def test_batch_size_does_not_change_the_results(llama):
    tokenizer = char_tokenizer()
    greedy = {
        size: generate_batched(llama, tokenizer, PROMPTS, batch_size=size, max_new_tokens=5, do_sample=False)
        for size in (1, 2, None)
    }
    assert greedy[1] == greedy[2] == greedy[None]
    assert len(set(greedy[1])) > 1  # random weights: the prompts get different continuations

    def sampled(size: int) -> list[str]:
        torch.manual_seed(0)
        kwargs = {"do_sample": True, "top_k": 0, "num_return_sequences": 3, "max_new_tokens": 5}
        return generate_batched(llama, tokenizer, PROMPTS[:2], batch_size=size, **kwargs)

    one = sampled(2)
    assert len(one) == 6 and len(set(one)) > 1  # three samples per prompt, consecutive
    assert sampled(2) == one  # the same seed, the same samples


def test_an_encoder_adds_images_cast_to_the_models_dtype_each_with_its_prompt():
    tokenizer = char_tokenizer()
    letters = "vwxyz"
    images = [torch.full((3, 4, 4), float(tokenizer.convert_tokens_to_ids(c))) for c in letters]
    seen: list[range] = []

    def encode(texts, rows):
        seen.append(rows)
        batch = tokenizer(list(texts), return_tensors="pt", padding=True)
        return {**batch, "pixel_values": torch.stack([images[row] for row in rows])}  # float32

    model = RecordingModel(tokenizer, dtype=torch.float64)
    out = generate_batched(model, tokenizer, PROMPTS, batch_size=2, encode=encode, desc="vlm", max_new_tokens=1)
    assert out == list(letters)
    assert seen == [range(0, 2), range(2, 4), range(4, 5)]
    assert all(call["pixel_values"].dtype == torch.float64 for call in model.calls)
    assert model.calls[0]["attention_mask"][1, 0] == 0  # the encoder tokenizes with the left padding in force
