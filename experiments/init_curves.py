r"""At-initialization curves for every registered network (the paper's figure 1 style).

For each network, each at-initialization pruner and both pruning types, prune at
direct compression 10^(0.2 i), i = 1, 2, ..., until the network disconnects (or up
to --max_exponent), and record direct and effective compression and active units per
layer (:func:`experiments.compression.sweep`).

  python -m experiments.init_curves --tfds_manual_dir=../shared/data/mnist
  python -m experiments.init_curves --archs=lenet300100,lenet5 --pruners=synflow

Writes one CSV per network and pruner, <out_dir>/<arch>/<pruner>.csv (atomically); a
pair whose CSV exists is skipped, so an interrupted job resumes where it stopped.
`python -m experiments.plot` draws the figures from these files.

Data for SNIP, iterative SNIP and GraSP: LeNet-300-100 scores on real MNIST (TFDS,
prepared offline from --tfds_manual_dir); the CIFAR- and Tiny-ImageNet-shaped
networks score on synthetic data of the same shape (the real files cannot be
downloaded here), and the CSV's `data` column says which. On a CPU the large networks
use smaller scoring budgets than the paper (see :func:`cpu_budget`); pass
--paper_budgets to use the paper's.
"""

from __future__ import annotations

import functools
import math
import os
import time

import jax
from absl import flags, logging

import sparsejax
from experiments import checks, cli, compression, configs, datasource, plugins, results
from sparsejax import flops, models, pruning

FLAGS = flags.FLAGS

PRUNERS = (
  "random/uniform",
  "random/uniform_plus",
  "random/erk",
  "random/igq",
  "snip",
  "snip/iterative",
  "grasp",
  "synflow",
)


# Budgets: score batches and examples per batch (SNIP, iterative SNIP, GraSP), rounds
# of the iterative pruners (by name; others use the pruner's default), the
# compression step of the iterative pruners
# (a fresh run per compression: every 10^(0.2 step i)), and the largest exponent i.
# The paper's: the network's SNIP batch (its config), 300 iterative-SNIP rounds and
# 100 SynFlow rounds at every 10^(0.2 i). On a 2-core CPU one VGG forward/backward pass
# on 128 images takes seconds, so a large network scores on one small batch,
# iterative SNIP runs 10 rounds, and the iterative pruners are sampled at every
# 10^(0.6 i), up to 10^4; a small one (the LeNets) uses the paper's budget.

#: Parameters (all variables of ``params``) from which a network is large for
#: :func:`cpu_budget`: the LeNets have 62k and 267k, VGG and ResNet-18 11M to 20M.
LARGE_NETWORK = 1_000_000
#: Or FLOPs of one example's dense forward pass (2 per multiply-accumulate): the LeNets
#: need 0.5-0.9 MFLOP, the ViT 7 MFLOP (17 tokens), the GPT 0.2 GFLOP (128 tokens).
LARGE_FORWARD_FLOPS = 5_000_000


def paper_budget(arch: str) -> dict:
  return dict(
    score_batches=10,
    batch_size=configs.get_config(arch).snip_batch_size,
    rounds={},
    iterative_step=1,
    max_exponent=25,
  )


