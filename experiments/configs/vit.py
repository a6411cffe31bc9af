"""The ViT (sparsejax.models.ViT: patch 7, width 64, depth 4, 4 heads) on MNIST.

AdamW (b1 0.9, b2 0.999, decoupled weight decay 0.05 on the prunable weights), peak
learning rate 1e-3 after a linear warmup over 5% of the run, cosine decay to 0,
gradients clipped at global norm 1, batch 128 for 12k steps (25.6 epochs), the usual
recipe for small ViTs trained from scratch (the paper's SGD recipe is for CNNs); MNIST's
rotation augmentation as for the LeNets. Data-driven scores on batches of 100.
"""

from experiments.configs import base


def get_config():
  return base.experiment(
    arch="vit",
    dataset="mnist",
    batch_size=128,
    train_steps=12_000,
    learning_rate=1e-3,
    weight_decay=0.05,
    decay_boundaries=(),
    snip_batch_size=100,
    optimizer="adamw",
    schedule="cosine",
    warmup_fraction=0.05,
    beta2=0.999,
    grad_clip=1.0,
  )
