"""FuRA on Mixture-of-Experts expert parameters (3D stacks) and on bare 2D linear weights (`target_parameters`)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from peft import PeftModel, get_peft_model
from torch import nn
from torch.func import functional_call

from fura import FuraConfig, FuraLayer, blocks, implicit
from fura.errors import UserError
from fura.functional import count_trainable_parameters
from fura.tuner.checks import AdapterLoadError, NonFiniteAdapterError
from fura.tuner.experts import FuraExperts
from moe_tiny import ARCHS, tiny_moe
from paper_oracle import ExplicitBTT

EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]


def _ids(seed: int = 1) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randint(0, 128, (2, 10))


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _train(model, ids, steps: int = 3, lr: float = 0.05) -> None:
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        model(ids, labels=ids).loss.backward()
        opt.step()
    model.eval()


def _expert_layers(model) -> list[FuraExperts]:
    return [m for m in model.modules() if isinstance(m, FuraExperts)]


# ------------------------------------------------------------------------------------------- architectures
@pytest.mark.parametrize("arch", ARCHS)
def test_architecture_forward_backward_reload_merge(arch, tmp_path):
    ids = _ids()
    base = tiny_moe(arch)
    reference = _logits(base, ids)
    pristine = {name: p.detach().clone() for name, p in base.named_parameters()}
    model = get_peft_model(base, FuraConfig(target_modules="all-linear"))
    experts = _expert_layers(model)
    assert {layer.parameter_name for layer in experts} == {"gate_up_proj", "down_proj"}
    assert _rel(_logits(model, ids), reference) <= 1e-5  # lossless at init, fp32

    model.train()
    model(ids, labels=ids).loss.backward()
    for layer in experts:
        assert layer.fura_core["default"].grad.abs().sum() > 0, f"{arch}: no gradient reaches the expert cores"
    routers = [p for name, p in model.named_parameters() if name.endswith(("mlp.gate.weight", "mlp.router.weight"))]
    assert routers and not any(p.requires_grad for p in routers), "the router must stay frozen"

    _train(model, ids)
    trained = _logits(model, ids)
    assert _rel(trained, reference) > 1e-3, "training must move the model for the checks below to mean anything"
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_moe(arch), tmp_path)
    assert torch.equal(_logits(loaded, ids), trained), "reload must be exact"

    model.merge_adapter()
    assert _rel(_logits(model, ids), trained) < 1e-5
    model.unmerge_adapter()
    for name, param in model.base_model.model.named_parameters():
        clean = name.replace(".base_layer", "")
        if clean in pristine:
            assert torch.equal(param, pristine[clean]), f"{clean} changed by merge→unmerge"
    assert torch.equal(_logits(model, ids), trained)
    merged = model.merge_and_unload()
    assert not any(isinstance(m, FuraLayer) for m in merged.modules())
    assert _rel(_logits(merged, ids), trained) < 1e-5


@pytest.mark.parametrize("routed", [True, False])
@pytest.mark.parametrize("implementation", ["eager", "grouped_mm", "batched_mm"])
def test_experts_implementations_agree(implementation, routed, monkeypatch):
    """Each implementation, under the parametrization and the routed form, against the parametrization under eager."""
    ids = _ids()
    with monkeypatch.context() as patch:
        patch.setattr(FuraExperts, "routed", False)
        reference = get_peft_model(tiny_moe(experts_implementation="eager"), FuraConfig(init_weights=False))
        reference_logits = _logits(reference, ids)
        reference.train()
        reference(ids, labels=ids).loss.backward()
    monkeypatch.setattr(FuraExperts, "routed", routed)
    model = get_peft_model(tiny_moe(experts_implementation=implementation), FuraConfig(init_weights=False))
    model.load_state_dict(reference.state_dict())
    torch.testing.assert_close(_logits(model, ids), reference_logits, rtol=1e-5, atol=1e-5)
    model.train()
    model(ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}
    assert any("experts" in name for name in grads)
    for name, param in model.named_parameters():
        if name in grads:
            torch.testing.assert_close(param.grad, grads[name], rtol=1e-4, atol=1e-6)


def test_other_experts_implementations_are_refused():
    model = get_peft_model(tiny_moe(), FuraConfig())
    model.base_model.model.config._experts_implementation_internal = "deepgemm"
    with pytest.raises(UserError, match="experts_implementation"):
        model(_ids())


# ------------------------------------------------------------------------------------------ the paper's math
class _Holder(nn.Module):
    def __init__(self, experts: nn.Module) -> None:
        super().__init__()
        self.experts = experts

    def forward(self, hidden, index, weights):
        return self.experts(hidden, index, weights)


def _standalone_experts(arch: str) -> nn.Module:
    module = next(m for name, m in tiny_moe(arch).named_modules() if name.endswith("layers.0.mlp.experts"))
    return _Holder(copy.deepcopy(module)).double()


def _split_experts(param: torch.Tensor, transposed: bool, gate_up: bool) -> list[torch.Tensor]:
    """Each expert's (out × in) matrices, gate before up: written here from the layouts, independently of fura."""
    mats = []
    for weight in param:
        weight = weight.T if transposed else weight
        if not gate_up:
            mats.append(weight)
        elif transposed:  # gpt-oss interleaves gate and up rows
            mats += [weight[0::2], weight[1::2]]
        else:
            mats += list(weight.chunk(2))
    return mats


