"""GRPO with FuRA on a tiny model on CPU (transformers generation): the recipe runs, trains only R and S,
saves an adapter that reloads, and raises the mean reward on a synthetic task with a verifiable answer.

The synthetic task: "copy d" → the answer is ``d``, scored by the real math reward (math-verify on the
last ``\\boxed{}``). A tiny Llama is first taught the answer format by a short supervised warm-up in
which the boxed digit is the prompt's digit 30 % of the time and random otherwise, so it starts
GRPO at a mean reward of about 0.2-0.4 and has something to reinforce. The task uses fura's shorter prompt
(``prompt: fura``): behind the paper's longer one, a 2-layer model barely learns to find the digit in the
warm-up (measured: 11 % of samples copy it, chance is 10 %, against 20 % with fura's prompt).
"""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

import math_tiny
from fura import cli, methods
from fura.data.math import format_prompt
from fura.recipes import grpo
from fura.recipes.config import RecipeError, load_recipe

CONFIG = "rl/fura"
PROMPT = "fura"  # see the module docstring
PAPER_METHODS = ("fura", "lora", "dora", "svd", "full", "qfura")


def _warm_up(steps: int = 300, copy_rate: float = 0.3, seed: int = 0):
    """A tiny Llama taught to answer ``\\boxed{ d }`` + EOS, with d the prompt's digit ``copy_rate`` of the time."""
    tok = math_tiny.tokenizer(chat_template=True)
    net = math_tiny.model(len(tok), seed=seed)
    generator = torch.Generator().manual_seed(seed)
    prompts = {
        d: tok(format_prompt(f"copy {d}", tok, prompt=PROMPT), add_special_tokens=False)["input_ids"] for d in range(10)
    }
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    net.train()
    for _ in range(steps):
        inputs, labels = [], []
        for _ in range(32):
            digit = int(torch.randint(10, (1,), generator=generator))
            copied = float(torch.rand(1, generator=generator)) < copy_rate
            answer = digit if copied else int(torch.randint(10, (1,), generator=generator))
            completion = tok(f"\\boxed{{ {answer} }}", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            inputs.append(prompts[digit] + completion)
            labels.append([-100] * len(prompts[digit]) + completion)
        loss = net(input_ids=torch.tensor(inputs), labels=torch.tensor(labels)).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return net.eval()


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """A warmed-up model directory and the copy task's training file (MATH records: problem + solution)."""
    root = tmp_path_factory.mktemp("grpo")
    model_dir = math_tiny.save_model_dir(root / "model", chat_template=True, net=_warm_up())
    records = [{"problem": f"copy {d}", "solution": f"so \\boxed{{{d}}}"} for d in range(10)] * 10
    return model_dir, math_tiny.write_jsonl(root / "train.jsonl", records)


def _recipe(task, output_dir, steps: int, lr: float = 1e-2, batch: int = 64):
    model_dir, data = task
    sets = [
        f"training.per_device_train_batch_size={batch}",
        "training.gradient_accumulation_steps=1",
        "training.max_completion_length=5",
        "training.bf16=false",
        "training.gradient_checkpointing=false",
        'training.save_strategy="no"',
        "training.chat_template_kwargs=null",
        "training.disable_tqdm=true",
        "model_args={}",
        f"prompt={PROMPT}",
    ]
    overrides = {"model": str(model_dir), "data": str(data), "output_dir": str(output_dir), "max_steps": steps}
    return load_recipe(CONFIG, {**overrides, "lr": lr, "seed": 0}, sets)


def test_few_steps_train_only_r_and_s_and_save_a_reloadable_adapter(task, tmp_path):
    out = tmp_path / "run"
    trainer = grpo.run(_recipe(task, out, steps=2))

    fresh = methods.build(AutoModelForCausalLM.from_pretrained(task[0]), "fura")
    before = dict(fresh.named_parameters())
    after = dict(trainer.model.named_parameters())
    assert after.keys() == before.keys()
    trained = {name for name, param in after.items() if param.requires_grad}
    assert trained and all(".fura_core." in name or ".fura_sigma." in name for name in trained)
    changed = {name for name in after if not torch.equal(after[name].detach(), before[name].detach())}
    assert changed and changed <= trained  # only R and S moved...
    assert any(".fura_core." in name for name in changed)  # ...and R did
    assert trainer.state.global_step == 2

    run = json.loads((out / "run.json").read_text())
    assert run["base_4bit"] is False and run["base_compute_dtype"] is None
    assert run["reward"]["steps"] == [1, 2] and len(run["reward"]["mean"]) == 2
    assert (out / "adapter_config.json").is_file()
    assert (out / "loss.png").is_file() and (out / "reward.png").is_file()

    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(task[0]), out)
    for name, param in reloaded.named_parameters():
        assert torch.equal(param, after[name].detach()), name
    ids = torch.tensor([[8, 9, 4, 14, 7, 15]])
    trainer.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, trainer.model(ids).logits)


