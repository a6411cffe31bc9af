"""A GPT-style byte-level decoder language model (Radford et al., 2019, "Language models
are unsupervised multitask learners": GPT-2's pre-norm layout), small enough to train
on a CPU."""

from __future__ import annotations

import math

import flax.linen as nn
import jax

from sparsejax.models import transformer
from sparsejax.models.registry import ModelSpec, register_model

#: The zoo's default ("gpt"): 875k parameters, trains on a CPU.
SMALL = dict(context=128, width=128, depth=4, heads=4)
#: The benchmarks' larger decoder (4.94M parameters): ``GPT(**LARGE)``.
LARGE = dict(context=256, width=256, depth=6, heads=8)


class GPT(nn.Module):
  """Token ids [B, T] (T <= ``context``) -> next-token logits [B, T, vocab_size].

  ``x = E[tokens] + P[:T]`` (nn.Embed 'embed' E [vocab, width], learned positions
  'pos_embed' P [context, width]), ``depth`` causal pre-norm
  :class:`~sparsejax.models.transformer.Block` s, a final LayerNorm 'norm', and the
  output embedding: ``x E^T`` with ``tied`` (``Embed.attend``: one leaf, used twice),
  else a Dense 'head' [width, vocab] without bias. Logit t predicts token t + 1.

  As in GPT-2, every kernel is normal(0.02) and the projections that write into the
  residual stream (attention 'out', MLP 'proj') normal(0.02 / sqrt(2 depth)).
  """

  vocab_size: int = 256
  context: int = 128
  width: int = 128
  depth: int = 4
  heads: int = 4
  mlp_ratio: int = 4
  tied: bool = False

  @nn.compact
  def __call__(self, tokens: jax.Array, train: bool = False) -> jax.Array:
    del train  # no dropout: the same function in both modes
    if tokens.ndim != 2 or tokens.shape[1] > self.context:
      raise ValueError(
        f"tokens of shape {tokens.shape} must be [batch, length] with length <= "
        f"context={self.context}."
      )
    transformer.check_heads(self.width, self.heads)
    embed = nn.Embed(
      self.vocab_size, self.width, embedding_init=nn.initializers.normal(0.02), name="embed"
    )
    positions = self.param("pos_embed", nn.initializers.normal(0.02), (self.context, self.width))
    x = embed(tokens) + positions[: tokens.shape[1]]
    out_init = nn.initializers.normal(0.02 / math.sqrt(2 * self.depth))
    for i in range(self.depth):
      block = transformer.Block(self.heads, self.mlp_ratio, True, out_init, name=f"block_{i}")
      x = block(x)
    x = nn.LayerNorm(name="norm")(x)
    if self.tied:
      return embed.attend(x)
    return nn.Dense(
      self.vocab_size, use_bias=False, kernel_init=transformer.kernel_init, name="head"
    )(x)


def build(num_classes: int = 256, **kwargs) -> GPT:
  """The registry's builder: ``num_classes`` is the vocabulary (256 bytes)."""
  return GPT(vocab_size=num_classes, **kwargs)


register_model(
  "gpt", ModelSpec(build, dict(SMALL), "text", (SMALL["context"],), 256, input_dtype="int32")
)