def cpu_budget(arch: str) -> dict:
  """The default budget of ``arch`` on a CPU: the paper's for a small network; for one
  of :data:`LARGE_NETWORK` parameters or :data:`LARGE_FORWARD_FLOPS` or more (the
  CNNs, the transformers), one score batch (32 images at 32x32 pixels, halved per
  doubling of the image side: 16 at 64x64; a language model's config batch of
  windows), 10 rounds of iterative SNIP, iterative pruners at every third compression,
  up to 10^4x."""
  params, _ = network_shape(arch)
  if params < LARGE_NETWORK and forward_flops(arch) < LARGE_FORWARD_FLOPS:
    return paper_budget(arch)
  spec = models.get_spec(arch)
  if spec.input_dtype.startswith("float"):
    batch_size = max(1, 32 * 32 // spec.input_shape[0])
  else:  # token ids: the config's scoring batch of windows
    batch_size = configs.get_config(arch).snip_batch_size
  return dict(
    score_batches=1,
    batch_size=batch_size,
    rounds={"snip/iterative": 10},
    iterative_step=3,
    max_exponent=20,
  )


@functools.cache
def network_shape(arch: str) -> tuple[int, bool]:
  """(parameters, has a convolution) of network ``arch``, from its abstract
  initialization (no weights are computed)."""
  model = models.create(arch)
  shapes = jax.eval_shape(model.init, jax.random.key(0), models.example_input(arch))
  leaves = jax.tree.leaves(shapes["params"])
  return sum(math.prod(x.shape) for x in leaves), any(x.ndim == 4 for x in leaves)


@functools.cache
def forward_flops(arch: str) -> int:
  """FLOPs of one example's dense forward pass of ``arch`` (:func:`sparsejax.flops.total`
  of its linear ops), for a network of fewer than :data:`LARGE_NETWORK` parameters
  (the others are large anyway; tracing them costs seconds)."""
  if network_shape(arch)[0] >= LARGE_NETWORK:
    return LARGE_FORWARD_FLOPS
  model, example = models.create(arch), models.example_input(arch)
  traced = sparsejax.trace(model, example, variables=models.init(model, jax.random.key(0), example))
  return int(flops.total(traced, None).flops_dense)


#: The largest --max_exponent: 10^(0.2 * 50) = 10^10x keeps less than one weight of
#: any network here (VGG-19 has 2 x 10^7); a larger one only overflows.
MAX_EXPONENT = 50


def compressions(max_exponent: int, step: int = 1) -> list[float]:
  """10^(0.2 i) for i = step, 2 step, ... <= max_exponent."""
  return [10 ** (0.2 * i) for i in range(step, max_exponent + 1, step)]


def csv_path(out_dir: str, arch: str, pruner: str) -> str:
  return os.path.join(out_dir, arch, pruner.replace("/", "-") + ".csv")


read_rows = results.read_compression_csv


def run_one(
  arch: str, pruner: str, *, out_dir: str, seed: int, budget: dict, source: datasource.DataSource
) -> list[dict]:
  """Sweeps one (network, pruner) pair and writes its CSV; returns the rows."""
  p = pruning.get_pruner(pruner)
  spec = models.get_spec(arch)
  step = budget["iterative_step"] if p.target_dependent else 1
  data_name = source.describe(spec.dataset) if p.needs_data else "-"

  def batches_fn():
    return source.score_batches(
      spec.dataset,
      num_batches=budget["score_batches"],
      batch_size=budget["batch_size"],
      seed=seed,
      input_shape=spec.input_shape,
    )

  start = time.time()
  rows = compression.sweep(
    arch,
    [pruner],
    ["direct", "effective"],
    compressions(budget["max_exponent"], step),
    seed=seed,
    batches_fn=batches_fn,
    rounds=budget["rounds"],
  )
  for r in rows:
    r["data"] = data_name
  buf_path = csv_path(out_dir, arch, pruner)
  os.makedirs(os.path.dirname(buf_path), exist_ok=True)
  results.write_csv(buf_path, rows, results.COMPRESSION_COLUMNS)
  logging.info(
    "%s %s: %d rows in %.1fs -> %s", arch, pruner, len(rows), time.time() - start, buf_path
  )
  return rows


def define_flags() -> None:
  """The command-line flags (defined only when run as a binary, after --import)."""
  flags.DEFINE_string(
    "archs", ",".join(configs.archs()), "Comma-separated networks (default: every registered)."
  )
  flags.DEFINE_string("pruners", ",".join(PRUNERS), "Comma-separated at-init pruners.")
  flags.DEFINE_integer(
    "max_exponent",
    None,
    f"Largest i in 10^(0.2 i), an integer in [1, {MAX_EXPONENT}] (default: the "
    "budget's, 25 = 10^5x for the LeNets, 20 for the others); each "
    "pruner and type also stops at its first disconnected network.",
  )
  flags.DEFINE_integer("seed", 0, "Seed for initial weights, random scores and data.")
  flags.DEFINE_string("out_dir", "results/init_curves", "Where the CSVs go.")
  flags.DEFINE_bool("paper_budgets", False, "Score with the paper's budgets (slow on CPU).")
  flags.DEFINE_bool("overwrite", False, "Recompute pairs whose CSV exists.")
  plugins.define_flag()
  flags.declare_key_flag(plugins.FLAG)
  datasource.define_flags()


def check_flags() -> tuple[list[str], list[str]]:
  """The networks and pruners of the flags, every flag checked before any work.

  Raises:
    experiments.checks.FlagError: the first bad flag, its value and what is allowed.
  """
  archs = checks.parse_list(FLAGS.archs, name="archs")
  pruners = checks.parse_list(FLAGS.pruners, name="pruners")
  for arch in archs:
    configs.check_arch(arch, "--archs")
  for name in pruners:
    if name not in pruning.PRUNERS:
      raise checks.FlagError(
        f"--pruners: {name!r} is not a known pruner; allowed: {', '.join(PRUNERS)}."
      )
    if pruning.PRUNERS[name].after_training:
      raise checks.FlagError(
        f"--pruners: {name!r} prunes after training, not at initialization; "
        f"allowed: {', '.join(PRUNERS)}."
      )
  checks.check_int_flag("max_exponent", FLAGS.max_exponent, high=MAX_EXPONENT, allow_none=True)
  checks.check_run_args(out_dir=FLAGS.out_dir, seeds={"seed": FLAGS.seed})
  return archs, pruners


def main(argv):
  del argv
  plugins.import_modules(plugins.from_flags())  # before the networks and pruners are checked
  archs, pruners = check_flags()
  for arch in archs:
    budget = dict(paper_budget(arch) if FLAGS.paper_budgets else cpu_budget(arch))
    if FLAGS.max_exponent is not None:
      budget["max_exponent"] = FLAGS.max_exponent
    # Only MNIST and the text corpus are available offline; the other datasets are
    # synthetic stand-ins.
    source = datasource.DataSource(
      synthetic=FLAGS.synthetic_data or models.get_spec(arch).dataset not in ("mnist", "text"),
      manual_dir=FLAGS.tfds_manual_dir,
      data_dir=FLAGS.tfds_data_dir,
      text_dir=FLAGS.text_dir,
    )
    for name in pruners:
      if name == "random/uniform_plus" and not network_shape(arch)[1]:
        continue  # uniform+ keeps the first layer dense: conv nets only.
      path = csv_path(FLAGS.out_dir, arch, name)
      if os.path.exists(path) and not FLAGS.overwrite:
        logging.info("%s exists; skipped.", path)
        continue
      run_one(arch, name, out_dir=FLAGS.out_dir, seed=FLAGS.seed, budget=budget, source=source)
  print(f"At-init curves in {FLAGS.out_dir}; draw them with python -m experiments.plot.")


if __name__ == "__main__":
  cli.run(main, define_flags)
