"""Helpers shared by the SFT and GRPO recipes: resuming, the optimizer fallback, and the base summary."""

from __future__ import annotations

import copy
import logging

import torch

from conftest import tiny_llama
from fura import quant, reporting


def test_resume_without_a_checkpoint_starts_fresh_and_says_so(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="fura.reporting"):
        assert reporting.resume_checkpoint(tmp_path / "missing", resume=True) is None
    assert "no checkpoint" in caplog.text
    assert reporting.resume_checkpoint(tmp_path, resume=False) is None


def test_resume_finds_the_last_checkpoint(tmp_path):
    from fura.recipes.guard import write_marker

    for step in (4, 12, 8):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
        write_marker(tmp_path / f"checkpoint-{step}")
    assert reporting.resume_checkpoint(tmp_path, resume=True).endswith("checkpoint-12")


def test_paged_adamw_falls_back_where_it_cannot_run(caplog):
    with caplog.at_level(logging.WARNING, logger="fura.quant"):
        resolved = quant.resolve_optim("paged_adamw_8bit")
    expected = "paged_adamw_8bit" if torch.cuda.is_available() else "adamw_torch"
    assert resolved == expected
    if expected == "adamw_torch":
        assert "falling back" in caplog.text
    assert quant.resolve_optim("adamw_torch") == "adamw_torch"


def test_base_summary_records_the_4bit_compute_dtype():
    model = tiny_llama()
    assert quant.base_summary(model) == {"base_4bit": False, "base_compute_dtype": None}
    nf4 = quant.quantize_linear_layers_4bit(copy.deepcopy(model), compute_dtype=torch.float32)
    assert quant.base_summary(nf4) == {"base_4bit": True, "base_compute_dtype": "float32"}