def _join_experts(mats: list[torch.Tensor], transposed: bool, gate_up: bool) -> torch.Tensor:
    if gate_up and transposed:
        per_expert = [torch.stack([g, u], dim=1).reshape(-1, g.shape[1]) for g, u in zip(mats[0::2], mats[1::2])]
    elif gate_up:
        per_expert = [torch.cat([g, u]) for g, u in zip(mats[0::2], mats[1::2])]
    else:
        per_expert = mats
    return torch.stack([w.T if transposed else w for w in per_expert])


@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss"])
def test_sgd_step_matches_per_expert_explicit_oracle(arch):
    holder = _standalone_experts(arch)
    transposed = bool(getattr(holder.experts, "is_transposed", False))
    base = copy.deepcopy(holder)
    oracles = {}
    for name in ("gate_up_proj", "down_proj"):
        mats = _split_experts(getattr(holder.experts, name).detach(), transposed, name == "gate_up_proj")
        oracles[name] = [
            ExplicitBTT(w, 1, blocks.closest_factor_pair(w.shape[1])[0], "full", "keep_trainable") for w in mats
        ]
    model = get_peft_model(holder, FuraConfig(target_modules=[], target_parameters=EXPERTS))
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) == sum(o.trainable_count() for os in oracles.values() for o in os)

    torch.manual_seed(3)
    tokens, hidden = 12, base.experts.gate_up_proj.shape[1 if transposed else 2]
    x = torch.randn(tokens, hidden, dtype=torch.float64)
    index = torch.stack([torch.randperm(4)[:2] for _ in range(tokens)])
    weights = torch.rand(tokens, 2, dtype=torch.float64)
    target = torch.randn(tokens, hidden, dtype=torch.float64)

    def oracle_forward():
        params = {
            f"experts.{name}": _join_experts([o.weight() for o in os], transposed, name == "gate_up_proj")
            for name, os in oracles.items()
        }
        return functional_call(base, params, (x, index, weights))

    torch.testing.assert_close(model(x, index, weights), oracle_forward(), rtol=1e-9, atol=1e-10)
    before = {name: [o.weight().detach() for o in os] for name, os in oracles.items()}
    layers = {layer.parameter_name: layer for layer in _expert_layers(model)}
    fura_before = {name: layer.merged_weight(layer.dense_weight(), ["default"]) for name, layer in layers.items()}
    lr = 0.5
    oracle_params = [p for os in oracles.values() for o in os for p in o.params()]
    for params, out in ((oracle_params, oracle_forward()), (trainable, model(x, index, weights))):
        grads = torch.autograd.grad(((out - target) ** 2).mean(), params)
        with torch.no_grad():
            for p, g in zip(params, grads):
                p -= lr * g
    for name, layer in layers.items():
        delta_oracle = torch.stack([o.weight().detach() for o in oracles[name]]) - torch.stack(before[name])
        delta_fura = layer.merged_weight(layer.dense_weight(), ["default"]) - fura_before[name]
        assert delta_oracle.norm() > 1e-4, "the step must move the experts for the test to mean anything"
        assert _rel(delta_fura, delta_oracle) < 1e-7, f"{name}: SGD step differs from the per-expert L·S·R"


