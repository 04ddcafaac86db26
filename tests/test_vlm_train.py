"""Track 3 training: what is wrapped and trained, the recipes, the parameter count at LLaVA-1.5-7B shapes,
and `fura train` → `fura export` on a tiny Llava learning a toy task (answer the colour of the image)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import get_peft_model
from transformers import TrainerCallback

from fura import FuraConfig, count_trainable_parameters
from fura.cli import main
from fura.data.commonsense import DataFormatError
from fura.recipes import vlm
from fura.recipes.catalog import RECIPE_DIR
from fura.recipes.config import RecipeError, load_recipe
from fura.tuner.layer import FuraLayer
from fura.vlm import LANGUAGE_MODEL_TARGETS
from vlm_tiny import colour_accuracy, write_colour_data, write_tiny_llava

CONFIGS = RECIPE_DIR / "vlm"
DECODER_7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# CPU settings for the tiny model: fp32, no checkpointing, a learning rate a toy learns from in 24 steps
CPU = [
    "training.activation_checkpointing=false",
    "training.bf16=false",
    "model_args.dtype=float32",
    "training.dataloader_num_workers=0",
    "training.report_to=none",
    "training.logging_steps=2",
    "training.per_device_train_batch_size=8",
    "training.save_strategy=no",
    "vlm.global_batch_size=null",  # the toy's 60 records: no accumulation to LLaVA's 128
]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("vlm_train")
    llava = write_tiny_llava(root)
    train = write_colour_data(root / "data", n_image=48, n_text=12, seed=0)
    heldout = write_colour_data(root / "data", n_image=16, seed=99, name="heldout.json")
    yield root, llava, train, heldout
    torch.set_num_threads(threads)


def sets(*items: str) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


def test_paper_count_at_llava_15_7b_shapes():
    """FuRA (no head blocks) on the language model's 7 projections: 96,559,104 trainable, 1.37 % of LLaVA-1.5-7B."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=336,
        patch_size=14,
        projection_dim=768,
    )
    vicuna = LlamaConfig(
        vocab_size=32064,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=4096,
    )
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(
            LlavaConfig(vision_config=vision, text_config=vicuna, image_token_id=32000)
        )
    count = count_trainable_parameters(model, FuraConfig(target_modules=LANGUAGE_MODEL_TARGETS, block_shape="closest"))
    assert count == 96_559_104
    total = sum(p.numel() for p in model.parameters())
    assert round(100 * count / total, 2) == 1.37
    # a plain list of names would also wrap CLIP's q/k/v_proj: 24 layers × 3 × (32·32·32 + 32·32) more
    plain = count_trainable_parameters(model, FuraConfig(target_modules=DECODER_7, block_shape="closest"))
    assert plain - count == 24 * 3 * (32**3 + 32**2)


@pytest.mark.parametrize("method", ["fura", "lora", "dora", "full"])
def test_recipes_have_the_papers_settings_and_dry_run(method, workspace, tmp_path):
    _, llava, train, _ = workspace
    overrides = {"model": str(llava), "data": str(train), "output_dir": str(tmp_path / "o")}
    recipe = load_recipe(CONFIGS / f"{method}.yaml", overrides)
    training = recipe["training"]
    assert recipe["track"] == "vlm" and recipe["method"] == method
    assert (training["num_train_epochs"], training["per_device_train_batch_size"], training["weight_decay"]) == (
        1,
        16,
        0.0,
    )
    assert (training["lr_scheduler_type"], training["warmup_steps"], training["bf16"]) == ("cosine", 0.03, True)
    assert training["learning_rate"] == (2e-5 if method == "full" else 2e-4)
    assert recipe["vlm"] == {"projector_lr": 2e-5, "group_by_modality_length": True, "global_batch_size": 128}
    assert recipe["data_args"]["max_length"] == 2048
    summary = vlm.run(recipe, dry_run=True)
    # one process: LLaVA-1.5's global batch of 128 is kept by accumulating 128 / 16 = 8 steps
    assert summary["training_arguments"]["gradient_accumulation_steps"] == 8
    assert summary["training_arguments"]["adam_beta2"] == 0.999  # LLaVA-1.5's, from vlm/fura for every method
    trainable, total = summary["trainable_parameters"], summary["total_parameters"]
    _, model = vlm.build_model(recipe)
    vision = (
        sum(p.numel() for p in model.get_base_model().model.vision_tower.parameters())
        if method != "full"
        else sum(p.numel() for p in model.model.vision_tower.parameters())
    )
    if method == "full":
        assert trainable == total - vision  # everything but the frozen vision tower
    else:
        assert 0 < trainable < total - vision
    assert not any(p.requires_grad for n, p in model.named_parameters() if "vision_tower" in n)


