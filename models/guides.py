"""Variational families (guides) for the models in this package, side by side.

Amortized guides for models with one local latent site ``"z"`` per data point (the VAE, the
linear-Gaussian models): an encoder network reads x_n and outputs the parameters of q(z_n | x_n),

    diag  q(z | x) = N(m(x), diag s(x)^2)                    mean field (the VAE's own guide)
    full  q(z | x) = N(m(x), L(x) L(x)^T)                    L lower triangular, diag L > 0
    flow  q(z | x) = (T_2 o T_1)_# N(m(x), diag s(x)^2)      T_i = IAF conditioned on h(x)

with the density of the flow by the change of variables, log q(z) = log N(u) - sum_i log|det dT_i/du|,
so it is a proper density for importance sampling. ``hidden_dims=()`` gives a linear encoder,
which contains the exact posterior of a linear-Gaussian model (its mean is linear in x and its
covariance constant). Each guide has the model's signature ``guide(x, num_data=None)``, samples
site ``"z"`` (event dim 1) in the plate ``"data"``, and registers itself with ``pyro.module``.

Global-latent models (the user's own) get Pyro's autoguides by name (:data:`AUTOGUIDES`, each
built as ``Class(model)``); the classes of ``pyro.infer.autoguide`` that cannot be built from the
model alone are refused by name with the reason (:data:`REFUSED_AUTOGUIDES`). ``AutoDelta`` and
``AutoLaplaceApproximation`` are point estimates: their "ELBO" is log p(x, z*) with no entropy
term.

References: Kingma & Welling (2014); Kingma et al., "Improving Variational Inference with Inverse
Autoregressive Flow", NeurIPS 2016; Rezende & Mohamed, "Variational Inference with Normalizing
Flows", ICML 2015; Bishop, PRML (2006) section 10.1.2 (the mean-field gap).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions.transforms import ConditionalAffineAutoregressive
from pyro.infer import autoguide
from pyro.infer.autoguide.gaussian import AutoGaussianDense
from pyro.nn import ConditionalAutoRegressiveNN
from torch import nn

from .plate import data_plate
from .structure import static_structure as declare_static

__all__ = [
    "AUTOGUIDES",
    "AutoGaussianInDataDtype",
    "GUIDE_FAMILIES",
    "REFUSED_AUTOGUIDES",
    "AmortizedGuide",
    "DiagonalNormalGuide",
    "FlowGuide",
    "FullNormalGuide",
    "data_plate",
    "make_autoguide",
    "make_guide",
    "mlp",
]


class AutoGaussianInDataDtype(AutoGaussianDense):
    """Pyro's ``AutoGaussian`` (dense backend) run in its parameters' dtype.

    Pyro 1.9 assembles the joint precision from ``torch.zeros`` of the default dtype on every
    call, so float64 parameters (float64 data) fail there; this runs ``forward`` with the
    parameters' dtype as the default and restores it afterwards. A traced graph would record
    those zeros at the default dtype of the call that runs it, so the guide is never traced.
    """

    static_structure = False

    def forward(self, *args, **kwargs):
        param = next(self.parameters(), None)
        dtype = param.dtype if param is not None else torch.get_default_dtype()
        old = torch.get_default_dtype()
        if dtype == old:
            return super().forward(*args, **kwargs)
        torch.set_default_dtype(dtype)
        try:
            return super().forward(*args, **kwargs)
        finally:
            torch.set_default_dtype(old)


#: Pyro's autoguides for models with global latents, by name: each is built as ``Class(model)``.
#: The ``*Messenger`` guides run the model inside themselves (Pyro's ``AutoMessenger``);
#: ``AutoDelta`` and ``AutoLaplaceApproximation`` are point estimates (a Delta at the MAP; the
#: Laplace guide's MAP is in unconstrained space); ``AutoGaussian`` uses its default dense backend.
AUTOGUIDES: dict[str, Callable] = {
    "AutoDelta": autoguide.AutoDelta,
    "AutoNormal": autoguide.AutoNormal,
    "AutoDiagonalNormal": autoguide.AutoDiagonalNormal,
    "AutoMultivariateNormal": autoguide.AutoMultivariateNormal,
    "AutoLowRankMultivariateNormal": autoguide.AutoLowRankMultivariateNormal,
    "AutoIAFNormal": autoguide.AutoIAFNormal,
    "AutoLaplaceApproximation": autoguide.AutoLaplaceApproximation,
    "AutoStructured": autoguide.AutoStructured,
    "AutoGaussian": AutoGaussianInDataDtype,
    "AutoNormalMessenger": autoguide.AutoNormalMessenger,
    "AutoHierarchicalNormalMessenger": autoguide.AutoHierarchicalNormalMessenger,
    "AutoRegressiveMessenger": autoguide.AutoRegressiveMessenger,
}

#: The rest of ``pyro.infer.autoguide``, refused by name: what each needs, and where to go instead.
REFUSED_AUTOGUIDES: dict[str, str] = {
    "AutoNormalizingFlow": "needs a transform: pass it as your own guide, FILE.py:NAME",
    "AutoDiscreteParallel": (
        "enumerates discrete latents in the guide, which elbo-lab's evidence does not support: "
        "mark them with config_enumerate in the model instead"
    ),
    "AutoGuideList": "combines guides for parts of the model: build it in your own guide, "
    "FILE.py:NAME",
    "AutoCallable": "wraps a guide function: pass that function as your own guide, FILE.py:NAME",
    "AutoGuide": "is the abstract base class of the autoguides: name one of them",
    "AutoContinuous": "is an abstract base class: name one of its subclasses, such as "
    "AutoMultivariateNormal",
    "AutoMessenger": "is an abstract base class: name one of its subclasses, such as "
    "AutoNormalMessenger",
}


def mlp(sizes: Sequence[int]) -> nn.Sequential:
    """Linear layers of the given sizes with softplus between them (none after the last)."""
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(sizes) - 2:
            layers.append(nn.Softplus())
    return nn.Sequential(*layers)


class AmortizedGuide(nn.Module):
    """An encoder body x ``(B, D)`` -> features h ``(B, H)`` and a family q(z | x) on top of it.

    Subclasses implement :meth:`distribution`, returning q(z | x) with batch shape ``(B,)`` and
    event shape ``(L,)``. Calling the module (or :meth:`guide`) runs it as a Pyro guide.

    Args:
        data_dim: D.
        latent_dim: L.
        hidden_dims: widths of the encoder's hidden layers (softplus); ``()`` is a linear encoder.
        name: the ``pyro.module`` name (parameters appear as ``name$$$...``).
        site, plate: the model's latent site and data-plate names.
    """

    family: str = ""
    #: every family here samples the same sites through the same operations for any x; a
    #: subclass whose ``distribution`` branches on tensor values must set this to False
    static_structure = True

    def __init__(
        self,
        data_dim: int,
        latent_dim: int,
        hidden_dims: Sequence[int] = (200,),
        *,
        name: str | None = None,
        site: str = "z",
        plate: str = "data",
    ):
        super().__init__()
        if int(latent_dim) < 1 or int(data_dim) < 1:
            raise ValueError(
                f"guide: data and latent dimensions must be positive, got {data_dim}, {latent_dim}"
            )
        self.data_dim, self.latent_dim = int(data_dim), int(latent_dim)
        self.hidden_dims = tuple(int(h) for h in hidden_dims)
        self.name = name or f"guide_{self.family}"
        self.site, self.plate = site, plate
        self.body = mlp([self.data_dim, *self.hidden_dims])
        self.act = nn.Softplus() if self.hidden_dims else nn.Identity()
        self.width = self.hidden_dims[-1] if self.hidden_dims else self.data_dim
        self.loc = nn.Linear(self.width, self.latent_dim)
        self.log_scale = nn.Linear(self.width, self.latent_dim)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """h(x) ``(B, H)``: the encoder's last hidden layer (x itself for a linear encoder)."""
        return self.act(self.body(x))

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x ``(B, D)`` -> (m(x), s(x)) ``(B, L)`` each, s = exp(log-scale head): the location and
        scale of the diagonal Normal every family starts from."""
        h = self.features(x)
        return self.loc(h), torch.exp(self.log_scale(h))

    def distribution(self, x: torch.Tensor) -> dist.TorchDistribution:
        """q(z | x), batch shape ``(B,)``, event shape ``(L,)``."""
        raise NotImplementedError

    @declare_static
    def guide(self, x: torch.Tensor, num_data: int | None = None) -> torch.Tensor:
        """Sample z ~ q(z | x) at the model's site; ``x`` ``(B, D)``, returns z ``(B, L)``."""
        pyro.module(self.name, self)
        with data_plate(x, num_data, self.plate):
            return pyro.sample(self.site, self.distribution(x))

    def forward(self, x: torch.Tensor, num_data: int | None = None) -> torch.Tensor:
        return self.guide(x, num_data)


