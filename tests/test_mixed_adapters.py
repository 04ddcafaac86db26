"""Mixed-adapter batches: ``model(..., adapter_names=[...])`` and ``generate(..., adapter_names=[...])``.

Each row must give exactly what its adapter alone gives (``"__base__"``: the model with adapters
disabled), for FuRA's implicit layouts; explicit-layout adapters and merged models are refused.
"""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

from conftest import tiny_llama
from fura import FuraConfig
from fura.errors import UserError

# Four implicit adapters that differ in frame, fold of S and targets (None: the seven default projections).
ADAPTERS = {
    "one": {},
    "two": {"decomp_mode": "input_one_block"},
    "three": {"s_merged_to": "frozen", "target_modules": ["q_proj", "v_proj", "down_proj"]},
    "four": {"decomp_mode": {"o": "input_one_block", "default": "output_one_block"}, "block_shape": "one"},
}
ROWS = ["one", "two", "__base__", "three", "four", "two", "__base__", "one"]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    peft_model = None
    for name, options in ADAPTERS.items():
        config = FuraConfig(init_weights=False, **options)  # a non-identity start, so each adapter changes the model
        if peft_model is None:
            peft_model = get_peft_model(tiny_llama(), config, adapter_name=name)
        else:
            peft_model.add_adapter(name, config)
    return peft_model.eval()


@pytest.fixture(scope="module")
def ids():
    torch.manual_seed(4)
    return torch.randint(1, 128, (len(ROWS), 9))


def alone(model, name, fn):
    """``fn()`` with only adapter ``name`` active (``"__base__"``: adapters disabled)."""
    if name == "__base__":
        with model.disable_adapter():
            return fn()
    model.base_model.set_adapter(name)
    try:
        return fn()
    finally:
        model.base_model.set_adapter("one")


def test_each_row_equals_its_adapter_alone(model, ids):
    with torch.no_grad():
        mixed = model(input_ids=ids, adapter_names=ROWS).logits
        single = {name: alone(model, name, lambda: model(input_ids=ids).logits) for name in set(ROWS)}
    for row, name in enumerate(ROWS):
        torch.testing.assert_close(mixed[row], single[name][row], rtol=1e-5, atol=1e-6)
    # Every adapter really changes the model, so a row given the wrong adapter would fail above.
    for name in ADAPTERS:
        assert (single[name] - single["__base__"]).abs().max() > 1e-2, name
    assert (single["one"] - single["two"]).abs().max() > 1e-2


def test_generate_with_adapter_names(model, ids):
    prompt = ids[:, :5]
    options = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0, "attention_mask": torch.ones_like(prompt)}
    mixed = model.generate(input_ids=prompt, adapter_names=ROWS, **options)
    single = {name: alone(model, name, lambda: model.generate(input_ids=prompt, **options)) for name in set(ROWS)}
    assert mixed.shape == (len(ROWS), 11)
    for row, name in enumerate(ROWS):
        assert torch.equal(mixed[row], single[name][row]), (row, name)
    assert len({tuple(single[name][0].tolist()) for name in single}) > 2  # the adapters generate differently


def test_mixed_batch_refusals(model, ids):
    with pytest.raises(UserError, match="no FuRA adapter named \\['typo'\\]"):
        model(input_ids=ids[:2], adapter_names=["one", "typo"])
    with pytest.raises(UserError, match="2 entries but the batch has 3 rows"):
        model(input_ids=ids[:3], adapter_names=["one", "two"])
    model.train()
    try:
        with pytest.raises(UserError, match="inference"):
            model(input_ids=ids[:2], adapter_names=["one", "two"])
    finally:
        model.eval()
    model.merge_adapter()
    try:
        with pytest.raises(UserError, match="merged"):
            model(input_ids=ids[:2], adapter_names=["one", "two"])
    finally:
        model.unmerge_adapter()


def test_explicit_layout_is_refused():
    torch.manual_seed(0)
    peft_model = get_peft_model(tiny_llama(), FuraConfig(init_weights=False), adapter_name="implicit").eval()
    peft_model.add_adapter("explicit", FuraConfig(train_position="both", s_merged_to="keep_trainable"))
    ids = torch.randint(0, 128, (2, 6))
    with pytest.raises(UserError, match="\\['explicit'\\] use the explicit L·S·R layout"):
        peft_model(input_ids=ids, adapter_names=["implicit", "explicit"])
    with torch.no_grad():  # the implicit adapter alone still serves mixed batches
        out = peft_model(input_ids=ids, adapter_names=["implicit", "__base__"]).logits
        with peft_model.disable_adapter():
            base = peft_model(input_ids=ids).logits
    torch.testing.assert_close(out[1], base[1], rtol=1e-5, atol=1e-6)
    assert (out[0] - base[0]).abs().max() > 1e-2