class Watch(TrainerCallback):
    """Records the optimizer's groups and the vision tower / projector weights before and after training."""

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.optimizer = optimizer
        self.before = {
            n: p.detach().clone()
            for n, p in model.named_parameters()
            if "vision_tower" in n or "multi_modal_projector" in n
        }
        self.projector = {
            id(p) for n, p in model.named_parameters() if "multi_modal_projector" in n and p.requires_grad
        }
        self.wrapped = [n for n, m in model.named_modules() if isinstance(m, FuraLayer)]

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        if state.global_step == 2:
            self.lrs = [group["lr"] for group in optimizer.param_groups]

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.after = {n: p.detach().clone() for n, p in model.named_parameters() if n in self.before}


def test_only_language_model_wrapped_projector_at_its_own_lr_vision_frozen(workspace, tmp_path):
    _, llava, train, _ = workspace
    recipe = load_recipe(
        CONFIGS / "fura.yaml",
        {"model": str(llava), "data": str(train), "output_dir": str(tmp_path), "max_steps": 3, "lr": 1e-2},
        CPU,
    )
    watch = Watch()
    vlm.run(recipe, callbacks=[watch])
    groups = watch.optimizer.param_groups  # [everything else, the projector]
    assert len(groups) == 2 and (groups[0]["initial_lr"], groups[1]["initial_lr"]) == (1e-2, 2e-5)
    assert watch.lrs[1] / watch.lrs[0] == pytest.approx(2e-5 / 1e-2)  # the schedule scales both alike
    assert {id(p) for p in groups[1]["params"]} == watch.projector and len(watch.projector) == 4
    assert len(watch.wrapped) == 7 * 2 and all(".language_model.layers." in n for n in watch.wrapped)
    vision = [n for n in watch.before if "vision_tower" in n]
    trained_projector = [n for n in watch.before if "modules_to_save" in n]
    assert vision and len(trained_projector) == 4
    assert all(torch.equal(watch.before[n], watch.after[n]) for n in vision)
    assert all(not torch.equal(watch.before[n], watch.after[n]) for n in trained_projector)


def test_train_export_answers_the_toy_better(workspace, tmp_path):
    """Done-when: `fura train --config vlm/fura` on CPU, `fura export`, and the exported Llava
    answers held-out colour questions better than the starting model; the export is the trained model exactly."""
    from peft import PeftModel
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    _, llava, train, heldout = workspace
    out, merged = tmp_path / "run", tmp_path / "merged"
    assert (
        main(
            [
                "train",
                "--config",
                str(CONFIGS / "fura.yaml"),
                "--model",
                str(llava),
                "--data",
                str(train),
                "--output-dir",
                str(out),
                "--lr",
                "3e-2",
                "--max-steps",
                "24",
                *sets(*CPU, "vlm.projector_lr=3.0e-2"),
            ]
        )
        == 0
    )
    run = json.loads((out / "run.json").read_text())
    losses = [e["loss"] for e in run["log_history"] if "loss" in e]
    assert min(losses[-4:]) < 0.5 * losses[0]
    assert (out / "loss.png").is_file() and (out / "adapter_model.safetensors").is_file()
    assert main(["export", "--adapter", str(out), "--output", str(merged), "--dtype", "float32"]) == 0

    processor = AutoProcessor.from_pretrained(merged)
    before = colour_accuracy(LlavaForConditionalGeneration.from_pretrained(llava), processor, heldout)
    exported = LlavaForConditionalGeneration.from_pretrained(merged)
    after = colour_accuracy(exported, processor, heldout)
    assert before <= 0.25 and after >= 0.75, (before, after)

    adapter = PeftModel.from_pretrained(LlavaForConditionalGeneration.from_pretrained(llava), out).eval()
    batch = processor(
        images=[Image.new("RGB", (30, 20), (200, 30, 30))],
        text=["USER: <image>\nWhat colour is the image? ASSISTANT:"],
        return_tensors="pt",
    )
    with torch.no_grad():
        torch.testing.assert_close(exported(**batch).logits, adapter(**batch).logits, atol=1e-5, rtol=1e-5)
        merged_in_memory = adapter.merge_and_unload()
        torch.testing.assert_close(merged_in_memory(**batch).logits, exported(**batch).logits, atol=1e-6, rtol=1e-6)
    assert not any("fura_" in n or "modules_to_save" in n for n, _ in exported.named_parameters())