def test_factorization_is_one_batched_call_over_experts(monkeypatch):
    calls = []
    eigh = torch.linalg.eigh
    monkeypatch.setattr(torch.linalg, "eigh", lambda gram: calls.append(gram.shape) or eigh(gram))
    get_peft_model(tiny_moe(), FuraConfig(target_modules=[], target_parameters=EXPERTS))
    # 2 layers × (gate_up, down): one call each, batched over 4 experts × (gate, up) × blocks
    assert len(calls) == 4
    assert sorted({shape[0] for shape in calls}) == [4 * 4, 4 * 2 * 4]


def test_two_dimensional_parameter_as_a_linear_weight():
    ids = _ids()
    base = tiny_moe()
    reference = _logits(base, ids)
    # The router's 4 × 32 weight, cut into 16 input blocks of 2 so that R is the smaller core (the implicit form).
    config = FuraConfig(target_modules=[], target_parameters=["layers.0.mlp.gate.weight"], block_shape=(16, 2))
    model = get_peft_model(base, config)
    (layer,) = _expert_layers(model)
    assert layer.geometry.matrices == 1 and layer.fura_core["default"].requires_grad
    assert _rel(_logits(model, ids), reference) <= 1e-5
    model.train()
    model(ids, labels=ids).loss.backward()
    assert layer.fura_core["default"].grad.abs().sum() > 0


# --------------------------------------------------------------------------------------- PEFT guarantees
@pytest.fixture
def trained(tmp_path):
    model = get_peft_model(tiny_moe(), FuraConfig())
    _train(model, _ids())
    return model


def test_reload_refuses_another_base(trained, tmp_path):
    trained.save_pretrained(tmp_path)
    other = tiny_moe(seed=7)
    before = {n: p.clone() for n, p in other.named_parameters()}
    with pytest.raises(AdapterLoadError, match="fingerprint"):
        PeftModel.from_pretrained(other, tmp_path)
    assert not any(isinstance(m, FuraLayer) for m in other.modules())
    assert all(torch.equal(p, before[n]) for n, p in other.named_parameters())


def test_disable_adapter_is_the_base_model(trained):
    ids = _ids()
    reference = _logits(tiny_moe(), ids)
    with trained.disable_adapter():
        assert torch.equal(_logits(trained, ids), reference)
    assert not torch.equal(_logits(trained, ids), reference)


def test_several_adapters():
    ids = _ids()
    model = get_peft_model(tiny_moe(), FuraConfig())
    _train(model, ids)
    first = _logits(model, ids)
    model.add_adapter("second", FuraConfig())
    model.set_adapter("second")
    _train(model, ids, lr=0.1)
    second = _logits(model, ids)
    assert all(len(layer.fura_spec) == 2 for layer in _expert_layers(model))
    model.set_adapter("default")
    assert torch.equal(_logits(model, ids), first)
    model.base_model.set_adapter(["default", "second"])
    both = _logits(model, ids)
    assert _rel(both, first) > 1e-4 and _rel(both, second) > 1e-4
    model.merge_adapter(["default", "second"])
    assert _rel(_logits(model, ids), both) < 1e-5


def test_nan_adapter_is_refused_for_merge_and_save(trained, tmp_path):
    layer = _expert_layers(trained)[0]
    with torch.no_grad():
        layer.fura_core["default"][0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteAdapterError):
        trained.merge_adapter()
    with pytest.raises(NonFiniteAdapterError):
        trained.save_pretrained(tmp_path)


