"""The names the command line offers and its defaults, importable without torch or Pyro.

``elbo-lab --help`` builds its parser from these alone, so it answers in a fraction of a second.
Each is the library's own vocabulary, spelled out once more; ``tests/test_cli.py`` checks that
they equal :data:`inference.run.MODELS`, :data:`inference.run.DTYPES`,
:data:`inference.estimators.ESTIMATOR_CHOICES`, :data:`inference.train.JIT_MODES` and the defaults of
:class:`inference.train.TrainConfig`.
"""

__all__ = [
    "CHECKPOINT_EVERY",
    "DTYPES",
    "EPOCHS",
    "ESTIMATOR",
    "ESTIMATORS",
    "JIT",
    "JIT_MODES",
    "MODELS",
    "OPTIMIZERS",
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

#: ``TrainConfig``'s defaults that the command line shows.
EPOCHS = 200
ESTIMATOR = "auto"
JIT = "auto"
CHECKPOINT_EVERY = 30.0
