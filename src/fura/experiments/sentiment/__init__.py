"""`fura experiment sentiment`: FuRA, LoRA and full fine-tuning of a real pretrained transformer (all-MiniLM-L6-v2)
on real human ratings (VADER's lexicon) with label noise, asking the paper's question: does spectral
preconditioning keep noisy fine-tuning from perturbing pretrained features?

The task is word polarity (the sign of the words' mean rating) as sequence classification, with
disjoint training, validation and test words, small training sets (256 and 1,024 words) and 0, 20 or
40 % of the training labels flipped. Each method's learning rate is picked per setting on clean
validation words, then more seeds train at it. Retention is the linear CKA between the base and the
fine-tuned model's sentence embeddings of neutral words the task never trains on; every rate of the
grid gives a point of the accuracy–retention frontier.

The modules: `lexicon` (reading ratings, word splits, label noise), `model` (the classifier, one
training run, prediction and embeddings), `cli` (settings, the experiment's flow, what it prints and
writes). The protocol, statistics, frontier and plots are `fura.experiments`' shared ones.
"""
