"""Bayesian logistic regression on scikit-learn's bundled breast-cancer data, model(X, y)."""

import pyro
import pyro.distributions as dist
import torch


def data():
    from sklearn.datasets import load_breast_cancer

    X, y = load_breast_cancer(return_X_y=True)
    X = torch.tensor(X[:, :5], dtype=torch.float32)  # five covariates keep the test quick
    X = (X - X.mean(0)) / X.std(0)
    return (X,), {"y": torch.tensor(y, dtype=torch.float32)}


def model(X, y=None):
    w = pyro.sample("w", dist.Normal(torch.zeros(X.shape[1]), 1.0).to_event(1))
    b = pyro.sample("b", dist.Normal(0.0, 5.0))
    with pyro.plate("data", X.shape[0]):
        return pyro.sample("y", dist.Bernoulli(logits=X @ w + b), obs=y)
