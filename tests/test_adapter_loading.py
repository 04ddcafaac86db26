"""The load transaction (`AdapterLoading`): it ends with each load, and never reaches another load or model."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel, get_peft_model, set_peft_model_state_dict
from safetensors.torch import load_file, save_file

from conftest import tiny_llama
from fura import AdapterLoadError, FuraConfig, FuraLayer
from fura.tuner.adapter_loading import AdapterLoading

IDS = torch.arange(12).reshape(2, 6)


def _save(model: PeftModel, path) -> dict[str, torch.Tensor]:
    """Save ``model``'s adapter to ``path``; returns the saved tensors."""
    model.save_pretrained(path)
    return load_file(path / "adapter_model.safetensors")


def _damage(path) -> None:
    """Change one value of a saved adapter: every check but the checksum still passes."""
    weights = path / "adapter_model.safetensors"
    tensors = load_file(weights)
    key = next(key for key in tensors if "fura_core" in key)
    tensors[key][0, 0, 0] += 0.25
    save_file(tensors, weights, metadata={"format": "pt"})


def _fura_layers(model) -> int:
    return sum(isinstance(module, FuraLayer) for module in model.modules())


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {key: value.clone() for key, value in model.state_dict().items()}


def _same(model, before: dict[str, torch.Tensor]) -> bool:
    after = model.state_dict()
    return after.keys() == before.keys() and all(torch.equal(after[key], value) for key, value in before.items())


def test_failed_load_then_a_good_load_of_another_adapter_on_a_fresh_model(tmp_path):
    base = tiny_llama()
    _save(get_peft_model(copy.deepcopy(base), FuraConfig(init_weights=False)), tmp_path / "damaged")
    _damage(tmp_path / "damaged")
    other = get_peft_model(copy.deepcopy(base), FuraConfig(init_weights=False, decomp_mode="input_one_block"))
    _save(other, tmp_path / "other")

    refused = copy.deepcopy(base)
    before = _snapshot(refused)
    with pytest.raises(AdapterLoadError, match="checksum"):
        PeftModel.from_pretrained(refused, tmp_path / "damaged")
    assert _fura_layers(refused) == 0 and _same(refused, before)

    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "other")
    torch.testing.assert_close(loaded(IDS).logits, other(IDS).logits, rtol=0, atol=1e-6)
    assert loaded.peft_config["default"].decomp_mode == "input_one_block"
    assert AdapterLoading.pending(loaded.peft_config["default"]) is None  # the load ended with its verification


def test_a_refused_load_on_one_model_leaves_another_models_pending_load_alone(tmp_path):
    base = tiny_llama()
    saved = get_peft_model(copy.deepcopy(base), FuraConfig(init_weights=False))
    tensors = _save(saved, tmp_path / "good")
    _save(saved, tmp_path / "damaged")
    _damage(tmp_path / "damaged")

    # Model A: a load injected but not yet given its tensors.
    first = get_peft_model(copy.deepcopy(base), FuraConfig.from_pretrained(tmp_path / "good"))
    assert AdapterLoading.pending(first.peft_config["default"]).rollback is not None
    first_before = _snapshot(first)

    # Model B: a load refused after its injection is undone, and only B's.
    second = copy.deepcopy(base)
    second_before = _snapshot(second)
    with pytest.raises(AdapterLoadError, match="checksum"):
        PeftModel.from_pretrained(second, tmp_path / "damaged")
    assert _fura_layers(second) == 0 and _same(second, second_before)
    assert _fura_layers(first) > 0 and _same(first, first_before)

    # A's load then completes as its own.
    set_peft_model_state_dict(first, tensors)
    assert AdapterLoading.pending(first.peft_config["default"]) is None
    torch.testing.assert_close(first(IDS).logits, saved(IDS).logits, rtol=0, atol=1e-6)


def test_a_config_shared_by_two_models_rolls_back_only_the_model_it_was_loaded_on(tmp_path):
    base = tiny_llama()
    saved = get_peft_model(copy.deepcopy(base), FuraConfig(init_weights=False))
    tensors = _save(saved, tmp_path / "damaged")
    _damage(tmp_path / "damaged")
    config = FuraConfig.from_pretrained(tmp_path / "damaged")
    first = get_peft_model(copy.deepcopy(base), config)  # the load's injection
    second = get_peft_model(copy.deepcopy(base), config)  # a further use of the config, not a load
    first_before = _snapshot(first)
    with pytest.raises(AdapterLoadError, match="checksum"):
        set_peft_model_state_dict(second, tensors)
    assert _fura_layers(first) > 0 and _same(first, first_before) and list(first.peft_config) == ["default"]
    assert _fura_layers(second) > 0  # nothing of second's to roll back: its injection was no load


@pytest.mark.parametrize("trained", [False, True], ids=["untouched", "trained-since"])
def test_a_refusal_undoes_the_injection_only_while_its_tensors_are_unchanged(tmp_path, trained):
    base = tiny_llama()
    tensors = _save(get_peft_model(copy.deepcopy(base), FuraConfig(init_weights=False)), tmp_path / "adapter")
    model = get_peft_model(copy.deepcopy(base), FuraConfig.from_pretrained(tmp_path / "adapter"))
    layer = next(module for module in model.modules() if isinstance(module, FuraLayer))
    if trained:  # as an optimizer step would: in place
        with torch.no_grad():
            layer.fura_core["default"].add_(0.5)
    broken = {key: (value[..., :-1].contiguous() if "fura_core" in key else value) for key, value in tensors.items()}
    with pytest.raises(AdapterLoadError, match="shape"):
        set_peft_model_state_dict(model, broken)
    if trained:  # the adapter was worked on since: a refused checkpoint must not take it away
        assert list(model.peft_config) == ["default"] and _fura_layers(model) > 0
    else:
        assert list(model.peft_config) == [] and _fura_layers(model) == 0


def test_a_copy_of_a_config_carries_no_load(tmp_path):
    _save(get_peft_model(tiny_llama(), FuraConfig()), tmp_path)
    config = FuraConfig.from_pretrained(tmp_path)
    copied = copy.deepcopy(config)
    assert AdapterLoading.pending(config) is not None
    assert AdapterLoading.pending(copied) is None
    assert copied.to_dict() == config.to_dict()
