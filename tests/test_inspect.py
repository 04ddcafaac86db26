"""`fura inspect` on tiny models where the answer is known from the math.

* FuRA: ``W_j = W0_j·M_j`` keeps every input block's column space, so the out-of-subspace share is 0 to
  rounding (float64 here: ~1e-30) and ΔW is full rank once the cores have moved.
* LoRA: ``ΔW = scale·B·A`` has rank ≤ r, and nothing ties it to the pretrained blocks' spaces.
* A random Gaussian ΔW: each column of a block lands in that block's b-dimensional column space of R^a
  with an expected energy share b/a, so the outside share is ≈ 1 − b/a. Over the whole layer the inside
  energy is χ²(in·b) out of χ²(in·out), a Beta(in·b/2, in·(out−b)/2) share: its standard deviation is
  sqrt(p(1−p)/(in·out/2 + 1)), and the test allows 5 of them.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from peft.tuners.lora import LoraLayer

from conftest import tiny_llama, train_steps
from fura import cli, methods
from fura import inspect as fura_inspect
from fura.errors import UserError
from fura.tuner.layer import FuraLayer


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("base")
    tiny_llama().save_pretrained(path)
    return path


def _save(model, path, base_dir):
    model.peft_config["default"].base_model_name_or_path = str(base_dir)
    methods.save(model, path)
    return path


@pytest.fixture(scope="module")
def fura_trained(tmp_path_factory, base_dir):
    """A FuRA adapter (the paper's default config) after a few Adam steps, and the in-memory model."""
    model = methods.build(tiny_llama(), "fura")
    torch.manual_seed(1)
    train_steps(model, torch.randint(0, 128, (2, 10)), steps=3, lr=1e-2)
    return _save(model, tmp_path_factory.mktemp("fura"), base_dir), model


@pytest.fixture(scope="module")
def fura_report(fura_trained):
    return fura_inspect.inspect_update(fura_trained[0], progress=False)


@pytest.fixture(scope="module")
def lora_adapter(tmp_path_factory, base_dir):
    """A rank-4 rsLoRA with random B (non-zero update) and an alpha pattern, and the in-memory model."""
    torch.manual_seed(2)
    model = methods.build(
        tiny_llama(), "lora", r=4, lora_alpha=8, use_rslora=True, init_lora_weights=False, alpha_pattern={"v_proj": 2}
    )
    return _save(model, tmp_path_factory.mktemp("lora"), base_dir), model


@pytest.fixture(scope="module")
def dense_update(tmp_path_factory, base_dir):
    """A 'full fine-tune' whose targeted weights moved by a random Gaussian matrix, saved as a run directory."""
    model = tiny_llama()
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 2 and "layers" in name:
                param += 0.02 * torch.randn(param.shape, generator=gen)
    path = tmp_path_factory.mktemp("full")
    model.save_pretrained(path)
    (path / "run.json").write_text(json.dumps({"method": "full", "model": str(base_dir)}))
    return path


def _in_memory_deltas(model):
    """ΔW of each adapted layer as the tuner / PEFT computes it, keyed by module path."""
    return {
        name.removeprefix(fura_inspect.PEFT_PREFIX): module.get_delta_weight("default").detach().double()
        for name, module in model.named_modules()
        if isinstance(module, (FuraLayer, LoraLayer))
    }


def _check_deltas_match(path, model):
    source = fura_inspect.resolve_source(path)
    modules, updates = fura_inspect.layer_updates(source)
    expected = _in_memory_deltas(model)
    assert set(modules) == set(expected)
    assert len(modules) == (14 if source.kind == "fura" else 10)
    for update in updates:
        want = expected[update.name]
        assert update.delta.shape == want.shape
        torch.testing.assert_close(update.delta, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))


def test_deltas_match_the_tuner_and_peft(fura_trained, lora_adapter):
    """ΔW read from the files equals what the live model applies (FuRA's merge math, LoRA's α/√r and α pattern)."""
    _check_deltas_match(*fura_trained)
    _check_deltas_match(*lora_adapter)


def test_explicit_layout_delta_matches(tmp_path, base_dir):
    """An explicit L·S·R adapter (train_position='large') is rebuilt with blocks.explicit_weight."""
    torch.manual_seed(4)
    model = methods.build(tiny_llama(), "fura", train_position="large", init_weights=False)
    _check_deltas_match(_save(model, tmp_path / "explicit", base_dir), model)


