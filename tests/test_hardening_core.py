"""Hardening of the tuner: nothing half-applied, no NaN saved or merged, no silent misload, strict config values."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors import safe_open
from torch import nn

import fura.blocks
from conftest import tiny_llama
from fura import AdapterLoadError, FuraConfig, FuraLayer
from fura.errors import UserError
from fura.tuner.checks import NonFiniteAdapterError
from fura.tuner.config import LAYOUT_KEYS


def _state(model: nn.Module) -> dict:
    """Everything a failed call must leave alone: tensors, requires_grad, the module tree and attribute names."""
    return {
        "tensors": {key: value.clone() for key, value in model.state_dict().items()},
        "requires_grad": {name: param.requires_grad for name, param in model.named_parameters()},
        "tree": [(name, type(module).__name__) for name, module in model.named_modules()],
        "attributes": {name: sorted(vars(module)) for name, module in model.named_modules()},
    }


def _assert_same(model: nn.Module, before: dict) -> None:
    after = _state(model)
    assert after["tree"] == before["tree"]
    assert after["attributes"] == before["attributes"]
    assert after["requires_grad"] == before["requires_grad"]
    assert after["tensors"].keys() == before["tensors"].keys()
    for key, value in before["tensors"].items():
        torch.testing.assert_close(after["tensors"][key], value, rtol=0, atol=0, equal_nan=True, msg=f"{key} changed")


def _trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# (n, b) = (4, 16) cuts the 64 inputs of the attention and gate/up projections but not down_proj's 160.
HALF_FITTING = [FuraConfig(block_shape="head"), FuraConfig(block_shape=(4, 16))]


@pytest.mark.parametrize("config", HALF_FITTING, ids=["head", "4x16"])
def test_failed_injection_leaves_the_model_as_it_was(config, monkeypatch):
    base = tiny_llama()
    before = _state(base)
    with monkeypatch.context() as patch:  # every layer's spec is checked before the first (costly) factorization
        patch.setattr(fura.blocks, "block_svd", lambda *a, **k: pytest.fail("factorized before checking all layers"))
        with pytest.raises(UserError, match=r"mlp\.down_proj: .*dimension 160"):
            get_peft_model(base, config)
    _assert_same(base, before)
    # A valid config afterwards gives the normal trainable set, not every base parameter.
    assert _trainable(get_peft_model(base, FuraConfig())) == _trainable(get_peft_model(tiny_llama(), FuraConfig()))


def test_any_error_during_injection_is_rolled_back(monkeypatch):
    base = tiny_llama()
    before = _state(base)
    real, calls = fura.blocks.factorize, []

    def fail_on_the_fifth_layer(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("out of memory (simulated)")
        return real(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(fura.blocks, "factorize", fail_on_the_fifth_layer)
        with pytest.raises(RuntimeError, match="simulated"):
            get_peft_model(base, FuraConfig())
    _assert_same(base, before)
    assert _trainable(get_peft_model(base, FuraConfig())) == _trainable(get_peft_model(tiny_llama(), FuraConfig()))


def test_classification_heads_added_by_peft_are_not_refused():
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    model = get_peft_model(BertForSequenceClassification(config), FuraConfig(task_type="SEQ_CLS"))
    assert model.base_model.model.classifier.modules_to_save["default"].weight.requires_grad


def test_failed_second_adapter_leaves_the_model_as_it_was():
    model = get_peft_model(tiny_llama(), FuraConfig(init_weights=False))
    before = _state(model)
    with pytest.raises(UserError, match="dimension 160"):
        model.add_adapter("other", FuraConfig(block_shape=(4, 16)))
    _assert_same(model, before)
    assert list(model.peft_config) == ["default"]


def _saved(tmp_path, config: FuraConfig | None = None):
    """(base model, adapted model, adapter directory) of a non-identity adapter on a tiny Llama."""
    base = tiny_llama()
    model = get_peft_model(copy.deepcopy(base), config or FuraConfig(init_weights=False))
    path = tmp_path / "adapter"
    model.save_pretrained(path)
    return base, model, path


def _edit_config(path, **changes) -> None:
    file = path / "adapter_config.json"
    saved = json.loads(file.read_text())
    for key, value in changes.items():
        if value is _DROP:
            del saved[key]
        else:
            saved[key] = value
    file.write_text(json.dumps(saved))


_DROP = object()


def test_load_of_a_half_fitting_adapter_leaves_the_model_as_it_was(tmp_path):
    base, model, path = _saved(tmp_path)
    _edit_config(path, block_shape=[4, 16])
    before = _state(base)
    with pytest.raises(AdapterLoadError, match=r"adapter_config\.json does not fit this model: .*dimension 160"):
        PeftModel.from_pretrained(base, path)
    _assert_same(base, before)
    good = tmp_path / "good"
    model.save_pretrained(good)
    first = PeftModel.from_pretrained(base, good)
    before = _state(first)
    with pytest.raises(UserError, match="dimension 160"):
        first.load_adapter(path, adapter_name="second")
    _assert_same(first, before)  # in particular no stray fura_*.second tensors on the layers done first
    assert list(first.peft_config) == ["default"]


def _flip_a_tensor_byte(path) -> None:
    """Flip the lowest mantissa bit of one float in the data of adapter_model.safetensors; the header stays intact."""
    weights = path / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    data[header + 40] ^= 1
    weights.write_bytes(bytes(data))
    with safe_open(weights, framework="pt") as handle:
        assert all(torch.isfinite(handle.get_tensor(key)).all() for key in handle.keys())


def test_refused_loads_leave_the_model_as_it_was(tmp_path):
    base, _, path = _saved(tmp_path)
    _flip_a_tensor_byte(path)
    before = _state(base)
    with pytest.raises(AdapterLoadError, match=r"adapter_model\.safetensors does not match the checksum"):
        PeftModel.from_pretrained(base, path)
    _assert_same(base, before)  # no FuRA layer, no peft_config attribute, requires_grad untouched
    assert not hasattr(base, "peft_config")

    # A second adapter refused by load_adapter: the first stays, no stray fura_*.second tensors.
    good = tmp_path / "good"
    get_peft_model(copy.deepcopy(base), FuraConfig(init_weights=False)).save_pretrained(good)
    model = PeftModel.from_pretrained(base, good)
    before = _state(model)
    with pytest.raises(AdapterLoadError, match="checksum"):
        model.load_adapter(path, adapter_name="second")
    _assert_same(model, before)
    assert list(model.peft_config) == ["default"]


def test_old_adapter_without_checksum_still_loads(tmp_path):
    base, model, path = _saved(tmp_path)
    assert len(json.loads((path / "adapter_config.json").read_text())["weights_sha256"]) == 64
    _edit_config(path, weights_sha256=_DROP)
    ids = torch.randint(0, 128, (1, 8))
    reloaded = PeftModel.from_pretrained(base, path)
    torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=0, atol=1e-6)


def test_missing_layout_key_is_refused(tmp_path):
    _, _, saved = _saved(tmp_path)
    for key in LAYOUT_KEYS:
        path = tmp_path / key
        shutil.copytree(saved, path)
        _edit_config(path, **{key: _DROP})
        with pytest.raises(AdapterLoadError, match=rf"adapter_config\.json lacks '{key}'"):
            FuraConfig.from_pretrained(path)


def test_misspelt_or_unknown_layout_values_are_refused(tmp_path):
    base, _, path = _saved(tmp_path, FuraConfig(init_weights=False, decomp_mode="input_one_block"))
    saved = json.loads((path / "adapter_config.json").read_text())
    saved["decomp_mod"] = saved.pop("decomp_mode")
    (path / "adapter_config.json").write_text(json.dumps(saved))
    before = _state(base)
    with pytest.raises(AdapterLoadError, match=r"lacks 'decomp_mode' \(found 'decomp_mod': misspelt\?\)"):
        PeftModel.from_pretrained(base, path)
    _assert_same(base, before)
    for key, value in [("decomp_mode", "input_one_blok"), ("s_merged_to", "left"), ("rank", "all")]:
        _, _, path = _saved(tmp_path / key)
        _edit_config(path, **{key: value})
        with pytest.raises(AdapterLoadError, match=rf"adapter_config\.json: .*{key} must be"):
            PeftModel.from_pretrained(base, path)
        _assert_same(base, before)


def test_missing_peft_type_names_the_file(tmp_path):
    base, _, path = _saved(tmp_path)
    _edit_config(path, peft_type=_DROP)
    with pytest.raises(AdapterLoadError, match=r"adapter_config\.json in .*adapter has no 'peft_type'"):
        PeftModel.from_pretrained(base, path)
    with pytest.raises(AdapterLoadError, match=r"adapter_config\.json lacks 'peft_type'"):
        FuraConfig.from_pretrained(path)


def _nan_adapter() -> PeftModel:
    model = get_peft_model(tiny_llama(), FuraConfig(init_weights=False))
    core = model.base_model.model.model.layers[1].mlp.up_proj.fura_core["default"]
    with torch.no_grad():
        core[0, 0, 0] = float("nan")
    return model


def test_non_finite_adapter_is_not_saved(tmp_path):
    model = _nan_adapter()
    with pytest.raises(
        NonFiniteAdapterError, match=r"cannot save adapter 'default': .*layers\.1\.mlp\.up_proj\.fura_core"
    ):
        model.save_pretrained(tmp_path / "nan")
    assert not (tmp_path / "nan" / "adapter_model.safetensors").exists()


def test_non_finite_adapter_is_not_merged(tmp_path):
    from fura import methods

    model = _nan_adapter()
    before = _state(model)
    for merge in (
        model.merge_and_unload,
        model.merge_adapter,
        lambda: methods.merge(model),
        lambda: methods.export_dense(model, tmp_path / "dense"),
    ):
        with pytest.raises(NonFiniteAdapterError, match=r"cannot merge adapter 'default': .*up_proj\.fura_core"):
            merge()
        _assert_same(model, before)  # no layer merged before the refusal
    assert not any(module.merged for module in model.modules() if isinstance(module, FuraLayer))
    # A finite adapter still merges and unmerges bit for bit.
    layer = model.base_model.model.model.layers[1].mlp.up_proj
    with torch.no_grad():
        layer.fura_core["default"][0, 0, 0] = 0.5
    weight = layer.get_base_layer().weight.detach().clone()
    model.merge_adapter()
    assert not torch.equal(layer.get_base_layer().weight, weight)
    model.unmerge_adapter()
    assert torch.equal(layer.get_base_layer().weight, weight)


def test_non_finite_adapter_is_refused_by_the_layer_and_the_vllm_dense_sync():
    """A direct ``FuraLayer.merge``, ``get_delta_weight`` and the QFuRA vLLM sync refuse too, and change nothing."""
    from fura.vllm_sync import dense_named_weights

    model = _nan_adapter()
    before = _state(model)
    layer = model.base_model.model.model.layers[1].mlp.up_proj
    for call in (layer.merge, lambda: layer.get_delta_weight("default")):
        with pytest.raises(NonFiniteAdapterError, match=r"cannot merge adapter 'default': fura_core\.default holds 1"):
            call()
    assert not layer.merged
    weights = dense_named_weights(model)
    with pytest.raises(NonFiniteAdapterError, match=r"cannot sync adapter 'default': .*up_proj\.fura_core"):
        next(weights)  # the first weight is refused: nothing reaches vLLM
    _assert_same(model, before)


def test_config_values_are_strict():
    with pytest.raises(UserError, match="init_weights must be True or False, got 'no'"):
        FuraConfig(init_weights="no")
    with pytest.raises(UserError, match=r"fingerprint_tolerance must be a positive number, got '0\.5'"):
        FuraConfig(fingerprint_tolerance="0.5")
    base = tiny_llama()
    before = _state(base)
    with pytest.raises(UserError, match=r"modules_to_save: \['nonexistent'\] match no module"):
        get_peft_model(base, FuraConfig(modules_to_save=["lm_head", "nonexistent"]))
    _assert_same(base, before)
    model = get_peft_model(base, FuraConfig(modules_to_save=["lm_head"]))
    assert model.base_model.model.lm_head.modules_to_save["default"].weight.requires_grad
