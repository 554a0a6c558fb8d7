"""The classic baseline: PCA reconstruction error on the rest-frame flux.

``PCABaseline.fit`` fills the pixels without data of each normal training spectrum with the mean
spectrum (per-pixel mean over the spectra with data there) and fits ``sklearn`` PCA to the filled
spectra. ``score`` fits the mean plus the leading components to each spectrum by ivar-weighted
least squares over its good pixels only (coverage-aware: a spectrum covering a third of the grid
is fitted on that third) and returns the reduced chi2 of the fit over those pixels,
``chi2 / max(n_good - n_components, 1)``.
"""

from __future__ import annotations

import numpy as np
from sklearn.decomposition import PCA

from desi_anomaly.ml.vae import clean_inputs

from .injection import InjectionError

#: Relative ridge added to the normal equations, so sparsely covered spectra stay well posed.
RIDGE = 1e-6


class PCABaseline:
    """Mean + ``n_components`` PCA eigenspectra fitted to normal spectra (see module doc)."""

    def __init__(self, n_components: int = 10, *, seed: int = 0):
        self.n_components = int(n_components)
        self.seed = seed

    def fit(self, flux: np.ndarray, ivar: np.ndarray) -> PCABaseline:
        """Fit on normal training spectra (n, npix) on the rest-frame grid (ivar 0 = no data)."""
        flux, ivar = clean_inputs(flux, ivar)
        good = ivar > 0
        if len(flux) <= self.n_components:
            raise InjectionError(
                f"PCA baseline with {self.n_components} components needs more than "
                f"{self.n_components} training spectra, got {len(flux)}"
            )
        count = good.sum(axis=0)
        mean = np.divide(
            (flux * good).sum(axis=0), count, out=np.zeros(flux.shape[1]), where=count > 0
        )
        filled = np.where(good, flux, mean[None, :])
        pca = PCA(n_components=self.n_components, random_state=self.seed).fit(filled)
        self.mean_ = mean.astype(np.float64)
        self.components_ = pca.components_.astype(np.float64)  # (k, npix)
        self.explained_variance_ratio_ = pca.explained_variance_ratio_
        return self

    def reconstruct(self, flux: np.ndarray, ivar: np.ndarray) -> np.ndarray:
        """Ivar-weighted least-squares PCA model of each spectrum, fitted on its good pixels."""
        if not hasattr(self, "components_"):
            raise InjectionError("PCABaseline used before fit")
        flux, ivar = clean_inputs(flux, ivar)
        if flux.shape[1] != self.mean_.size:
            raise InjectionError(f"spectra have {flux.shape[1]} pixels, the PCA {self.mean_.size}")
        v = self.components_
        resid = (flux - self.mean_).astype(np.float64)
        w = ivar.astype(np.float64)
        a = np.einsum("kp,np,jp->nkj", v, w, v)  # V^T W V per spectrum
        b = np.einsum("kp,np->nk", v, w * resid)
        scale = np.trace(a, axis1=1, axis2=2)[:, None, None] / len(v)
        a += (RIDGE * np.maximum(scale, 1e-12)) * np.eye(len(v))[None]
        coef = np.linalg.solve(a, b[..., None])[..., 0]
        return self.mean_ + coef @ v

    def score(self, flux: np.ndarray, ivar: np.ndarray, *, batch_size: int = 512) -> np.ndarray:
        """Reduced chi2 of the PCA fit over each spectrum's good pixels (NaN without any)."""
        out = np.empty(len(flux), dtype=np.float64)
        for start in range(0, len(flux), batch_size):
            sel = slice(start, start + batch_size)
            f, iv = clean_inputs(flux[sel], ivar[sel])
            model = self.reconstruct(f, iv)
            chi2 = (iv * (f - model) ** 2).sum(axis=1)
            n_good = (iv > 0).sum(axis=1)
            dof = np.maximum(n_good - self.n_components, 1)
            out[sel] = np.where(n_good > 0, chi2 / dof, np.nan)
        return out