def test_fura_update_stays_in_the_block_column_spaces_and_is_full_rank(fura_report):
    report = fura_report
    assert report.kind == "fura" and report.base_origin.endswith("adapter_config.json")
    assert len(report.layers) == 14
    for record in report.layers:
        assert record.out_of_subspace is not None and record.out_of_subspace <= 1e-6, record
        assert record.rank == record.max_rank, record
        assert record.update_norm > 1e-3, record  # it really moved: a no-op would pass the two checks above
    summary = report.summary
    assert summary["rank_ratio_min"] == 1.0 and summary["out_of_subspace_max"] <= 1e-6
    assert summary["sv_drift_mean"] > 0


@pytest.mark.parametrize("decomp_mode", ["output_one_block", "input_one_block"])
def test_fura_random_cores_in_either_frame(tmp_path, base_dir, decomp_mode):
    """Non-identity random cores: 0 outside the column spaces (output_one_block) or row spaces (input_one_block)."""
    torch.manual_seed(5)
    model = methods.build(tiny_llama(), "fura", decomp_mode=decomp_mode, init_weights=False)
    report = fura_inspect.inspect_update(_save(model, tmp_path / "fura", base_dir), progress=False)
    side = "column" if decomp_mode == "output_one_block" else "row"
    assert {r.side for r in report.layers} == {side}
    assert report.summary["out_of_subspace_max"] <= 1e-6
    # Full rank, except that a random core can leave one small block M_j − I nearly singular: with this
    # seed one q_proj has σ_min/σ_max = 1.5e-6, below the float32 rank rule (64·eps32 = 7.6e-6).
    assert report.summary["rank_ratio_median"] == 1.0 and report.summary["rank_ratio_min"] >= 63 / 64
    assert report.summary["rank_float64_ratio_min"] == 1.0  # full rank in exact arithmetic


def test_lora_update_has_rank_at_most_r_and_leaves_the_subspaces(lora_adapter, base_dir):
    report = fura_inspect.inspect_update(lora_adapter[0], base=base_dir, progress=False)
    assert report.kind == "lora" and report.base_origin == "--base"
    for record in report.layers:
        assert record.rank == record.rank_float64 == 4, record  # ≤ r, and = r for random factors
        assert record.out_of_subspace > 0.3, record


def test_random_dense_update_has_the_expected_outside_share(dense_update):
    report = fura_inspect.inspect_update(dense_update, progress=False)
    assert report.kind == "full" and report.base_origin.endswith("run.json")
    assert len(report.layers) == 14  # the seven FuRA targets of two layers, not norms or embeddings
    for r in report.layers:
        a, b = (r.block_rows, r.block_cols) if r.side == "column" else (r.block_cols, r.block_rows)
        p = min(a, b) / a  # expected inside share
        sd = math.sqrt(p * (1 - p) / (r.out_features * r.in_features / 2 + 1))
        assert abs(r.out_of_subspace - (1 - p)) <= 5 * sd, (r.name, r.out_of_subspace, 1 - p, sd)
        assert r.rank == r.max_rank


def test_block_shape_and_mode_overrides(dense_update):
    """LoRA/full updates are measured on the blocks asked for; one block per module is the whole column space."""
    rows = fura_inspect.inspect_update(
        dense_update, decomp_mode="input_one_block", block_shape=(4, 16), target_modules=["q_proj"], progress=False
    ).layers
    assert [r.name for r in rows] == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    q = next(r for r in rows if r.name.endswith("layers.0.self_attn.q_proj"))
    assert (q.side, q.block_rows, q.block_cols) == ("row", 16, 64)
    assert abs(q.out_of_subspace - (1 - 16 / 64)) < 0.05
    one = fura_inspect.inspect_update(dense_update, block_shape="one", progress=False).layers
    q = next(r for r in one if r.name.endswith("layers.0.self_attn.q_proj"))
    assert q.out_of_subspace < 1e-20  # a square full-rank W0 spans everything