def test_mean_reward_rises(task, tmp_path):
    """100 GRPO steps of 8 prompts × 8 samples at lr 1e-2: the last 20 steps beat the first 20.

    Measured (this task, seeds 0-2, lr 3e-3 and 1e-2, with the earlier dr_grpo loss): gains of 0.09-0.15 in
    mean reward. Seed 0 at lr 1e-2 goes from 0.31 to 0.44 (dr_grpo) and from 0.30 to 0.43 with the paper's
    grpo loss, the recipe's now. The threshold is 0.05.
    """
    trainer = grpo.run(_recipe(task, tmp_path / "run", steps=100))
    steps, rewards = grpo.reward_series(trainer.state.log_history)
    assert steps == list(range(1, 101))
    first, last = sum(rewards[:20]) / 20, sum(rewards[-20:]) / 20
    print(f"mean reward: first 20 steps {first:.3f}, last 20 steps {last:.3f}")
    assert last > first + 0.05, rewards


@pytest.mark.parametrize("method", PAPER_METHODS)
def test_configs_express_the_paper_recipe(method):
    recipe = load_recipe(f"rl/{method}", sets=["training.bf16=false"])  # bf16 needs a GPU
    args = grpo.grpo_config(recipe)
    assert recipe["method"] == method and recipe["track"] == "math_rl"
    completions = args.per_device_train_batch_size * args.gradient_accumulation_steps
    assert (completions, args.num_generations, completions // args.num_generations) == (256, 8, 32)
    assert args.steps_per_generation == args.gradient_accumulation_steps and args.num_iterations == 1
    assert (args.scale_rewards, args.beta, args.max_grad_norm, args.weight_decay) == ("none", 0.0, 1.0, 0.0)
    assert (args.temperature, args.max_completion_length, args.max_steps) == (1.0, 1024, 50)
    assert args.lr_scheduler_type == "constant"
    if method in ("fura", "lora", "qfura"):
        assert args.learning_rate == 1e-4
    if method in ("lora", "dora"):  # the paper's: all 7 projections, no dropout
        seven = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        expected = {"r": 64, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": seven}
        assert recipe["method_args"] == expected


def test_unknown_training_key_is_a_recipe_error():
    recipe = load_recipe(CONFIG, sets=["training.bf16=false", "training.num_samples=8"])
    with pytest.raises(RecipeError, match="num_samples"):
        grpo.grpo_config(recipe)


def test_cli_dry_run_builds_everything_and_writes_nothing(task, tmp_path):
    model_dir, data = task
    argv = ["train", "--config", CONFIG, "--model", str(model_dir), "--data", str(data)]
    argv += ["--output-dir", str(tmp_path / "out"), "--dry-run", "--set", "training.bf16=false"]
    argv += ["--set", "model_args={}", "--set", "training.gradient_accumulation_steps=1"]
    assert cli.main(argv) == 0
    assert not (tmp_path / "out" / "adapter_config.json").exists()
