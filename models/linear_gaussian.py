"""Linear-Gaussian latent models, where the evidence, the posterior and the ELBO are exact.

Generative model, for each row x_n in a plate over the data set:

    z_n ~ N(0, I_Q),       x_n | z_n ~ N(W z_n + mu, Psi),       W ``(D, Q)``, mu ``(D,)``

with Psi = sigma^2 I (probabilistic PCA, ``noise="isotropic"``) or Psi = diag(psi) (factor
analysis, ``noise="diagonal"``). In closed form:

    p(x_n)       = N(x_n; mu, C),           C = W W^T + Psi
    p(z_n | x_n) = N(z_n; M^{-1} W^T Psi^{-1} (x_n - mu), M^{-1}),   M = I + W^T Psi^{-1} W
    ELBO(q)      = log p(x_n) - KL(q(z_n | x_n) || p(z_n | x_n))      (Kingma & Welling, eq. 1)

and the maximum-likelihood pPCA (Tipping & Bishop 1999, eqs. 7-8) comes from the eigen-
decomposition of the data covariance. The guide is amortized with a linear encoder,
q(z_n | x_n) = N(V x_n + b, S) with S diagonal (default) or full and shared across data points:
the "linear VAE" whose ELBO is tight at its optimum (Lucas et al. 2019).

References: M. E. Tipping and C. M. Bishop, "Probabilistic Principal Component Analysis",
J. R. Stat. Soc. B 61(3), 1999; J. Lucas, G. Tucker, R. Grosse and M. Norouzi, "Don't Blame the
ELBO! A Linear VAE Perspective on Posterior Collapse", NeurIPS 2019.
"""

from __future__ import annotations

from typing import NamedTuple

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from .plate import data_plate
from .structure import static_structure

__all__ = [
    "COVARIANCES",
    "NOISES",
    "ExactElbo",
    "LinearDecoder",
    "LinearEncoder",
    "LinearGaussian",
    "PPCASolution",
    "exact_elbo",
    "kl_to_posterior",
    "log_marginal",
    "posterior",
    "tipping_bishop",
]

#: Noise models: probabilistic PCA and factor analysis.
NOISES = ("isotropic", "diagonal")
#: Guide covariances.
COVARIANCES = ("diag", "full")


# --- closed forms --------------------------------------------------------------------------------


class ExactElbo(NamedTuple):
    """Per-datum ELBO = reconstruction - kl in closed form, each ``(N,)``."""

    elbo: torch.Tensor
    reconstruction: torch.Tensor
    kl: torch.Tensor


class PPCASolution(NamedTuple):
    """Maximum-likelihood pPCA: W ``(D, Q)``, mu ``(D,)``, sigma2, and the total log-likelihood."""

    W: torch.Tensor
    mu: torch.Tensor
    sigma2: float
    log_likelihood: float


def log_marginal(x: torch.Tensor, W: torch.Tensor, mu: torch.Tensor, psi: torch.Tensor):
    """log p(x_n) = log N(x_n; mu, W W^T + diag(psi)) for x ``(N, D)``; returns ``(N,)``."""
    covariance = W @ W.T + torch.diag(psi)
    return dist.MultivariateNormal(mu, covariance_matrix=covariance).log_prob(x)


