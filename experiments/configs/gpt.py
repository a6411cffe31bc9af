"""The byte-level GPT (sparsejax.models.GPT: context 128, width 128, depth 4, 4 heads) on
the ``text`` dataset (--text_dir=../shared/data/text/python-docs).

  python -m experiments.prune_train --config=experiments/configs/gpt.py \
      --text_dir=../shared/data/text/python-docs --config.pruner=snip \
      --config.compression=10 --config.train_steps=3000

AdamW (b1 0.9, b2 0.95 and gradient clipping at global norm 1, GPT-2's), decoupled
weight decay 0.1 on the prunable weights, peak learning rate 2e-3 after a linear warmup
over 2% of the run, cosine decay to 0; batches of 32 windows of 129 bytes (4096
predicted bytes) for 20k steps (about 8 passes over the 10 MB training split). Scores on
batches of 32 windows. ``batch_size`` and ``snip_batch_size`` count windows.
"""

from experiments.configs import base


def get_config():
  return base.experiment(
    arch="gpt",
    dataset="text",
    batch_size=32,
    train_steps=20_000,
    learning_rate=2e-3,
    weight_decay=0.1,
    decay_boundaries=(),
    snip_batch_size=32,
    optimizer="adamw",
    schedule="cosine",
    warmup_fraction=0.02,
    beta2=0.95,
    grad_clip=1.0,
  )
