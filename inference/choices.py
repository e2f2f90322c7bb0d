"""The names the command line offers and every default it shows, importable without torch or Pyro.

``elbo-lab --help`` builds its parser from these alone, so it answers in a fraction of a second.
A default is defined here once: the library's configs (:class:`inference.train.TrainConfig`,
:class:`inference.run.ModelSpec`, :class:`inference.compare.CompareConfig`,
:class:`inference.watch.WatchConfig`) and the command line use these names, and
``tests/inference/test_cli.py`` checks that what the parser fills in equals what the library
takes by default. The names themselves are the library's vocabulary, spelled out once more
(checked against :data:`inference.run.MODELS`, :data:`inference.run.DTYPES`,
:data:`inference.estimators.ESTIMATOR_CHOICES`, :data:`inference.train.JIT_MODES`,
:data:`inference.train.OPTIMIZERS`).

Sample counts have one name each, whatever the command:

- ``num_particles`` (``--num-particles``): draws of z per step of the *training* objective;
- ``eval_particles`` (``--eval-particles``): draws of z per datum when the ELBO is *estimated*
  for a report, which give it its standard error;
- ``num_samples`` (``--num-samples``): the K importance samples of the bound L_K;
- ``num_draws`` (``--num-draws``): posterior draws saved for ArviZ.
"""

__all__ = [
    "BATCH_SIZE",
    "CHECKPOINT_EVERY",
    "COMPARE_ESTIMATOR",
    "COMPARE_EVAL_PARTICLES",
    "DATA",
    "DEVICE",
    "DTYPE",
    "DTYPES",
    "EPOCHS",
    "EVALUATIONS_PER_RUN",
    "EVAL_GLOBAL_DRAW_COST",
    "EVAL_ROW_COST",
    "EVAL_SHARE",
    "EVAL_PARTICLES_GLOBAL",
    "EVAL_PARTICLES_LOCAL",
    "ESTIMATOR",
    "ESTIMATORS",
    "EVAL_BATCH_SIZE",
    "HIDDEN_DIMS",
    "JIT",
    "JIT_MODES",
    "LATENT_DIM",
    "LEARNING_RATE",
    "MODEL",
    "MODELS",
    "NUM_DRAWS",
    "NUM_PARTICLES",
    "NUM_SAMPLES",
    "OPTIMIZER",
    "OPTIMIZERS",
    "SEED",
    "WATCH_EVAL_PARTICLES",
]

#: Built-in models: the Bernoulli VAE, probabilistic PCA, factor analysis.
MODELS = ("vae", "ppca", "fa")
#: Floating-point types a run may compute in.
DTYPES = ("float32", "float64")
#: ELBO estimators: auto (chosen for the pair), Monte-Carlo KL, analytic KL, their compiled
#: variants, TraceGraph_ELBO, TraceEnum_ELBO and RenyiELBO (``renyi:ALPHA``)
#: (inference.estimators.ESTIMATOR_CHOICES).
ESTIMATORS = ("auto", "trace", "meanfield", "jit", "jit-meanfield", "graph", "enum", "renyi")
#: Optimizers (inference.train.OPTIMIZERS).
OPTIMIZERS = ("adam", "adamw", "sgd")
#: When training compiles its estimator.
JIT_MODES = ("auto", "on", "off")

# --- what is trained on which data (ModelSpec) ---------------------------------------------------
MODEL = "vae"
DATA = "digits"
LATENT_DIM = 10
HIDDEN_DIMS = (200,)
DEVICE = "cpu"
DTYPE = "float32"

# --- how it is trained (TrainConfig) -------------------------------------------------------------
EPOCHS = 200
#: Rows per SVI step of a mini-batched model (a built-in one, or a user model taking num_data).
BATCH_SIZE = 128
#: Rows per evaluation call of a mini-batched model: evaluation needs no gradients, so it
#: takes larger chunks than a step.
EVAL_BATCH_SIZE = 1024
LEARNING_RATE = 1e-3
OPTIMIZER = "adam"
SEED = 0
ESTIMATOR = "auto"
JIT = "auto"
#: Draws of z per step of the training objective.
NUM_PARTICLES = 1
CHECKPOINT_EVERY = 30.0
#: Without an ``eval_every``, training evaluates about this many times per run (and after the
#: last epoch): evaluation stays a small share of training however long the run.
EVALUATIONS_PER_RUN = 20
#: ... and, for mini-batches, no more often than keeps evaluation within this share of the
#: training time (:func:`inference.train.default_eval_every`): an evaluation passes every row
#: of both splits, while an epoch passes the training rows once.
EVAL_SHARE = 0.10
#: What evaluating one row costs, in training rows (one draw each; a step runs forward and
#: backward and updates, an evaluation runs forward in chunks of EVAL_BATCH_SIZE). Measured
#: with ``benchmarks/run_parts.py``: 0.4 at the MNIST size (784-400-20), 0.55-0.9 on the
#: digits; at the default cadence evaluation is 7% of a digits run's training time.
EVAL_ROW_COST = 0.6
#: The same for a model with global latents (no declared rows), per whole-data draw: its
#: evaluation draws the data ``eval_particles`` times one by one, decomposing every site. A
#: 200-row regression with AutoNormal: 13.5 ms an evaluation of 10 draws, 1.5 ms a step.
EVAL_GLOBAL_DRAW_COST = 1.0

# --- what is reported (explain, compare, watch) --------------------------------------------------
#: K, the importance samples of L_K.
NUM_SAMPLES = 1000
#: Draws per datum for compare's ELBO and its standard error.
COMPARE_EVAL_PARTICLES = 100
#: Draws of the ELBO that ``evaluate`` and ``explain`` report with its standard error: per datum
#: where the latents are local to rows evaluated in chunks, whole-data draws where they are
#: global (a one-draw ELBO has no error bar). A chunked split of more than
#: :data:`inference.bounds.BOUND_ROWS` rows gets fewer per row, as many in all
#: (:func:`inference.bounds.report_particles`).
EVAL_PARTICLES_LOCAL = 10
EVAL_PARTICLES_GLOBAL = 100
#: Draws per decomposition of a watched step: watch observes while the script trains, so fewer.
WATCH_EVAL_PARTICLES = 16
#: Posterior draws per guide saved by compare (as 4 chains).
NUM_DRAWS = 200
#: Flow guides have no closed-form KL, so compare trains every guide with Trace_ELBO.
COMPARE_ESTIMATOR = "trace"