def posterior(
    x: torch.Tensor, W: torch.Tensor, mu: torch.Tensor, psi: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """p(z_n | x_n) = N(M^{-1} W^T Psi^{-1} (x_n - mu), M^{-1}), M = I + W^T Psi^{-1} W.

    Returns the means ``(N, Q)`` and the covariance ``(Q, Q)`` (shared by all rows).
    """
    W_psi = W / psi.unsqueeze(-1)  # Psi^{-1} W, (D, Q)
    M = torch.eye(W.shape[1], dtype=W.dtype, device=W.device) + W.T @ W_psi
    covariance = torch.cholesky_inverse(torch.linalg.cholesky(M))
    covariance = (covariance + covariance.T) / 2
    return (x - mu) @ W_psi @ covariance, covariance


def exact_elbo(
    x: torch.Tensor,
    W: torch.Tensor,
    mu: torch.Tensor,
    psi: torch.Tensor,
    q_loc: torch.Tensor,
    q_cov: torch.Tensor,
) -> ExactElbo:
    """The ELBO of a Gaussian guide q(z_n | x_n) = N(m_n, S_n), in closed form.

        reconstruction_n = log N(x_n; W m_n + mu, Psi) - tr(Psi^{-1} W S_n W^T) / 2
        kl_n             = (tr S_n + m_n^T m_n - Q - log det S_n) / 2       (KL(q || N(0, I)))

    Args: x ``(N, D)``; q_loc ``(N, Q)``; q_cov ``(Q, Q)`` or ``(N, Q, Q)``.
    """
    q = q_loc.shape[-1]
    mean_fit = dist.Normal(q_loc @ W.T + mu, psi.sqrt()).log_prob(x).sum(-1)
    spread = torch.einsum("dq,...qr,dr->...", W / psi.unsqueeze(-1), q_cov, W)
    reconstruction = mean_fit - spread / 2
    trace = torch.diagonal(q_cov, dim1=-2, dim2=-1).sum(-1)
    kl = (trace + (q_loc**2).sum(-1) - q - torch.logdet(q_cov)) / 2
    return ExactElbo(reconstruction - kl, reconstruction, kl)


def kl_to_posterior(
    x: torch.Tensor,
    W: torch.Tensor,
    mu: torch.Tensor,
    psi: torch.Tensor,
    q_loc: torch.Tensor,
    q_cov: torch.Tensor,
) -> torch.Tensor:
    """KL(q(z_n | x_n) || p(z_n | x_n)) between Gaussians, ``(N,)``; equals log p(x_n) - ELBO_n."""
    loc, covariance = posterior(x, W, mu, psi)
    q = dist.MultivariateNormal(q_loc, covariance_matrix=q_cov)
    p = dist.MultivariateNormal(loc, covariance_matrix=covariance)
    return torch.distributions.kl_divergence(q, p)


def tipping_bishop(x: torch.Tensor, latent_dim: int) -> PPCASolution:
    """Maximum-likelihood probabilistic PCA of x ``(N, D)`` (Tipping & Bishop 1999, eqs. 7-8).

        mu = mean(x),  S = cov(x) (1/N) = U diag(lambda) U^T,  lambda descending
        sigma^2 = mean(lambda_{Q+1..D}),  W = U_Q (diag(lambda_{1..Q}) - sigma^2 I)^{1/2}

    (up to a rotation of W). ``log_likelihood`` is sum_n log N(x_n; mu, W W^T + sigma^2 I).
    """
    n, d = x.shape
    if not 0 < latent_dim < d:
        raise ValueError(f"latent_dim must be in 1..{d - 1} for {d}-dimensional data")
    mu = x.mean(0)
    centred = x - mu
    eigenvalues, eigenvectors = torch.linalg.eigh(centred.T @ centred / n)
    eigenvalues, eigenvectors = eigenvalues.flip(0), eigenvectors.flip(1)
    sigma2 = eigenvalues[latent_dim:].mean()
    W = eigenvectors[:, :latent_dim] * (eigenvalues[:latent_dim] - sigma2).clamp(min=0).sqrt()
    psi = sigma2.expand(d)
    log_likelihood = float(log_marginal(x, W, mu, psi).sum())
    return PPCASolution(W, mu, float(sigma2), log_likelihood)


# --- the Pyro model ------------------------------------------------------------------------------


class LinearDecoder(nn.Module):
    """z ``(..., Q)`` -> mean W z + mu ``(..., D)``; holds W, mu and the noise variances psi.

    With ``learnable=False`` the parameters are buffers: fixed, unseen by the optimizer.
    """

    def __init__(
        self, data_dim: int, latent_dim: int, noise: str = "isotropic", learnable: bool = True
    ):
        super().__init__()
        if noise not in NOISES:
            raise ValueError(f"noise must be one of {NOISES}, got {noise!r}")
        self.noise = noise
        values = {
            "W": 0.1 * torch.randn(data_dim, latent_dim),
            "mu": torch.zeros(data_dim),
            "log_psi": torch.zeros(() if noise == "isotropic" else (data_dim,)),
        }
        for name, value in values.items():
            if learnable:
                setattr(self, name, nn.Parameter(value))
            else:
                self.register_buffer(name, value)

    @property
    def psi(self) -> torch.Tensor:
        """Noise variances ``(D,)``: sigma^2 repeated (pPCA) or diag(Psi) (FA)."""
        return self.log_psi.exp().expand(self.mu.shape)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z @ self.W.T + self.mu


class LinearEncoder(nn.Module):
    """x ``(B, D)`` -> (loc = V x + b ``(B, Q)``, scale): scale ``(Q,)`` (diag) or ``(Q, Q)`` tril.

    The scale is shared by all rows, as the exact posterior covariance is.
    """

    def __init__(self, data_dim: int, latent_dim: int, covariance: str = "diag"):
        super().__init__()
        if covariance not in COVARIANCES:
            raise ValueError(f"covariance must be one of {COVARIANCES}, got {covariance!r}")
        self.covariance_kind = covariance
        self.loc = nn.Linear(data_dim, latent_dim)
        shape = (latent_dim,) if covariance == "diag" else (latent_dim, latent_dim)
        self.raw_scale = nn.Parameter(torch.zeros(shape))

    def scale(self) -> torch.Tensor:
        """Diagonal scale exp(raw) ``(Q,)``, or lower-triangular factor ``(Q, Q)`` with exp diagonal."""
        if self.covariance_kind == "diag":
            return self.raw_scale.exp()
        return torch.tril(self.raw_scale, -1) + torch.diag(self.raw_scale.diagonal().exp())

    def covariance(self) -> torch.Tensor:
        """S ``(Q, Q)``."""
        scale = self.scale()
        return torch.diag(scale**2) if scale.dim() == 1 else scale @ scale.T

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.loc(x), self.scale()

    def distribution(self, x: torch.Tensor) -> dist.TorchDistribution:
        """q(z | x) with batch shape ``(B,)`` and event shape ``(Q,)``."""
        loc, scale = self(x)
        if scale.dim() == 1:
            return dist.Normal(loc, scale.expand(loc.shape)).to_event(1)
        return dist.MultivariateNormal(loc, scale_tril=scale)


class LinearGaussian(nn.Module):
    """pPCA / factor analysis as a Pyro model with a linear amortized Gaussian guide.

    Args:
        data_dim: D.
        latent_dim: Q.
        noise: ``"isotropic"`` (pPCA) or ``"diagonal"`` (factor analysis).
        covariance: the guide's covariance, ``"diag"`` (default) or ``"full"``.
        learnable: whether W, mu and psi are trained (else fixed buffers).

    ``model(x)``, ``guide(x)`` and ``posterior_guide(x)`` share the signature and the sites
    ``"z"`` (latent, event dim 1) and ``"x"`` (observed, event dim 1) in the plate ``"data"``.
    """

    def __init__(
        self,
        data_dim: int,
        latent_dim: int,
        noise: str = "isotropic",
        covariance: str = "diag",
        learnable: bool = True,
    ):
        super().__init__()
        self.data_dim, self.latent_dim = int(data_dim), int(latent_dim)
        self.decoder = LinearDecoder(self.data_dim, self.latent_dim, noise, learnable)
        self.encoder = LinearEncoder(self.data_dim, self.latent_dim, covariance)

    @classmethod
    def from_params(
        cls,
        W: torch.Tensor,
        mu: torch.Tensor,
        psi: torch.Tensor,
        covariance: str = "diag",
        learnable: bool = False,
    ) -> LinearGaussian:
        """A model with given W ``(D, Q)``, mu ``(D,)`` and psi (scalar: pPCA, ``(D,)``: FA)."""
        psi = torch.as_tensor(psi, dtype=W.dtype)
        noise = "isotropic" if psi.dim() == 0 else "diagonal"
        module = cls(W.shape[0], W.shape[1], noise, covariance, learnable).to(W.dtype)
        with torch.no_grad():
            module.decoder.W.copy_(W)
            module.decoder.mu.copy_(mu)
            module.decoder.log_psi.copy_(psi.log())
        return module

    @static_structure
    def model(self, x: torch.Tensor, num_data: int | None = None) -> torch.Tensor:
        """p(x, z) = N(z; 0, I) N(x; W z + mu, Psi). ``x``: ``(B, D)``; returns z ``(..., B, Q)``."""
        pyro.module("decoder", self.decoder)
        with data_plate(x, num_data):
            z_loc = x.new_zeros(x.shape[0], self.latent_dim)
            z = pyro.sample("z", dist.Normal(z_loc, torch.ones_like(z_loc)).to_event(1))
            loc = self.decoder(z)
            pyro.sample(
                "x", dist.Normal(loc, self.decoder.psi.sqrt().expand(loc.shape)).to_event(1), obs=x
            )
        return z

    @static_structure
    def guide(self, x: torch.Tensor, num_data: int | None = None) -> torch.Tensor:
        """q(z | x) = N(z; V x + b, S). ``x``: ``(B, D)``; returns z ``(..., B, Q)``."""
        pyro.module("encoder", self.encoder)
        with data_plate(x, num_data):
            return pyro.sample("z", self.encoder.distribution(x))

    @static_structure
    def posterior_guide(self, x: torch.Tensor, num_data: int | None = None) -> torch.Tensor:
        """The exact posterior p(z | x) as a guide: every importance weight equals p(x)."""
        pyro.module("decoder", self.decoder)
        loc, covariance = posterior(x, self.decoder.W, self.decoder.mu, self.decoder.psi)
        with data_plate(x, num_data):
            scale_tril = torch.linalg.cholesky(covariance)
            return pyro.sample("z", dist.MultivariateNormal(loc, scale_tril=scale_tril))

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Means W m(x) + mu at the guide's mean m(x), ``(B, D)``."""
        return self.decoder(self.encoder(x)[0])

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Means W z + mu of n draws z from the prior, ``(n, D)``."""
        W = self.decoder.W
        z = torch.randn(n, self.latent_dim, generator=generator, dtype=W.dtype, device=W.device)
        return self.decoder(z)

    # closed forms in float64, per datum

    def _params64(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        d = self.decoder
        return tuple(t.detach().to(torch.float64) for t in (d.W, d.mu, d.psi))

    @torch.no_grad()
    def log_marginal(self, x: torch.Tensor) -> torch.Tensor:
        """log p(x_n), ``(N,)`` float64."""
        return log_marginal(x.to(torch.float64), *self._params64())

    @torch.no_grad()
    def posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior means ``(N, Q)`` and covariance ``(Q, Q)``, float64."""
        return posterior(x.to(torch.float64), *self._params64())

    def _guide64(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loc, _ = self.encoder(x)
        return loc.detach().to(torch.float64), self.encoder.covariance().detach().to(torch.float64)

    @torch.no_grad()
    def exact_elbo(self, x: torch.Tensor) -> ExactElbo:
        """The guide's ELBO per datum in closed form, float64."""
        return exact_elbo(x.to(torch.float64), *self._params64(), *self._guide64(x))

    @torch.no_grad()
    def kl_to_posterior(self, x: torch.Tensor) -> torch.Tensor:
        """KL(q(z_n | x_n) || p(z_n | x_n)) of the guide, ``(N,)`` float64."""
        return kl_to_posterior(x.to(torch.float64), *self._params64(), *self._guide64(x))