def test_dry_run_checks_the_data_as_the_run_would(workspace, tmp_path):
    """A dry run reads every record and image: a missing image fails it, naming the record, as the run would."""
    _, llava, train, _ = workspace
    records = json.loads(Path(train).read_text())
    broken = next(r for r in records if "image" in r)
    broken["image"] = "missing/nowhere.png"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(records))
    overrides = {"model": str(llava), "data": str(bad), "output_dir": str(tmp_path / "o")}
    recipe = load_recipe(CONFIGS / "fura.yaml", overrides)
    recipe["data_args"]["image_folder"] = str(Path(train).parent)
    with pytest.raises(DataFormatError, match=r"nowhere\.png"):
        vlm.run(recipe, dry_run=True)
    assert not (tmp_path / "o" / "run.json").exists()


def test_head_blocks_come_from_each_towers_config():
    """block_shape='head' on Llava: language-model layers split by text_config's heads, CLIP's by vision_config's."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, image_size=28, patch_size=14
    )
    text = LlamaConfig(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    model = LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text, image_token_id=63))
    config = FuraConfig(
        target_modules=["q_proj", "k_proj", "o_proj"], decomp_mode={"o": "input_one_block"}, block_shape="head"
    )
    peft_model = get_peft_model(model, config)
    blocks = {
        name.removeprefix("base_model.model.model."): (
            layer.fura_spec["default"].n_blocks,
            layer.fura_spec["default"].block_size,
        )
        for name, layer in peft_model.named_modules()
        if isinstance(layer, FuraLayer)
    }
    # The split side is hidden: 2 heads × 32 in the language model, 4 × 8 in CLIP (which has out_proj, not o_proj).
    expected = {"language_model": (2, 32), "vision_tower": (4, 8)}
    assert {name: expected[name.split(".")[0]] for name in blocks} == blocks
    assert sorted(blocks) == [
        "language_model.layers.0.self_attn.k_proj",
        "language_model.layers.0.self_attn.o_proj",
        "language_model.layers.0.self_attn.q_proj",
        "vision_tower.encoder.layers.0.self_attn.k_proj",
        "vision_tower.encoder.layers.0.self_attn.q_proj",
    ]


@pytest.mark.parametrize(
    ("sets_", "message"),
    [
        (["training.per_device_train_batch_size=12"], "not a multiple of per_device_train_batch_size 12"),
        (["training.gradient_accumulation_steps=1"], "needs gradient_accumulation_steps 8 .* is 1; drop it"),
    ],
)
def test_a_batch_that_cannot_make_the_global_batch_is_refused_with_the_fix(workspace, tmp_path, sets_, message):
    _, llava, train, _ = workspace
    overrides = {"model": str(llava), "data": str(train), "output_dir": str(tmp_path / "o")}
    recipe = load_recipe(CONFIGS / "fura.yaml", overrides, sets_)
    with pytest.raises(RecipeError, match=message):
        vlm.run(recipe, dry_run=True)
