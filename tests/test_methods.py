"""`fura.methods`: every compared method builds, trains, saves, reloads and merges through the same calls."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer
from transformers import LlamaForCausalLM

from conftest import tiny_llama
from fura import methods, quant

DENSE_METHODS = ["fura", "svd", "full", "lora", "dora", "pissa", "milora"]
LORA_FAMILY = {"lora", "dora", "pissa", "milora"}
SMALL_RANK = 4

# Tiny Llama (hidden 64, kv 32, intermediate 160, 2 layers): (out, in) of each projection.
SHAPES = {
    "q": (64, 64),
    "k": (32, 64),
    "v": (32, 64),
    "o": (64, 64),
    "gate": (160, 64),
    "up": (160, 64),
    "down": (64, 160),
}
LORA_5 = ("q", "k", "v", "up", "down")


def _fura_count(n: int, b: int) -> int:
    return n * b * b + n * b  # R (n × b × b at full rank, blocks smaller than out) + S (n × b)


def hand_count(method: str, total_base: int) -> int:
    """Trainable parameters of the tiny Llama, computed by hand from the layer shapes."""
    layers = 2
    if method == "full":
        return total_base
    if method in ("fura", "qfura"):
        # closest factor pairs: 64 → 8×8, 160 → 10×16; o_proj split by heads: 4 × 16.
        per_layer = 5 * _fura_count(8, 8) + _fura_count(4, 16) + _fura_count(10, 16)
        return layers * per_layer
    if method == "svd":  # one block: the smaller core is min(out, in)², plus min(out, in) singular values
        return layers * sum(min(s) ** 2 + min(s) for s in SHAPES.values())
    lora = sum(SMALL_RANK * (SHAPES[m][0] + SHAPES[m][1]) for m in LORA_5)
    magnitude = sum(SHAPES[m][0] for m in LORA_5) if method in ("dora", "qdora") else 0
    return layers * (lora + magnitude)


def overrides_for(method: str) -> dict:
    return {"r": SMALL_RANK} if method in LORA_FAMILY or method in ("qlora", "qdora") else {}


@pytest.fixture(scope="module")
def batch():
    torch.manual_seed(3)
    return torch.randint(0, 128, (2, 12))


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def train_steps(model: torch.nn.Module, ids: torch.Tensor, steps: int = 4, lr: float = 2e-3) -> list[float]:
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("method", DENSE_METHODS)
def test_build_train_save_reload_merge(method, batch, tmp_path):
    base = tiny_llama()
    reference = logits(base, batch)
    total_base = sum(p.numel() for p in base.parameters())
    model = methods.build(base, method, **overrides_for(method))

    # Function-preserving at init (PiSSA / MiLoRA move components into the adapter, exactly).
    torch.testing.assert_close(logits(model, batch), reference, atol=2e-5, rtol=0)
    trainable, total = methods.trainable_parameters(model)
    assert trainable == hand_count(method, total_base)
    assert trainable == methods.count_parameters(tiny_llama(), method, **overrides_for(method))
    assert total == total_base + (0 if method == "full" else trainable)
    assert isinstance(model, LlamaForCausalLM if method == "full" else PeftModel)

    losses = train_steps(model, batch)
    assert losses[-1] < losses[0] - 1e-3, losses
    trained = logits(model, batch)
    assert (trained - reference).abs().max() > 1e-3  # training changed the function

    methods.save(model, tmp_path)
    reloaded = methods.load(tiny_llama(), tmp_path)
    torch.testing.assert_close(logits(reloaded, batch), trained, atol=2e-5, rtol=0)

    merged = methods.merge(model)
    assert type(merged) is LlamaForCausalLM
    assert not any(isinstance(m, BaseTunerLayer) for m in merged.modules())
    torch.testing.assert_close(logits(merged, batch), trained, atol=2e-5, rtol=0)


def test_pissa_and_milora_take_opposite_ends_of_the_spectrum():
    weight = tiny_llama().model.layers[0].self_attn.q_proj.weight.detach().clone()
    singular = torch.linalg.svdvals(weight)
    for method, expected in (("pissa", singular[:SMALL_RANK]), ("milora", singular[-SMALL_RANK:])):
        model = methods.build(tiny_llama(), method, r=SMALL_RANK)
        layer = model.base_model.model.model.layers[0].self_attn.q_proj
        delta = layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
        torch.testing.assert_close(torch.linalg.svdvals(delta)[:SMALL_RANK], expected, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(layer.base_layer.weight + delta, weight, atol=1e-5, rtol=0)


def test_saved_pissa_is_a_plain_lora_for_the_original_base(batch, tmp_path):
    model = methods.build(tiny_llama(), "pissa", r=SMALL_RANK)
    train_steps(model, batch, steps=2)
    methods.save(model, tmp_path)
    config = PeftModel.from_pretrained(tiny_llama(), tmp_path).peft_config["default"]
    assert config.init_lora_weights is True and config.r == 2 * SMALL_RANK


def test_overrides_replace_defaults():
    model = methods.build(tiny_llama(), "lora", r=8, lora_alpha=16, target_modules=["q_proj"])
    config = model.peft_config["default"]
    assert (config.r, config.lora_alpha, config.target_modules) == (8, 16, {"q_proj"})
    assert methods.trainable_parameters(model)[0] == 2 * 8 * (64 + 64)
    fura_config = methods.method_config("fura", tiny_llama())
    assert fura_config.block_shape == {"o": "head"} and fura_config.rank == "full"
    assert methods.method_config("svd").block_shape == "one"
    lora_config = methods.method_config("lora", tiny_llama())
    assert (lora_config.r, lora_config.lora_alpha, lora_config.lora_dropout) == (64, 128, 0.05)
    assert set(lora_config.target_modules) == {"q_proj", "k_proj", "v_proj", "up_proj", "down_proj"}


def test_every_method_is_described():
    assert set(methods.METHODS) == {"fura", "qfura", "svd", "full", "lora", "dora", "pissa", "milora", "qlora", "qdora"}
    for name, spec in methods.METHODS.items():
        assert spec.name == name and spec.description
        assert spec.quantized == name.startswith("q")


# ------------------------------------------------------------------------------------ Llama-3-8B shapes
LLAMA3_8B_EXPECTED = {
    "fura": 118_685_696,  # the paper's figure
    "qfura": 118_685_696,
    "svd": 2_752_184_320,
    "full": 8_030_261_248,
    "lora": 113_246_208,  # r=64 on q,k,v,up,down: 64·(in+out) summed
    "dora": 114_032_640,
    "pissa": 113_246_208,
    "milora": 113_246_208,
    "qlora": 113_246_208,
    "qdora": 114_032_640,
}


def test_llama3_8b_parameter_table(llama3_8b_meta):
    counts = {name: methods.count_parameters(llama3_8b_meta, name) for name in methods.METHODS}
    assert counts == LLAMA3_8B_EXPECTED
    seven = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    for rank, expected in ((32, 83_886_080), (64, 167_772_160)):  # docs/design.md#the-math
        assert methods.count_parameters(llama3_8b_meta, "lora", r=rank, target_modules=seven) == expected
    # docs/methods.md carries this table; it must not drift from the code.
    docs = (Path(__file__).parents[1] / "docs" / "methods.md").read_text()
    for name, count in counts.items():
        assert re.search(rf"\|\s*`{name}`\s*\|\s*{count:,}\s*\|", docs), f"docs/methods.md: wrong count for {name}"


# ------------------------------------------------------------------------------------------ bad input
def test_unknown_method_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown method 'loraa'; valid methods are: fura, qfura, svd, full"):
        methods.build(tiny_llama(), "loraa")


def test_unknown_override_names_the_config():
    with pytest.raises(ValueError, match=r"\['rnak'\] are not options of LoraConfig"):
        methods.build(tiny_llama(), "lora", rnak=4)
    with pytest.raises(ValueError, match="method 'full' takes no overrides"):
        methods.build(tiny_llama(), "full", r=4)


def test_no_matching_modules_names_the_fix():
    for method in ("fura", "lora"):
        with pytest.raises(ValueError, match=r"no module to adapt.*named \['down_proj', 'gate_proj'.*target_modules"):
            methods.build(tiny_llama(), method, target_modules=["attn_proj"])

    class Custom(torch.nn.Module):
        """Its one linear layer is its output head, which no default adapts."""

        def __init__(self) -> None:
            super().__init__()
            self.mixer = torch.nn.Linear(8, 8)

        def get_output_embeddings(self) -> torch.nn.Module:
            return self.mixer

    with pytest.raises(ValueError, match=r"found no module to adapt.*named \['mixer'\]"):
        methods.build(Custom(), "fura")
    with pytest.raises(ValueError, match="no default LoRA target modules for model type None; pass target_modules"):
        methods.build(Custom(), "lora")


def test_quantized_method_needs_a_4bit_base():
    with pytest.raises(ValueError, match=r"no bitsandbytes Linear4bit.*load_model\(name_or_path, 'qfura'\)"):
        methods.build(tiny_llama(), "qfura")


def test_4bit_without_bitsandbytes_names_the_install(monkeypatch, tmp_path):
    monkeypatch.setattr(quant, "bitsandbytes_available", lambda: False)
    for method in ("qfura", "qlora", "qdora"):
        with pytest.raises(ImportError, match=r"needs bitsandbytes.*pip install 'bitsandbytes>=0.47'"):
            methods.build(tiny_llama(), method)
    tiny_llama().save_pretrained(tmp_path)
    with pytest.raises(ImportError, match="pip install 'bitsandbytes"):
        methods.load_model(tmp_path, "qlora")
    methods.load_model(tmp_path, "lora")  # dense methods do not need it
