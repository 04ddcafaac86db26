"""One batched, left-padded ``model.generate`` loop, shared by every evaluator and the quickstart.

A decoder continues the last position of each row, so prompts of different lengths are padded on the
left. The tokenizer is switched to left padding (and given its EOS as pad token when it has none) for
the call only and put back as it was afterwards, also when generation raises: a tokenizer that stays
left padded would pad the next training batch on the wrong side.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from tqdm.auto import tqdm

#: Builds one batch's model inputs from its prompts and their positions in the whole list (the VLM's adds images).
Encoder = Callable[[Sequence[str], range], Mapping[str, torch.Tensor]]


@contextmanager
def left_padding(tokenizer: Any) -> Iterator[Any]:
    """``tokenizer`` left padded, with its EOS as pad token if it has none; its padding side and pad token after."""
    padding_side, pad_token = tokenizer.padding_side, tokenizer.pad_token
    tokenizer.padding_side = "left"
    if pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    try:
        yield tokenizer
    finally:
        tokenizer.padding_side = padding_side
        tokenizer.pad_token = pad_token


def generate_batched(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    batch_size: int | None = 8,
    desc: str | None = None,
    encode: Encoder | None = None,
    add_special_tokens: bool = True,
    **generate_kwargs: Any,
) -> list[str]:
    """The newly generated text of each prompt, decoded without special tokens, in the order of ``prompts``.

    Args:
        model: a transformers or PEFT model with ``generate``.
        tokenizer: its tokenizer (a processor's ``tokenizer`` for a VLM); left padded for the call only.
        prompts: the prompt texts.
        batch_size: prompts per ``generate`` call; None: all in one call.
        desc: the progress bar's label (one step per batch); None: no bar.
        encode: builds a batch's inputs instead of ``tokenizer(prompts, padding=True)`` (the VLM adds pixels);
            floating-point inputs are cast to the model's dtype.
        add_special_tokens: whether the default encoding adds the tokenizer's special tokens (BOS).
        **generate_kwargs: decoding settings for ``model.generate`` (``max_new_tokens``, ``do_sample``,
            ``num_beams``, ``num_return_sequences``, ``eos_token_id``, …); ``pad_token_id`` is the tokenizer's.

    Returns:
        One text per prompt, or ``num_return_sequences`` consecutive texts per prompt.
    """
    device = next(model.parameters()).device
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    size = batch_size or max(len(prompts), 1)
    outputs: list[str] = []
    with left_padding(tokenizer):
        for start in tqdm(range(0, len(prompts), size), desc=desc, unit="batch", leave=False, disable=desc is None):
            texts = prompts[start : start + size]
            if encode is None:
                batch = tokenizer(list(texts), return_tensors="pt", padding=True, add_special_tokens=add_special_tokens)
            else:
                batch = encode(texts, range(start, start + len(texts)))
            batch = {k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in batch.items()}
            with torch.no_grad():
                generated = model.generate(**batch, pad_token_id=tokenizer.pad_token_id, **generate_kwargs)
            outputs.extend(
                tokenizer.batch_decode(generated[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
            )
    return outputs
