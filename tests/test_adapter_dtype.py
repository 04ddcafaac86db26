"""Adapter dtype: PEFT's ``autocast_adapter_dtype`` on every path, and fp16/bf16 adapters that train, save, load, merge.

With ``autocast_adapter_dtype=True`` (PEFT's default) FuRA adapters live in fp32 whatever the base;
with False they live in the base model's dtype. That holds for `get_peft_model`, `add_adapter`,
`PeftModel.from_pretrained` and `load_adapter`, each with and without ``low_cpu_mem_usage``.
"""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors import safe_open

from conftest import tiny_llama
from fura import FuraConfig, FuraLayer, methods, quant
from fura.recipes.config import load_recipe

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
PATHS = (
    "get_peft_model",
    "add_adapter",
    "from_pretrained",
    "from_pretrained_low_cpu",
    "load_adapter",
    "load_adapter_low_cpu",
)
ADAPTER_ATTRS = ("fura_core", "fura_sigma", "fura_basis", "fura_left", "fura_right")


def fura_layers(model):
    return [module for module in model.modules() if isinstance(module, FuraLayer)]


def adapter_tensors(model, name: str) -> dict[str, torch.Tensor]:
    """Every tensor of adapter ``name`` (cores, S, basis), keyed by layer and attribute."""
    found = {}
    for index, layer in enumerate(fura_layers(model)):
        for attr in ADAPTER_ATTRS:
            container = getattr(layer, attr)
            if name in container:
                found[f"{index}.{attr}"] = container[name]
    assert found, f"adapter {name!r} not found"
    return found


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


@pytest.fixture(scope="module")
def ids():
    torch.manual_seed(3)
    return torch.randint(0, 128, (2, 10))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, ids):
    """An fp32 adapter (random non-identity start) for each base dtype: its directory, tensors and fp32 logits."""
    saved = {}
    for key, dtype in DTYPES.items():
        torch.manual_seed(7)
        model = get_peft_model(tiny_llama(dtype=dtype), FuraConfig(init_weights=False))
        path = tmp_path_factory.mktemp(f"adapter_{key}")
        model.save_pretrained(path)
        saved[key] = (path, {k: v.detach().clone() for k, v in adapter_tensors(model, "default").items()})
    # The same function in fp32 throughout: the fp32 adapter on the fp32 base.
    saved["reference_logits"] = logits(PeftModel.from_pretrained(tiny_llama(), saved["fp32"][0]), ids)
    return saved


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("autocast", [True, False], ids=["autocast", "base_dtype"])
@pytest.mark.parametrize("base", list(DTYPES))
def test_adapter_dtype_on_every_path(base, autocast, path, checkpoint, ids):
    dtype = DTYPES[base]
    want = torch.float32 if autocast else dtype
    low_cpu = path.endswith("_low_cpu")
    ckpt_dir, ckpt = checkpoint[base]
    if path == "get_peft_model":
        torch.manual_seed(7)
        model = get_peft_model(tiny_llama(dtype=dtype), FuraConfig(init_weights=False), autocast_adapter_dtype=autocast)
        name, reference = "default", ckpt  # the same seed: the fp32 factors, then cast at the end
    elif path == "add_adapter":
        models = []
        for cast in (autocast, True):  # the reference: the same adapter, added in fp32
            models.append(get_peft_model(tiny_llama(dtype=dtype), FuraConfig()))
            torch.manual_seed(7)
            models[-1].add_adapter("extra", FuraConfig(init_weights=False), autocast_adapter_dtype=cast)
        model, name, reference = models[0], "extra", adapter_tensors(models[1], "extra")
        assert all(t.dtype == torch.float32 for t in adapter_tensors(model, "default").values())  # untouched
        models[1].base_model.set_adapter("extra")
        expected_logits = logits(models[1], ids)
        assert all(t.dtype == torch.float32 for t in adapter_tensors(model, "default").values())  # untouched
    elif path.startswith("from_pretrained"):
        model = PeftModel.from_pretrained(
            tiny_llama(dtype=dtype), ckpt_dir, autocast_adapter_dtype=autocast, low_cpu_mem_usage=low_cpu
        )
        name, reference = "default", ckpt
    else:
        model = get_peft_model(tiny_llama(dtype=dtype), FuraConfig(decomp_mode="input_one_block"))
        model.load_adapter(ckpt_dir, "extra", autocast_adapter_dtype=autocast, low_cpu_mem_usage=low_cpu)
        name, reference = "extra", ckpt
    tensors = adapter_tensors(model, name)
    assert tensors.keys() == reference.keys()
    for key, tensor in tensors.items():
        assert tensor.dtype == want, (key, tensor.dtype)
        assert tensor.device.type == "cpu"
        torch.testing.assert_close(tensor, reference[key].to(want), rtol=0, atol=0)
    if path == "get_peft_model":
        trains = {k for k, t in tensors.items() if isinstance(t, torch.nn.Parameter) and t.requires_grad}
        assert trains == {k for k in tensors if k.endswith(("fura_core", "fura_sigma"))}
    for layer in fura_layers(model):
        assert layer.fura_fingerprint[name].dtype == torch.float32  # the load-time check stays fp32
    model.base_model.set_adapter(name)
    out = logits(model, ids)
    assert torch.isfinite(out).all()
    # The model computes with what it holds: within the dtype's rounding, the same function as in fp32.
    if path != "add_adapter":
        expected_logits = checkpoint["reference_logits"]
    tolerance = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 1e-1}[dtype]
    torch.testing.assert_close(out, expected_logits, atol=tolerance, rtol=0)


