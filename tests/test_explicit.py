"""The explicit L·S·R layout: train_position large/both, decomp_mode square, a small core L over several blocks.

Each layout is checked against the independent oracle (`paper_oracle.ExplicitBTT`) by forward and
by one SGD step, which pins down which cores train and where S lives. It is also checked against
the implicit layers where both layouts apply, through PEFT's operations, and by parameter counts.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings

import pytest
import torch
from peft import PeftModel, get_peft_model
from torch import nn

import fura.blocks
from conftest import DECODER_TARGETS, tiny_gpt2, tiny_llama
from fura import FuraConfig, FuraLayer, FuraLinear, count_trainable_parameters, layer_spec
from fura.functional import configure_blocktt_trainability, convert_linear_to_btt
from fura.tuner.layer import EXPLICIT, INPUT_ONE_BLOCK
from paper_oracle import ExplicitBTT
from test_equivalence import One, _fura_weight, _sgd_step

LOSSY = pytest.mark.filterwarnings("ignore:FuRA explicit layout at rank")
ALL_S = ["keep_trainable", "keep_frozen", "trainable", "frozen", "input", "output", "split"]
BOTH_S = ["keep_trainable", "keep_frozen", "input", "output", "split"]

# (out, in, decomp_mode, block_shape, oracle grid (m, n), train_position, explicit?)
CASES = [
    (64, 64, "output_one_block", (8, 8), (1, 8), "large", True),  # L (64 rows) is the large core
    (40, 120, "output_one_block", (10, 12), (1, 10), "large", True),
    (24, 96, "output_one_block", (2, 48), (1, 2), "large", False),  # R is the large core: implicit
    (60, 50, "input_one_block", (6, 10), (6, 1), "large", True),  # R (50 wide) is the large core
    (20, 96, "output_one_block", (4, 24), (1, 4), "small", True),  # blocks wider than out: the small core is L
    (64, 48, "square", ((4, 16), (6, 8)), (4, 6), "small", True),  # R small
    (64, 48, "square", ((4, 16), (6, 8)), (4, 6), "large", True),  # L large
    (48, 64, "square", ((6, 8), (4, 16)), (6, 4), "small", True),  # L small
    (48, 64, "square", ((6, 8), (4, 16)), (6, 4), "large", True),  # R large
    (64, 64, "square", "closest", (8, 8), "large", True),  # a tie: L under either rule
    (64, 64, "square", "closest", (8, 8), "small", True),
]
BOTH_CASES = [
    (64, 64, "output_one_block", (8, 8), (1, 8)),
    (33, 20, "input_one_block", (3, 11), (3, 1)),
    (64, 48, "square", ((4, 16), (6, 8)), (4, 6)),
]


def _check_against_oracle(out_f, in_f, mode, block_shape, grid, train_position, rank, s_merged_to) -> nn.Module:
    module = One(out_f, in_f, seed=0)
    w0, bias = module.lin.weight.detach().clone(), module.lin.bias.detach().clone()
    oracle = ExplicitBTT(w0, *grid, rank, s_merged_to, train_position=train_position)
    config = FuraConfig(
        target_modules=["lin"],
        decomp_mode=mode,
        block_shape=block_shape,
        rank=rank,
        s_merged_to=s_merged_to,
        train_position=train_position,
    )
    model = get_peft_model(module, config)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) == oracle.trainable_count()
    assert count_trainable_parameters(One(out_f, in_f, seed=0), config) == oracle.trainable_count()

    torch.manual_seed(1)
    x = torch.randn(16, in_f, dtype=torch.float64)
    target = torch.randn(16, out_f, dtype=torch.float64)
    torch.testing.assert_close(model(x), x @ oracle.weight().T + bias, rtol=1e-9, atol=1e-9)
    w_oracle_init, w_fura_init = oracle.weight().detach(), _fura_weight(model)
    torch.testing.assert_close(w_fura_init, w_oracle_init, rtol=1e-9, atol=1e-11)

    _sgd_step(oracle.params(), ((x @ oracle.weight().T + bias - target) ** 2).mean(), 0.5)
    _sgd_step(trainable, ((model(x) - target) ** 2).mean(), 0.5)
    delta_oracle = oracle.weight().detach() - w_oracle_init
    delta_fura = _fura_weight(model) - w_fura_init
    assert delta_oracle.norm() > 1e-3 * w0.norm(), "the step must move the weight for the test to mean anything"
    rel = (delta_fura - delta_oracle).norm() / delta_oracle.norm()
    assert rel < 1e-7, f"SGD step differs from the paper layout: relative error {rel:.2e}"
    return model


@LOSSY
@pytest.mark.parametrize("s_merged_to", ALL_S)
@pytest.mark.parametrize("rank", ["full", 3])
@pytest.mark.parametrize(("out_f", "in_f", "mode", "block_shape", "grid", "train_position", "explicit"), CASES)
def test_large_small_and_square_match_the_paper_layout(
    out_f, in_f, mode, block_shape, grid, train_position, explicit, rank, s_merged_to
):
    model = _check_against_oracle(out_f, in_f, mode, block_shape, grid, train_position, rank, s_merged_to)
    layer = next(m for m in model.modules() if isinstance(m, FuraLayer))
    assert layer.fura_spec["default"].explicit == explicit


@LOSSY
@pytest.mark.parametrize("s_merged_to", BOTH_S)
@pytest.mark.parametrize("rank", ["full", 3])
@pytest.mark.parametrize(("out_f", "in_f", "mode", "block_shape", "grid"), BOTH_CASES)
def test_both_trains_both_cores_as_the_paper_layout(out_f, in_f, mode, block_shape, grid, rank, s_merged_to):
    model = _check_against_oracle(out_f, in_f, mode, block_shape, grid, "both", rank, s_merged_to)
    trained = {name.split(".")[-2] for name, p in model.named_parameters() if p.requires_grad}
    assert {"fura_left", "fura_right"} <= trained


def _explicit_twin(spec, out_f: int, in_f: int):
    """The explicit-layout spec of an implicit one: same grid, cores, rank and S (s_side is blocked-relative)."""
    if spec.mode == INPUT_ONE_BLOCK:  # the blocked weight's R is W's L here, R in the explicit layout
        s_side = {"right": "left", "left": "right"}.get(spec.s_side, spec.s_side)
        grid = {"m_blocks": spec.n_blocks, "out_block_size": spec.block_size, "n_blocks": 1, "block_size": in_f}
        return dataclasses.replace(spec, mode=EXPLICIT, s_side=s_side, **grid)
    return dataclasses.replace(spec, mode=EXPLICIT, m_blocks=1, out_block_size=out_f)


@pytest.mark.parametrize("s_merged_to", ["keep_trainable", "keep_frozen", "trainable", "frozen", "split"])
@pytest.mark.parametrize(
    ("out_f", "in_f", "mode", "block_shape"),
    [
        (64, 64, "output_one_block", (8, 8)),
        (40, 120, "output_one_block", (10, 12)),
        (60, 50, "input_one_block", (6, 10)),
        (24, 40, "output_one_block", (1, 40)),  # one block, the small core is L: the flipped frame
    ],
)
def test_explicit_layout_equals_the_implicit_one_where_both_apply(out_f, in_f, mode, block_shape, s_merged_to):
    config = FuraConfig(target_modules=["lin"], decomp_mode=mode, block_shape=block_shape, s_merged_to=s_merged_to)
    spec = layer_spec(config, "lin", out_f, in_f)
    twin = _explicit_twin(spec, out_f, in_f)
    assert not spec.explicit and twin.explicit and twin.trainable_count == spec.trainable_count
    implicit = FuraLinear(One(out_f, in_f, seed=0).lin, "default", spec)
    explicit = FuraLinear(One(out_f, in_f, seed=0).lin, "default", twin)
    params = {
        layer: [p for name, p in layer.named_parameters() if "fura_" in name and p.requires_grad]
        for layer in (implicit, explicit)
    }
    assert [sum(p.numel() for p in ps) for ps in params.values()] == [spec.trainable_count] * 2

    torch.manual_seed(1)
    x = torch.randn(16, in_f, dtype=torch.float64)
    target = torch.randn(16, out_f, dtype=torch.float64)
    torch.testing.assert_close(explicit(x), implicit(x), rtol=1e-10, atol=1e-10)
    before = {layer: layer.merged_weight(layer.dense_weight(), ["default"]) for layer in params}
    for layer, ps in params.items():
        _sgd_step(ps, ((layer(x) - target) ** 2).mean(), 0.5)
    delta_i, delta_e = (layer.merged_weight(layer.dense_weight(), ["default"]) - before[layer] for layer in params)
    assert delta_i.norm() > 1e-3
    assert (delta_e - delta_i).norm() < 1e-8 * delta_i.norm()
    torch.testing.assert_close(explicit(x), implicit(x), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2-conv1d"])
def test_square_full_rank_is_lossless(build, token_ids):
    base = build()
    with torch.no_grad():
        reference = base(token_ids).logits
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="FuRA explicit layout")  # full rank: no lossy-compression warning
        model = get_peft_model(copy.deepcopy(base), FuraConfig(decomp_mode="square"))
    layers = [m for m in model.modules() if isinstance(m, FuraLayer)]
    assert layers and all(m.fura_spec["default"].explicit for m in layers)
    with torch.no_grad():
        torch.testing.assert_close(model(token_ids).logits, reference, rtol=0, atol=2e-5)

    module = One(48, 64, seed=2)  # fp64: exact to rounding
    w0 = module.lin.weight.detach().clone()
    model = get_peft_model(module, FuraConfig(target_modules=["lin"], decomp_mode="square"))
    assert (_fura_weight(model) - w0).abs().max() < 1e-12


def test_explicit_layout_below_full_rank_warns_that_it_is_lossy():
    module = One(64, 64, seed=0)
    w0 = module.lin.weight.detach().clone()
    with pytest.warns(UserWarning, match="lossy compression"):
        model = get_peft_model(module, FuraConfig(target_modules=["lin"], decomp_mode="square", rank=2))
    assert (_fura_weight(model) - w0).norm() > 1e-2 * w0.norm()


def test_explicit_adapter_cannot_act_together_with_another_on_a_layer(token_ids):
    model = get_peft_model(tiny_llama(), FuraConfig(decomp_mode="square", init_weights=False))
    model.add_adapter("other", FuraConfig(init_weights=False))
    model.base_model.set_adapter(["default", "other"])
    with pytest.raises(ValueError, match="one adapter at a time"):
        model(token_ids)
    with pytest.raises(ValueError, match="one adapter at a time"):
        model.merge_adapter(["default", "other"])
    assert not any(m.merged for m in model.modules() if isinstance(m, FuraLayer))
    model.base_model.set_adapter("other")
    model.merge_adapter(["default"])
    with pytest.raises(ValueError, match="one adapter at a time"):
        model.merge_adapter(["other"])


def test_damaged_explicit_core_in_a_checkpoint_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    from fura import AdapterLoadError

    base = tiny_llama()
    get_peft_model(copy.deepcopy(base), FuraConfig(train_position="large")).save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(path)
    key = next(k for k in tensors if "fura_left" in k)
    tensors[key] = tensors[key][..., :-1].contiguous()
    save_file(tensors, path)
    with pytest.raises(AdapterLoadError, match="fura_left"):
        PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)


def test_low_cpu_mem_usage_load_of_an_explicit_adapter_needs_no_svd(tmp_path, token_ids, monkeypatch):
    base = tiny_llama()
    model = get_peft_model(copy.deepcopy(base), FuraConfig(decomp_mode="square", init_weights=False))
    expected = model(token_ids).logits
    model.save_pretrained(tmp_path)

    def no_svd(*args, **kwargs):
        raise AssertionError("loading with low_cpu_mem_usage=True must not factorize")

    monkeypatch.setattr(fura.blocks, "block_svd", no_svd)
    reloaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path, low_cpu_mem_usage=True)
    torch.testing.assert_close(reloaded(token_ids).logits, expected, rtol=0, atol=1e-6)


def test_configure_blocktt_trainability_trains_the_documented_cores():
    square = convert_linear_to_btt(tiny_llama(), DECODER_TARGETS, decomp_mode="square")
    counts = {}
    for position in ("small", "large", "both"):
        config = FuraConfig(target_modules=DECODER_TARGETS, decomp_mode="square", train_position=position)
        counts[position] = configure_blocktt_trainability(square, position)
        assert counts[position] == count_trainable_parameters(tiny_llama(), config)
    assert counts["small"] < counts["large"] < counts["both"]

    implicit = convert_linear_to_btt(tiny_llama(), DECODER_TARGETS)
    with pytest.raises(ValueError, match=r"convert_linear_to_btt\(\.\.\., train_position='large'\)"):
        configure_blocktt_trainability(implicit, "large")
    assert configure_blocktt_trainability(implicit, "small") == count_trainable_parameters(
        tiny_llama(), FuraConfig(target_modules=DECODER_TARGETS)
    )


@pytest.mark.parametrize(
    "kwargs",
    [
        {"decomp_mode": "square"},
        {"decomp_mode": "square", "train_position": "large", "s_merged_to": "split"},
        {"train_position": "large", "rank": 0.3},
        {"train_position": "both", "s_merged_to": "keep_frozen"},
        {"block_shape": {"mlp_down": (2, 80)}},  # down_proj: 80-wide blocks on 64 rows, the small core is L
    ],
    ids=["square", "square-large-split", "large-budget", "both", "small-L"],
)
def test_shape_only_count_equals_the_built_model(kwargs):
    config = FuraConfig(target_modules=DECODER_TARGETS, **kwargs)
    expected = count_trainable_parameters(tiny_llama(), config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(tiny_llama(), FuraConfig(**config.to_dict()))
    assert expected == sum(p.numel() for p in model.parameters() if p.requires_grad)


LLAMA3_8B_W = 32 * (2 * 4096 * 4096 + 2 * 1024 * 4096 + 3 * 4096 * 14336)  # Σ out·in over the 7 projections


def test_llama3_8b_explicit_counts_follow_the_papers_rule(llama3_8b_meta):
    """Shape-only counts at Llama-3-8B shapes (closest factor pairs, full rank, S frozen unless stated).

    square, small: q/o 64×64 grid of 64×64 blocks, r = 64, a tie so L trains: 64·64·64·64 = 16,777,216
    (= out·in); k/v 32×64 grid of 32×64 blocks, r = 32, L: 32·64·32·32 = 2,097,152; gate/up 112×64 grid
    of 128×64 blocks, r = 64, R: 112·64·64·64 = 29,360,128; down 64×112 grid of 64×128 blocks, L:
    64·112·64·64 = 29,360,128. Per layer 125,829,120, × 32 = 4,026,531,840; S adds 65,011,712.
    At full rank the larger core has out·in entries, so "large" trains Σ out·in = 6,979,321,856.
    """
    assert LLAMA3_8B_W == 6_979_321_856

    def count(**kwargs) -> int:
        config = FuraConfig(target_modules=DECODER_TARGETS, **{"s_merged_to": "keep_frozen", **kwargs})
        return count_trainable_parameters(llama3_8b_meta, config)

    assert count(decomp_mode="square") == 4_026_531_840
    assert count(decomp_mode="square", s_merged_to="keep_trainable") == 4_026_531_840 + 65_011_712
    assert count(decomp_mode="square", train_position="large") == LLAMA3_8B_W
    assert count(train_position="large") == LLAMA3_8B_W
    # both = the W-sized L + the paper default's R cores (118,685,696 with S and head-split o_proj; closest here)
    assert count(train_position="both") == LLAMA3_8B_W + 109_051_904
    assert count() == 109_051_904
