"""`fura export`: the merged dense model computes what the adapter model computes, for plain and NF4 bases."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import save_tiny_llama_dir
from fura import methods, quant
from fura.cli import main
from fura.errors import UserError
from fura.export import export


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("base")
    return save_tiny_llama_dir(path, ["a b c d e f g h the correct answer is true"])


INPUT = torch.tensor([[4, 5, 6, 7, 8, 9]])


@pytest.mark.parametrize(("method", "overrides"), [("fura", {"init_weights": False}), ("lora", {"r": 4})])
def test_export_matches_the_adapter_model(base_dir, tmp_path, method, overrides):
    model = methods.build(AutoModelForCausalLM.from_pretrained(base_dir), method, **overrides)
    if method == "lora":  # LoRA's B starts at zero: make the adapter do something
        for name, param in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=0.1)
    methods.save(model, tmp_path / "adapter")
    expected = model.eval()(INPUT).logits
    argv = [
        "export",
        "--adapter",
        str(tmp_path / "adapter"),
        "--output",
        str(tmp_path / "merged"),
        "--dtype",
        "float32",
    ]
    assert main(argv) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any("fura_" in n or "lora_" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(merged(INPUT).logits, expected, rtol=1e-4, atol=1e-4)
    assert (tmp_path / "merged" / "tokenizer_config.json").is_file()


def test_export_of_a_qfura_adapter_merges_into_the_dequantized_base(base_dir, tmp_path):
    model = methods.load_model(base_dir, "qfura", compute_dtype=torch.float32)
    model = methods.build(model, "qfura", init_weights=False)
    assert quant.is_4bit(model)
    methods.save(model, tmp_path / "adapter")
    # as `fura train` writes it: export must rebuild the NF4 base with the same (fp32) compute dtype
    run = {"base_4bit": True, "base_compute_dtype": "float32"}
    (tmp_path / "adapter" / "run.json").write_text(json.dumps(run))
    expected = model.eval()(INPUT).logits
    assert (
        main(["export", "--adapter", str(tmp_path / "adapter"), "--output", str(tmp_path / "m"), "--dtype", "float32"])
        == 0
    )
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert not quant.is_4bit(merged)
    # fp32 compute in training and an fp32 merge of the same NF4 weights: they agree to fp32 rounding
    torch.testing.assert_close(merged(INPUT).logits, expected, rtol=1e-5, atol=1e-5)


def test_export_errors_are_clear(base_dir, tmp_path, capsys):
    with pytest.raises(UserError, match="already dense"):
        export(base_dir, tmp_path / "x")
    # through the CLI: one line on stderr, exit status 2, nothing written
    assert main(["export", "--adapter", str(tmp_path), "--output", str(tmp_path / "x")]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "adapter_config.json" in error, error
    assert not (tmp_path / "x").exists()
