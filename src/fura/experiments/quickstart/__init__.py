"""`fura quickstart`: a small controlled experiment — FuRA vs LoRA vs full fine-tuning on a CPU, nothing downloaded.

What it does, and why each step is there:

1. **A synthetic world.** Made-up people (one-word names), each with a favourite colour, split into
   fine-tuning, validation and test people (disjoint), and a word-level tokenizer for the world.
2. **Pre-training.** A small Llama-architecture model learns the world from plain text: facts ("bako
   likes red"), true/false statements and option lists about *every* person, and colour questions
   in the Alpaca instruction template. The weights then hold knowledge (who likes what), the skills
   to use it (judge a statement, pick an option) and real spectral structure for FuRA's SVD. It never
   sees the two fine-tuning tasks' instructions. Cached; a second run reuses it.
3. **Fine-tuning data** in the ``commonsense_170k`` record format: a BoolQ-style true/false task and a
   WinoGrande-style option1/option2 task, worded like LLM-Adapters' instructions, about the few
   fine-tuning people only, at each label-noise level (that share of answers flipped).
4. **Fair tuning.** For each method and noise level, the learning rate is picked from a grid by
   accuracy on the validation people (clean answers: the usual noisy-label protocol), on seed 0;
   the other seeds then train at the chosen rate. Each run goes through the real recipe pieces:
   the commonsense data loader with prompt masking, `fura.recipes.sft`'s training arguments and
   model builder, transformers' `Trainer`, `fura.methods.save`, and the commonsense answer parser.
5. **Evaluation on held-out people.** Accuracy above chance on the test people is only possible by
   connecting the new instruction format to what pre-training stored; "recall" measures how much
   of the pre-trained knowledge survives fine-tuning. Mean ± std over seeds, paired per-seed
   differences, an ordering stated from the numbers (with a note when it is within the spread), the
   accuracy–recall frontier over every grid rate, ``results.json``, ``comparison.png`` and ``frontier.png``.

The modules: `settings` (sizes, grids, cache key), `world` (people, corpus, task records), `pretrain`
(tokenizer, pre-training), `finetune` (one run, its evaluation, saving), `cli` (the command). The
protocol, statistics, frontier and plots are `fura.experiments`' shared ones.
"""