def test_out_of_subspace_exact_cases():
    """Inside each block's column space → 0; orthogonal to it → 1; the aggregate weighs blocks by energy."""
    torch.manual_seed(6)
    u = torch.linalg.qr(torch.randn(12, 12, dtype=torch.float64))[0]
    base = torch.cat(
        [u[:, :3] @ torch.randn(3, 3, dtype=torch.float64), u[:, 3:6] @ torch.randn(3, 3, dtype=torch.float64)], dim=1
    )
    grid = fura_inspect.BlockGrid(1, 2, "column")
    inside = torch.cat([u[:, :3] @ torch.randn(3, 3, dtype=torch.float64), u[:, 3:6]], dim=1)
    outside = torch.cat([u[:, 6:9], 2 * u[:, 9:12]], dim=1)
    num, den = fura_inspect.out_of_subspace(base, inside, grid)
    assert num / den < 1e-28
    num, den = fura_inspect.out_of_subspace(base, outside, grid)
    assert num / den == pytest.approx(1.0) and den == pytest.approx(3 + 12)
    num, den = fura_inspect.out_of_subspace(base, torch.cat([u[:, :3], 2 * u[:, 9:12]], dim=1), grid)
    assert num / den == pytest.approx(12 / 15)


def test_summary_row_and_json(fura_report, tmp_path):
    report = fura_report
    row = fura_inspect.summary_row(report)
    assert set(row) == set(fura_inspect.SUMMARY_COLUMNS) and row["update rank"].startswith("100%")
    data = json.loads(report.save(tmp_path / "inspect.json").read_text())
    assert data["summary"]["layers"] == 14 and len(data["layers"]) == 14
    assert data["by_module"]["self_attn.o_proj"]["blocks"] == "4 of 64×16 col"  # the paper's head split


def _cli(argv, capsys) -> tuple[int, str]:
    """(exit status, stdout + stderr) of `fura ...`, whether the CLI raises a UserError or prints it and returns 2."""
    try:
        rc = cli.main(argv)
    except UserError as err:
        return 2, str(err)
    captured = capsys.readouterr()
    return rc, captured.out + captured.err


def test_cli_on_each_kind(fura_trained, lora_adapter, dense_update, base_dir, tmp_path, capsys):
    runs = {
        "fura": [str(fura_trained[0])],
        "lora": [str(lora_adapter[0]), "--base", str(base_dir), "--per-layer", "--no-plots"],
        "full": [str(dense_update), "--no-plots"],
    }
    for kind, args in runs.items():
        out = tmp_path / kind
        rc, text = _cli(["inspect", *args, "--output-dir", str(out)], capsys)
        assert rc == 0, text
        data = json.loads((out / "inspect.json").read_text())
        assert data["kind"] == kind
        plots = {"heatmaps.png", "sv_drift.png"}
        assert {p.name for p in out.iterdir()} == ({"inspect.json"} | (plots if kind == "fura" else set()))
        assert "out-of-subspace" in text
    assert json.loads((tmp_path / "lora" / "inspect.json").read_text())["summary"]["rank_max"] == 4


def test_bad_inputs_give_one_clear_error(fura_trained, dense_update, tmp_path, capsys):
    # the adapter's base is gone
    moved = tmp_path / "adapter"
    shutil.copytree(fura_trained[0], moved)
    config = json.loads((moved / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path / "no-such-base")
    (moved / "adapter_config.json").write_text(json.dumps(config))
    rc, text = _cli(["inspect", str(moved)], capsys)
    assert rc == 2 and "no-such-base" in text and "--base" in text
    # a directory that is none of the three
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("hi")
    rc, text = _cli(["inspect", str(tmp_path / "junk")], capsys)
    assert rc == 2 and "junk" in text and "adapter" in text
    # a full model with no run.json and no --base
    bare = tmp_path / "bare"
    shutil.copytree(dense_update, bare)
    (bare / "run.json").unlink()
    rc, text = _cli(["inspect", str(bare)], capsys)
    assert rc == 2 and "--base" in text
    # another base with the same shapes: FuRA's fingerprints tell
    other = tmp_path / "other-base"
    tiny_llama(seed=7).save_pretrained(other)
    with pytest.raises(UserError, match=r"other-base.*fingerprint"):
        fura_inspect.inspect_update(fura_trained[0], base=other, progress=False)
    # a base with other shapes
    from transformers import LlamaConfig, LlamaForCausalLM

    small = tmp_path / "small-base"
    LlamaForCausalLM(
        LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2)
    ).save_pretrained(small)
    with pytest.raises(UserError, match="small-base"):
        fura_inspect.inspect_update(dense_update, base=small, progress=False)
    with pytest.raises(UserError, match="--block-shape"):
        fura_inspect.parse_block_shape("3x")
