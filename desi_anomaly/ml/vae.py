"""The spectral VAE: a 1-D convolutional encoder/decoder over the rest-frame grid.

Inputs are two channels per spectrum, the normalised flux (zeroed where there is no data) and
the data mask (1 where ivar > 0). The reconstruction is the sum of

- the mean spectrum (``offset``) plus the convolutional decoder's output for the latent ``z``
  (the non-linear part: line shapes, shifts, widths), and
- a linear combination ``E c`` of ``linear_dim`` learned eigenspectra whose coefficients ``c`` are
  solved exactly for each spectrum: the ivar-weighted least-squares fit with a unit Gaussian prior
  on ``c`` (ridge), i.e. their maximum a posteriori values. An encoder only approximates the
  best latent of a spectrum (the amortisation gap); solving the linear part exactly removes most of
  that misfit at high S/N for the price of one small linear system per spectrum.

The loss is the ivar-weighted chi2 over the pixels with data (optionally up-weighting broad
emission-line windows) plus ``beta`` times the KL divergence of the Gaussian posterior from the
unit prior plus the prior term ``|c|^2 / 2`` of the linear coefficients.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import torch
from torch import nn

#: Rest wavelengths (A) of the broad lines whose windows ``line_weight`` up-weights:
#: Lya, CIV, CIII], MgII, Hbeta, Halpha.
EMISSION_LINES = (1216.0, 1549.0, 1909.0, 2799.0, 4861.0, 6563.0)
_C_KMS = 299_792.458
#: Quasar-redshift bins (rows) the measured extra variance can have (``desi_anomaly.ml.noise``).
EXTRA_VAR_ROWS = 16


@dataclass(frozen=True)
class VAEConfig:
    """Architecture and training settings; ``to_dict``/``from_dict`` round-trip through JSON.

    ``linear_dim``: number of eigenspectra in the linear part (coefficients solved per spectrum).
    ``channels``: widths of the encoder's stride-2 convolution levels; the decoder mirrors them with
    stride-2 transposed convolutions.
    ``input_clip``: the encoder sees the normalised flux clipped to +-input_clip (about 5x the
    strongest normal line peak) so a broken normalisation cannot blow up activations.
    ``huber_chi``: residual (in sigma) beyond which a pixel's training loss grows only linearly.
    ``line_weight``: factor on the chi2 weight of pixels within ``line_half_width_kms`` of
    ``EMISSION_LINES`` (1 = no up-weighting). ``forest_var``: variance of the Lyman-alpha forest
    transmission fluctuations, as a fraction of the squared model flux, added to the noise of
    pixels blueward of ``forest_max_wave`` (rest A; Lyman-alpha, where the forest ends) during
    training: the forest is stochastic intergalactic absorption that no model of the quasar
    reproduces (DESI's Lya analyses call it var_lss). After training, the extra variance of every
    pixel is measured in quasar-redshift bins on the validation spectra
    (``desi_anomaly.ml.noise``) and replaces this prior.
    ``lr`` decays along a cosine to ``lr * lr_final_fraction`` at ``epochs``.
    ``batch_size``: on CPU the cost per spectrum of a training step falls steeply with the batch
    size up to about 64. ``patience``: epochs without a better validation loss before early
    stopping.
    """

    npix: int = 4000
    latent_dim: int = 128
    linear_dim: int = 64
    channels: tuple[int, ...] = (8, 16, 16, 32, 32, 64, 64)
    kernel_size: int = 5
    beta: float = 1.0
    huber_chi: float = 5.0
    input_clip: float = 50.0
    line_weight: float = 1.0
    line_half_width_kms: float = 10_000.0
    forest_var: float = 0.1
    forest_max_wave: float = 1215.67
    lr: float = 1e-3
    lr_final_fraction: float = 0.05
    batch_size: int = 64
    epochs: int = 30
    patience: int = 8
    seed: int = 0
    val_fraction: float = 0.1

    def __post_init__(self) -> None:
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        if self.npix < 2 or self.latent_dim < 1 or self.linear_dim < 0 or not self.channels:
            raise ValueError(f"invalid VAE shape: {self}")
        if self.kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd, got {self.kernel_size}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")

    @property
    def code_dim(self) -> int:
        """Length of a spectrum's code: latent posterior mean, then eigenspectrum coefficients."""
        return self.latent_dim + self.linear_dim

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON description."""
        d = asdict(self)
        d["channels"] = list(self.channels)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VAEConfig:
        """Inverse of ``to_dict``; unknown keys raise ValueError."""
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown VAE config key(s): {', '.join(sorted(unknown))}")
        return cls(**d)


class SpectrumVAE(nn.Module):
    """Convolutional VAE: (flux, mask) on ``npix`` pixels -> latent Gaussian -> flux on the grid."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        k, pad = config.kernel_size, config.kernel_size // 2
        widths = (2, *config.channels)
        self.encoder = nn.Sequential(
            *(
                layer
                for c_in, c_out in itertools.pairwise(widths)
                for layer in (nn.Conv1d(c_in, c_out, k, stride=2, padding=pad), nn.LeakyReLU(0.1))
            )
        )
        self.bottom_len = math.ceil(config.npix / 2 ** len(config.channels))
        bottom = config.channels[-1] * self.bottom_len
        self.to_posterior = nn.Linear(bottom, 2 * config.latent_dim)
        self.from_latent = nn.Linear(config.latent_dim, bottom)
        up = config.channels[::-1]
        self.decoder = nn.Sequential(
            *(
                layer
                for c_in, c_out in zip(up, (*up[1:], up[-1]), strict=True)
                for layer in (
                    nn.ConvTranspose1d(c_in, c_out, 4, stride=2, padding=1),  # doubles the length
                    nn.LeakyReLU(0.1),
                )
            ),
            nn.Conv1d(up[-1], 1, k, padding=pad),
        )
        # Eigenspectra of the linear part (columns), coefficients solved per spectrum; training
        # starts them from the principal components of the training spectra
        # (``training.principal_spectra``).
        self.eigen = nn.Parameter(torch.zeros(config.npix, config.linear_dim))
        # Per-pixel offset: learns the mean spectrum so the decoder models departures from it.
        self.offset = nn.Parameter(torch.ones(config.npix))
        # Per-pixel extra variance as a fraction of model^2, one row per quasar-redshift bin
        # (``EXTRA_VAR_ROWS``, inner bin edges ``extra_var_edges``): the forest prior for training
        # (``set_grid``, one bin), then the variance measured after training (``set_extra_var``).
        self.register_buffer("extra_var", torch.zeros(EXTRA_VAR_ROWS, config.npix))
        self.register_buffer("extra_var_edges", torch.full((EXTRA_VAR_ROWS - 1,), math.inf))

    def set_grid(self, wave: np.ndarray) -> None:
        """Fill the per-pixel extra variance for rest-frame pixel centres ``wave`` (Angstrom)."""
        self.set_extra_var(np.where(self.forest_pixels(wave), self.config.forest_var, 0.0))

    def forest_pixels(self, wave: np.ndarray) -> np.ndarray:
        """(npix,) bool: pixel centres ``wave`` (rest A) inside the Lyman-alpha forest."""
        return np.asarray(wave) < self.config.forest_max_wave

    def set_extra_var(self, extra: np.ndarray, edges: np.ndarray | None = None) -> None:
        """Set the extra variance (fraction of model^2): (npix,) for every redshift, or (k, npix)
        for k redshift bins with the k - 1 inner bin ``edges`` (k <= ``EXTRA_VAR_ROWS``)."""
        extra = np.atleast_2d(np.asarray(extra, dtype=np.float32))
        k = len(extra)
        inner = np.asarray([] if edges is None else edges, dtype=np.float32)
        if k > EXTRA_VAR_ROWS or inner.shape != (k - 1,) or np.any(np.diff(inner) <= 0):
            raise ValueError(
                f"extra variance of {k} redshift bins needs {k - 1} increasing edges and at most "
                f"{EXTRA_VAR_ROWS} bins, got edges {inner.tolist()}"
            )
        rows = np.concatenate([extra, np.repeat(extra[-1:], EXTRA_VAR_ROWS - k, axis=0)])
        self.extra_var.copy_(torch.from_numpy(rows))
        padded = np.concatenate([inner, np.full(EXTRA_VAR_ROWS - k, np.inf, np.float32)])
        self.extra_var_edges.copy_(torch.from_numpy(padded))

    def extra_variance(self, redshift: torch.Tensor | None) -> torch.Tensor:
        """Extra variance of each spectrum (n, npix) at quasar ``redshift`` (n,); None only while
        the variance does not depend on redshift (the training prior), giving (npix,)."""
        if redshift is None:
            if torch.isfinite(self.extra_var_edges[0]):
                raise ValueError("the extra variance depends on redshift: pass the redshifts")
            return self.extra_var[0]
        rows = torch.searchsorted(
            self.extra_var_edges, redshift.to(self.extra_var_edges.dtype).contiguous(), right=True
        )
        return self.extra_var[rows]

    def effective_ivar(
        self, ivar: torch.Tensor, model: torch.Tensor, redshift: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``ivar`` with the extra variance ``extra_var * model^2`` added (model not differentiated:
        training cannot lower its chi2 by inflating the forest)."""
        extra = self.extra_variance(redshift) * model.detach() ** 2
        return ivar / (1.0 + ivar * extra.to(ivar.dtype))

    def encode(self, flux: torch.Tensor, good: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean and log-variance, each (n, latent_dim)."""
        clipped = flux.clamp(-self.config.input_clip, self.config.input_clip)
        x = torch.stack((clipped * good, good), dim=1)
        h = self.encoder(x).flatten(1)
        mu, logvar = self.to_posterior(h).chunk(2, dim=1)
        return mu, logvar.clamp(-20.0, 10.0)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Non-linear part of the reconstruction (n, npix): mean spectrum + decoder output."""
        h = self.from_latent(z).view(len(z), self.config.channels[-1], self.bottom_len)
        return self.decoder(h)[:, 0, : self.config.npix] + self.offset

    def linear_coefficients(
        self,
        flux: torch.Tensor,
        ivar: torch.Tensor,
        base: torch.Tensor,
        redshift: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """MAP coefficients (n, linear_dim) of the eigenspectra fitting ``flux - base``: solves
        ``(E^T W E + I) c = E^T W (flux - base)`` with W the effective ivar at model ``base``."""
        e = self.eigen.to(flux.dtype)
        w = self.effective_ivar(ivar, base, redshift)
        weighted = e.unsqueeze(0) * w.sqrt().unsqueeze(2)  # (n, npix, k)
        normal = weighted.transpose(1, 2) @ weighted
        normal = normal + torch.eye(e.shape[1], dtype=flux.dtype, device=flux.device)
        rhs = (w * (flux - base)) @ e
        return torch.linalg.solve(normal, rhs)

    def reconstruct(
        self,
        flux: torch.Tensor,
        ivar: torch.Tensor,
        z: torch.Tensor,
        redshift: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Reconstruction (n, npix) of ``flux`` from latent ``z`` and its linear coefficients."""
        base = self.decode(z).to(flux.dtype)
        if self.config.linear_dim == 0:
            return base, base.new_zeros((len(base), 0))
        coef = self.linear_coefficients(flux, ivar, base, redshift)
        return base + coef @ self.eigen.to(flux.dtype).T, coef

    @torch.no_grad()
    def fit_spectra(
        self, flux: torch.Tensor, ivar: torch.Tensor, redshift: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Reconstruction (float64, from the posterior mean), posterior mean and coefficients of
        cleaned float32 ``flux``/``ivar`` of quasars at ``redshift``; the linear solve runs in
        float64 so the result does not depend on the thread count."""
        mu, _ = self.encode(flux, (ivar > 0).to(flux.dtype))
        recon, coef = self.reconstruct(flux.double(), ivar.double(), mu, redshift)
        return recon, mu, coef

    def forward(
        self, flux: torch.Tensor, ivar: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Reconstruction, posterior mean, log-variance and linear coefficients; the latent is
        sampled with ``generator`` (training), the posterior mean when ``generator`` is None."""
        mu, logvar = self.encode(flux, (ivar > 0).to(flux.dtype))
        z = mu
        if generator is not None:
            eps = torch.randn(mu.shape, generator=generator, dtype=mu.dtype).to(mu.device)
            z = mu + eps * torch.exp(0.5 * logvar)
        recon, coef = self.reconstruct(flux, ivar, z)
        return recon, mu, logvar, coef


def clean_inputs(flux: np.ndarray, ivar: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flux and ivar as float32 with non-finite or ivar <= 0 pixels masked (flux 0, ivar 0).

    NaN or inf in a shard is treated as missing data, never propagated into the network.
    """
    flux = np.asarray(flux, dtype=np.float32)
    ivar = np.asarray(ivar, dtype=np.float32)
    good = np.isfinite(flux) & np.isfinite(ivar) & (ivar > 0)
    return np.where(good, flux, 0.0).astype(np.float32), np.where(good, ivar, 0.0).astype(
        np.float32
    )


def chi2(flux: torch.Tensor, ivar: torch.Tensor, model: torch.Tensor) -> torch.Tensor:
    """Per-spectrum chi2 of ``model`` over the pixels with data (ivar > 0)."""
    return (ivar * (flux - model) ** 2).sum(dim=1)


def robust_chi2(
    flux: torch.Tensor, ivar: torch.Tensor, model: torch.Tensor, delta: float
) -> torch.Tensor:
    """Per-spectrum chi2 with Huber tails: a pixel deviating by more than ``delta`` sigma adds
    ``2 delta |chi| - delta^2`` instead of chi^2, so single wild pixels cannot dominate training."""
    chi = (flux - model).abs() * ivar.sqrt()
    return torch.where(chi <= delta, chi**2, 2 * delta * chi - delta**2).sum(dim=1)


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Per-spectrum KL(N(mu, exp(logvar)) || N(0, 1))."""
    return 0.5 * (mu**2 + logvar.exp() - 1.0 - logvar).sum(dim=1)


def vae_loss(
    model: SpectrumVAE,
    flux: torch.Tensor,
    ivar: torch.Tensor,
    pixel_weight: torch.Tensor,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Negative ELBO per pixel with data: (robust chi2_w / 2 + beta KL + |c|^2 / 2) summed over
    the batch, / good pixels.

    chi2_w uses the model's effective ivar (forest variance included) times ``pixel_weight``.

    ``pixel_weight`` (npix,) multiplies ivar (emission-line up-weighting); pixels without data
    contribute nothing whatever the reconstruction there. Without ``generator`` the latent is the
    posterior mean (deterministic: validation).
    """
    recon, mu, logvar, coef = model(flux, ivar, generator)
    ivar_eff = model.effective_ivar(ivar, recon) * pixel_weight
    data = 0.5 * robust_chi2(flux, ivar_eff, recon, model.config.huber_chi)
    prior = model.config.beta * kl_divergence(mu, logvar) + 0.5 * (coef**2).sum(dim=1)
    n_good = (ivar > 0).sum().clamp(min=1)
    return (data + prior).sum() / n_good


def line_pixel_weight(config: VAEConfig, wave: np.ndarray) -> np.ndarray:
    """(npix,) chi2 weights: ``line_weight`` inside the emission-line windows, 1 elsewhere."""
    weight = np.ones(len(wave), dtype=np.float32)
    half = config.line_half_width_kms / _C_KMS
    for line in EMISSION_LINES:
        weight[np.abs(wave / line - 1.0) <= half] = config.line_weight
    return weight