class DiagonalNormalGuide(AmortizedGuide):
    """Mean field: q(z | x) = N(m(x), diag s(x)^2), s = exp(log-scale head); the VAE's own guide."""

    family = "diag"

    def distribution(self, x: torch.Tensor) -> dist.TorchDistribution:
        z_loc, z_scale = self.encode(x)
        return dist.Normal(z_loc, z_scale).to_event(1)


class FullNormalGuide(AmortizedGuide):
    """Full covariance: q(z | x) = N(m(x), L(x) L(x)^T), the encoder outputs the Cholesky factor.

    L(x) = diag(exp(log-scale head)) + strictly-lower(off-diagonal head), L(L-1)/2 outputs; the
    off-diagonal head starts at zero, so training starts from the mean-field guide.
    """

    family = "full"

    def __init__(self, data_dim: int, latent_dim: int, hidden_dims: Sequence[int] = (200,), **kw):
        super().__init__(data_dim, latent_dim, hidden_dims, **kw)
        rows, cols = torch.tril_indices(self.latent_dim, self.latent_dim, offset=-1)
        self.register_buffer("tril_rows", rows, persistent=False)
        self.register_buffer("tril_cols", cols, persistent=False)
        self.off_diagonal = nn.Linear(self.width, rows.numel())
        nn.init.zeros_(self.off_diagonal.weight)
        nn.init.zeros_(self.off_diagonal.bias)

    def scale_tril(self, h: torch.Tensor) -> torch.Tensor:
        """L(x) ``(B, L, L)`` from features ``(B, H)``."""
        off_diagonal = h.new_zeros(*h.shape[:-1], self.latent_dim, self.latent_dim)
        off_diagonal[..., self.tril_rows, self.tril_cols] = self.off_diagonal(h)
        return torch.diag_embed(torch.exp(self.log_scale(h))) + off_diagonal

    def distribution(self, x: torch.Tensor) -> dist.TorchDistribution:
        h = self.features(x)
        return dist.MultivariateNormal(self.loc(h), scale_tril=self.scale_tril(h))