@pytest.mark.parametrize("base", ["fp16", "bf16"])
def test_half_adapter_trains_saves_reloads(base, ids, tmp_path):
    dtype = DTYPES[base]
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(dtype=dtype), FuraConfig(), autocast_adapter_dtype=False)
    with model.disable_adapter():
        before = logits(model, ids)
    # Lossless at init up to the adapter's own rounding (M = B·diag(σ)·R in half precision).
    torch.testing.assert_close(logits(model, ids), before, atol=3e-2, rtol=0)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == dtype for p in trainable)
    # Pure fp16 Adam needs an eps fp16 can hold (the default 1e-8 underflows to 0 and gives 0/0 = NaN).
    optimizer = torch.optim.AdamW(trainable, lr=1e-2, eps=1e-4 if dtype == torch.float16 else 1e-8)
    model.train()
    losses = []
    for _ in range(4):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        assert all(p.grad is not None and p.grad.dtype == dtype and torch.isfinite(p.grad).all() for p in trainable)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1e-2, losses
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)
    model.eval()
    trained = logits(model, ids)
    assert (trained - before).abs().max() > 1e-2

    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as handle:
        saved = {key: handle.get_tensor(key) for key in handle.keys()}
    cores = [t for key, t in saved.items() if "fura_core" in key or "fura_sigma" in key]
    assert cores and all(t.dtype == dtype for t in cores)
    for low_cpu in (False, True):
        again = PeftModel.from_pretrained(
            tiny_llama(dtype=dtype), tmp_path, autocast_adapter_dtype=False, low_cpu_mem_usage=low_cpu
        )
        torch.testing.assert_close(logits(again, ids), trained, atol=0, rtol=0)
    upcast = PeftModel.from_pretrained(tiny_llama(dtype=dtype), tmp_path)  # autocast: fp32, same values
    assert all(t.dtype == torch.float32 for t in adapter_tensors(upcast, "default").values())
    torch.testing.assert_close(logits(upcast, ids), trained, atol=3e-2, rtol=0)


@pytest.mark.parametrize(
    ("base", "autocast", "layout"),
    [
        ("bf16", True, "implicit"),
        ("fp16", False, "implicit"),
        ("bf16", False, "implicit"),
        ("bf16", False, "explicit"),
        ("fp32", False, "implicit"),
    ],
)
def test_merge_unmerge_is_bit_exact_in_every_adapter_dtype(base, autocast, layout, ids):
    dtype = DTYPES[base]
    extra = {"train_position": "both", "s_merged_to": "keep_trainable"} if layout == "explicit" else {}
    torch.manual_seed(1)
    config = FuraConfig(init_weights=False, **extra)
    model = get_peft_model(tiny_llama(dtype=dtype), config, autocast_adapter_dtype=autocast)
    want = torch.float32 if autocast else dtype
    assert all(t.dtype == want for t in adapter_tensors(model, "default").values())
    weights = {id(layer): layer.get_base_layer().weight for layer in fura_layers(model)}
    originals = {key: weight.detach().clone() for key, weight in weights.items()}
    unmerged = logits(model, ids)
    with model.disable_adapter():
        base_logits = logits(model, ids)
    for _ in range(3):  # TRL's vLLM sync merges and unmerges every step: no drift may build up
        model.merge_adapter()
        merged = logits(model, ids)
        tolerance = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}[dtype]
        torch.testing.assert_close(merged, unmerged, atol=tolerance, rtol=0)
        assert (merged - base_logits).abs().max() > 4 * tolerance  # the merge did something
        model.unmerge_adapter()
        for layer in fura_layers(model):
            weight = layer.get_base_layer().weight
            assert weight is weights[id(layer)] and weight.dtype == dtype
            assert torch.equal(weight, originals[id(layer)])
    torch.testing.assert_close(logits(model, ids), unmerged, atol=0, rtol=0)


def test_qfura_recipe_trains_bf16_adapters(llama_dir, ids):
    recipe = load_recipe("qfura/qfura")
    assert recipe["method_args"] == {"autocast_adapter_dtype": False}  # the paper's bf16 R and S
    base = methods.load_model(llama_dir, "qfura", compute_dtype=torch.bfloat16, dtype=torch.bfloat16)
    assert quant.is_4bit(base)
    model = methods.build(base, "qfura", **recipe["method_args"])
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and {p.dtype for p in trainable.values()} == {torch.bfloat16}
    assert all(t.dtype == torch.bfloat16 for t in adapter_tensors(model, "default").values())
    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-2)
    model.train()
    start = {n: p.detach().clone() for n, p in trainable.items()}
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss) and any(not torch.equal(p, start[n]) for n, p in trainable.items())
    with pytest.raises(ValueError, match="autocast_adapter_dtype applies to adapter methods"):
        methods.build(tiny_llama(), "full", autocast_adapter_dtype=False)