def test_failed_injection_leaves_the_model_as_it_was(monkeypatch):
    model = tiny_moe()
    before = dict(model.named_modules())
    calls = []

    def fail_on_the_third(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("injected failure")
        return original(self, *args, **kwargs)

    original = FuraExperts.update_layer
    monkeypatch.setattr(FuraExperts, "update_layer", fail_on_the_third)
    with pytest.raises(RuntimeError, match="injected failure"):
        get_peft_model(model, FuraConfig())
    assert dict(model.named_modules()) == before
    assert all(p.requires_grad for p in model.parameters())


def test_explicit_layout_is_refused_on_experts_before_any_change():
    model = tiny_moe()
    with pytest.raises(UserError, match="implicit form only"):
        get_peft_model(model, FuraConfig(target_modules=[], target_parameters=EXPERTS, train_position="large"))
    assert not any(isinstance(m, FuraLayer) for m in model.modules())


def test_mixed_adapter_batch_is_refused(trained):
    with pytest.raises(UserError, match="mixed-adapter batch"):
        trained(_ids(), adapter_names=["default", "__base__"])


@pytest.mark.parametrize("autocast", [True, False])
def test_autocast_adapter_dtype(autocast):
    model = get_peft_model(tiny_moe(dtype=torch.bfloat16), FuraConfig(), autocast_adapter_dtype=autocast)
    layer = _expert_layers(model)[0]
    expected = torch.float32 if autocast else torch.bfloat16
    assert layer.fura_core["default"].dtype == expected and layer.fura_basis["default"].dtype == expected
    assert model(_ids()).logits.isfinite().all()


def test_count_on_the_meta_device_matches_the_built_adapter():
    config = FuraConfig()
    built = get_peft_model(tiny_moe(), copy.deepcopy(config))
    trainable = sum(p.numel() for p in built.parameters() if p.requires_grad)
    with torch.device("meta"):
        meta = tiny_moe()
    assert count_trainable_parameters(meta, config) == trainable
    attention_only = FuraConfig(target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], target_parameters=[])
    assert count_trainable_parameters(meta, attention_only) < trainable


# ------------------------------------------------------------------------------------------------- defaults
def test_defaults_and_all_linear_cover_the_experts():
    for target_modules in (None, "all-linear"):
        model = get_peft_model(tiny_moe(), FuraConfig(target_modules=target_modules))
        names = {layer.parameter_name for layer in _expert_layers(model)}
        assert names == {"gate_up_proj", "down_proj"} and len(_expert_layers(model)) == 4


def test_uncovered_experts_are_named_in_a_warning():
    with pytest.warns(UserWarning, match=r"model\.layers\.0\.mlp\.experts\.gate_up_proj"):
        get_peft_model(tiny_moe(), FuraConfig(target_modules=["q_proj"]))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        get_peft_model(tiny_moe(), FuraConfig(target_modules=["q_proj"], target_parameters=EXPERTS))


def test_sft_trainer_trains_a_tiny_qwen3_moe(tmp_path):
    from datasets import Dataset
    from trl import SFTTrainer

    from conftest import char_tokenizer, cpu_sft_config

    texts = [f"{a} plus {b} is {a + b}." for a in range(12) for b in range(4)]
    args = cpu_sft_config(tmp_path, max_steps=12)
    trainer = SFTTrainer(
        model=tiny_moe(),
        args=args,
        train_dataset=Dataset.from_dict({"text": texts}),
        processing_class=char_tokenizer(),
        peft_config=FuraConfig(),
    )
    layer = _expert_layers(trainer.model)[0]
    initial = layer.fura_core["default"].detach().clone()
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses[-1] < losses[0] - 0.1, f"loss did not fall: {losses}"  # measured under load: 4.78 → 4.56
    assert not torch.equal(layer.fura_core["default"], initial), "the expert cores must train"


def test_adapted_stack_gradients_are_exact():
    """The expert stack's autograd node against finite differences, the stack's gradient included (two adapters)."""
    torch.manual_seed(0)
    stack, rows, n, b = 3, 5, 2, 4
    blocked = torch.randn(stack, rows, n * b, dtype=torch.float64)
    fac = blocks.factorize(blocked, n, b, "keep")
    right = (fac.right + 0.1 * torch.randn_like(fac.right)).requires_grad_()
    sigma = (fac.sigma * 1.1).requires_grad_()
    blocked.requires_grad_()
    assert torch.autograd.gradcheck(implicit.adapted_stack, (blocked, fac.left_factor, sigma, right))
    assert fac.left_factor.shape == (stack * n, b, b)
    with torch.no_grad():
        merged = implicit.merge_into(blocked, blocks.block_transform(fac.left_factor, right, sigma))
    torch.testing.assert_close(
        implicit.adapted_stack(blocked, fac.left_factor, sigma, right), merged, rtol=0, atol=1e-12
    )


def test_low_cpu_mem_usage_load_is_exact(trained, tmp_path):
    trained.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_moe(), tmp_path, low_cpu_mem_usage=True)
    ids = _ids()
    assert torch.equal(_logits(loaded, ids), _logits(trained, ids))