class FlowGuide(AmortizedGuide):
    """Normalizing flow: N(m(x), diag s(x)^2) pushed through conditional affine IAFs.

    z = T_K o ... o T_1 (u), u ~ N(m(x), diag s(x)^2), each T_i an affine autoregressive map
    u_j -> mu_j(u_<j, h) + sigma_j(u_<j, h) u_j conditioned on the encoder features h(x)
    (``ConditionalAffineAutoregressive``), with alternating variable orders. Log-density by the
    change of variables (Kingma et al. 2016; Rezende & Mohamed 2015).

    Args:
        num_flows: K >= 2 transforms.
        flow_hidden_dims: hidden widths of each autoregressive network (default ``(4 L,)``).
    """

    family = "flow"

    def __init__(
        self,
        data_dim: int,
        latent_dim: int,
        hidden_dims: Sequence[int] = (200,),
        *,
        num_flows: int = 2,
        flow_hidden_dims: Sequence[int] | None = None,
        **kw,
    ):
        super().__init__(data_dim, latent_dim, hidden_dims, **kw)
        if self.latent_dim < 2:
            raise ValueError(f"flow guide: needs latent dimension >= 2, got {self.latent_dim}")
        if num_flows < 2:
            raise ValueError(f"flow guide: needs at least 2 transforms, got {num_flows}")
        widths = list(flow_hidden_dims or (4 * self.latent_dim,))
        order = torch.arange(self.latent_dim)
        self.flows = nn.ModuleList(
            ConditionalAffineAutoregressive(
                ConditionalAutoRegressiveNN(
                    self.latent_dim,
                    self.width,
                    widths,
                    permutation=order if i % 2 == 0 else order.flip(0),
                )
            )
            for i in range(num_flows)
        )

    def distribution(self, x: torch.Tensor) -> dist.TorchDistribution:
        h = self.features(x)
        base = dist.Normal(self.loc(h), torch.exp(self.log_scale(h))).to_event(1)
        return dist.TransformedDistribution(base, [t.condition(h) for t in self.flows])


#: Amortized families by the name the command line uses.
GUIDE_FAMILIES: dict[str, type[AmortizedGuide]] = {
    "diag": DiagonalNormalGuide,
    "full": FullNormalGuide,
    "flow": FlowGuide,
}


def make_guide(
    family: str, data_dim: int, latent_dim: int, hidden_dims: Sequence[int] = (200,), **kw
) -> AmortizedGuide:
    """An amortized guide of the named family (``diag``, ``full``, ``flow``)."""
    if family not in GUIDE_FAMILIES:
        raise ValueError(f"unknown guide {family!r} (choose from {', '.join(GUIDE_FAMILIES)})")
    return GUIDE_FAMILIES[family](data_dim, latent_dim, hidden_dims, **kw)


def autoguide_name(name: str) -> str:
    """The canonical autoguide name for ``name`` (case-insensitive, ``Auto`` prefix optional);
    a ValueError for an unknown name, and one saying why for a class of
    :data:`REFUSED_AUTOGUIDES`."""
    wanted = name.lower().removeprefix("auto")
    for canonical in AUTOGUIDES:
        if canonical.lower().removeprefix("auto") == wanted:
            return canonical
    for canonical, reason in REFUSED_AUTOGUIDES.items():
        if canonical.lower().removeprefix("auto") == wanted:
            raise ValueError(f"{canonical} {reason}")
    raise ValueError(
        f"unknown autoguide {name!r} (choose from {', '.join(AUTOGUIDES)}), or your own guide "
        "as FILE.py:NAME"
    )


def make_autoguide(name: str, model: Callable, **kw) -> autoguide.AutoGuide:
    """Pyro's autoguide ``name`` (see :data:`AUTOGUIDES`) for ``model``."""
    return AUTOGUIDES[autoguide_name(name)](model, **kw)
