"""Generate a mock DESI data drop: healpix coadd + redrock files in the release layout and a truth
table, reproducible from one seed."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from desi_anomaly.atomic import atomic_path
from desi_anomaly.io.instrument import ARM_GRIDS, ARMS, arm_wavelength
from desi_anomaly.io.partitions import PartitionKey

from . import targets as tg
from .anomalies import ANOMALY_KINDS, applicable, draw_params, inject
from .distributions import sample_masked_fraction, sample_redshift, sample_snr
from .igm import forest_transmission
from .observe import add_noise, split_arms
from .others import galaxies, stars
from .quasar import LINE_INDEX, draw_qso_params, qso_components
from .sky import arm_slices, bad_pixel_mask, merged_wavelength
from .writer import write_coadd, write_redrock

TRUTH_NAME = "truth.parquet"
#: Anomalies acting in the quasar rest frame (on the model) vs on the observed arm spectra.
REST_FRAME_KINDS = ("bal", "lobal", "dla", "reddened", "weak_line", "strong_feii")
#: Composition of the non-QSO rows: failed QSO targets (ZWARN != 0, bad fibres) and stars.
FRACTION_BAD_ZWARN = 0.10
FRACTION_BAD_FIBER = 0.04
FRACTION_STARS = 0.16
_CHUNK = 256  # spectra simulated at once


@dataclass
class DropSummary:
    """What ``generate_drop`` wrote."""

    out: Path
    files: list[Path] = field(default_factory=list)
    spectype_counts: dict[str, int] = field(default_factory=dict)
    anomaly_counts: dict[str, int] = field(default_factory=dict)
    n_qso_selected: int = 0
    truth_path: Path | None = None


@dataclass
class _Targets:
    """Per-target truth of one healpix file while it is simulated."""

    spectype: np.ndarray
    subtype: np.ndarray
    z: np.ndarray
    snr: np.ndarray
    zwarn: np.ndarray
    fiberstatus: np.ndarray
    desi_target: np.ndarray
    anomaly: np.ndarray
    params: list[dict]


def generate_drop(
    out: str | Path,
    n_tiles: int,
    per_tile: int,
    seed: int = 0,
    *,
    others_per_tile: int = 300,
    anomaly_fraction: float = 0.05,
    include_resolution: bool = False,
    survey: str = "main",
    program: str = "dark",
    progress: Callable[[int, int], None] | None = None,
) -> DropSummary:
    """Write ``n_tiles`` healpix coadd/redrock pairs under ``out`` and ``out/truth.parquet``.

    Each file holds ``per_tile`` selectable QSOs (SPECTYPE QSO, ZWARN 0, COADD_FIBERSTATUS 0) and
    ``others_per_tile`` other targets: galaxies, stars and QSO targets with ZWARN != 0 or a bad
    fibre. A fraction ``anomaly_fraction`` of the QSO spectra carries an injected anomaly.
    The same seed gives byte-identical data arrays.
    """
    if n_tiles < 1 or per_tile < 0 or others_per_tile < 0:
        raise ValueError("n_tiles must be >= 1 and per_tile, others_per_tile >= 0")
    out = Path(out)
    master = np.random.SeedSequence(seed)
    file_seeds = master.spawn(n_tiles + 1)
    healpix = tg.choose_healpix(n_tiles, np.random.default_rng(file_seeds[0]))
    summary = DropSummary(out)
    truths = []
    for i, hpx in enumerate(healpix):
        key = PartitionKey(survey, program, int(hpx))
        rng = np.random.default_rng(file_seeds[i + 1])
        truth = simulate_partition(
            out, key, per_tile, others_per_tile, anomaly_fraction, rng,
            include_resolution=include_resolution, seed=seed,
        )  # fmt: skip
        truths.append(truth)
        summary.files += [
            out / key.directory / key.coadd_name(),
            out / key.directory / key.redrock_name(),
        ]
        if progress is not None:
            progress(i + 1, n_tiles)
    table = pd.concat(truths, ignore_index=True)
    summary.truth_path = out / TRUTH_NAME
    with atomic_path(summary.truth_path) as tmp:
        pq.write_table(pa.Table.from_pandas(table, preserve_index=False), tmp)
    summary.spectype_counts = dict(Counter(table["SPECTYPE"]))
    summary.anomaly_counts = dict(Counter(table.loc[table["ANOMALY"] != "none", "ANOMALY"]))
    summary.n_qso_selected = int(table["IS_QSO_SELECTED"].sum())
    return summary


def simulate_partition(
    out: Path,
    key: PartitionKey,
    per_tile: int,
    others_per_tile: int,
    anomaly_fraction: float,
    rng: np.random.Generator,
    *,
    include_resolution: bool = False,
    seed: int = 0,
) -> pd.DataFrame:
    """Simulate and write the coadd and redrock file of one healpix; return its truth rows."""
    t = _draw_targets(per_tile, others_per_tile, anomaly_fraction, rng)
    n = len(t.z)
    targetid = tg.target_ids(key.healpix, n, rng)
    ra, dec = tg.sky_positions(key.healpix, n, rng)
    exp = tg.exposures(targetid, ra, dec, key.healpix, rng)
    exptime = np.bincount(
        np.searchsorted(targetid, exp["TARGETID"]), weights=exp["EXPTIME"], minlength=n
    )
    noise_scale = np.sqrt(1000.0 / exptime) * np.exp(rng.normal(0.0, 0.15, n))
    lsf_scale = np.exp(rng.normal(0.0, 0.03, n))
    masks = bad_pixel_mask(
        {a: len(arm_wavelength(a)) for a in ARMS}, sample_masked_fraction(n, rng), rng
    )

    flux = {a: np.zeros((n, len(arm_wavelength(a))), np.float32) for a in ARMS}
    ivar = {a: np.zeros_like(flux[a]) for a in ARMS}
    photometry = {b: np.zeros(n, np.float32) for b in ("G", "R", "Z")}
    extra = {"AMPLITUDE": np.zeros(n), "N_ABSORBERS": np.zeros(n, np.int64)}
    qso_truth: dict[str, np.ndarray] = {}
    for start in range(0, n, _CHUNK):
        rows = np.arange(start, min(start + _CHUNK, n))
        model, info = _unit_models(t, rows, rng)
        for name, values in info.items():
            qso_truth.setdefault(name, np.full(n, np.nan))[rows] = values
        arm_models = split_arms(model, lsf_scale[rows])
        _apply_arm_anomalies(t, rows, arm_models, "arm_seam", rng)
        chunk_masks = {a: masks[a][rows] for a in ARMS}
        obs = add_noise(arm_models, t.snr[rows], noise_scale[rows], chunk_masks, rng,
                        exact_snr=t.spectype[rows] == "QSO")  # fmt: skip
        _apply_arm_anomalies(t, rows, obs.flux, "spikes", rng, ivar=obs.ivar)
        for a in ARMS:
            flux[a][rows], ivar[a][rows] = obs.flux[a], obs.ivar[a]
        for band, value in _photometry(model, obs.amplitude).items():
            photometry[band][rows] = value
        extra["AMPLITUDE"][rows] = obs.amplitude
        extra["N_ABSORBERS"][rows] = np.nan_to_num(info.get("N_ABSORBERS", 0))

    good_pix = sum(np.count_nonzero(ivar[a] > 0, axis=1) for a in ARMS)
    fmap = tg.fibermap(
        targetid, ra, dec, t.desi_target, np.full(n, "TGT"), t.fiberstatus, exp, photometry
    )
    scores = tg.scores(targetid, ivar)
    folder = out / key.directory
    write_coadd(folder / key.coadd_name(), key, seed, fmap, exp, flux, ivar, masks, scores,
                lsf_scale if include_resolution else None)  # fmt: skip
    deltachi2 = np.where(
        t.zwarn == 0, rng.lognormal(np.log(300.0), 1.2, n) + 25.0, rng.uniform(0.5, 9.0, n)
    )
    rr_subtype = np.where(t.spectype == "STAR", t.subtype, "")
    zcat = tg.redshifts(targetid, t.z, t.zwarn, t.spectype, rr_subtype, deltachi2, good_pix, rng)
    write_redrock(folder / key.redrock_name(), zcat, fmap, exp, scores)

    truth = pd.DataFrame({
        "TARGETID": targetid, "PARTITION": str(key), "HEALPIX": key.healpix,
        "SPECTYPE": t.spectype, "SUBTYPE": t.subtype, "Z": t.z, "ZWARN": t.zwarn,
        "COADD_FIBERSTATUS": t.fiberstatus,
        "IS_QSO_SELECTED": (t.spectype == "QSO") & (t.zwarn == 0) & (t.fiberstatus == 0),
        "ANOMALY": t.anomaly, "ANOMALY_PARAMS": [json.dumps(p, sort_keys=True) for p in t.params],
        "SNR_TARGET": t.snr, "AMPLITUDE": extra["AMPLITUDE"], "N_ABSORBERS": extra["N_ABSORBERS"],
        "MASKED_FRACTION": sum(np.count_nonzero(masks[a], axis=1) for a in ARMS)
        / sum(len(arm_wavelength(a)) for a in ARMS),
    })  # fmt: skip
    for name, values in qso_truth.items():
        if name != "N_ABSORBERS":
            truth[name] = values
    return truth


def _draw_targets(per_tile: int, others: int, anomaly_fraction: float, rng) -> _Targets:
    """Target classes, redshifts, S/N, flags and anomalies of one file, rows shuffled."""
    n_zwarn = round(FRACTION_BAD_ZWARN * others)
    n_fiber = round(FRACTION_BAD_FIBER * others)
    n_star = round(FRACTION_STARS * others)
    n_gal = others - n_zwarn - n_fiber - n_star
    n_qso = per_tile + n_zwarn + n_fiber
    spectype = np.array(["QSO"] * n_qso + ["GALAXY"] * n_gal + ["STAR"] * n_star, dtype=object)
    zwarn = np.zeros(len(spectype), np.int64)
    fiberstatus = np.zeros(len(spectype), np.int32)
    zwarn[per_tile : per_tile + n_zwarn] = rng.choice(
        [tg.ZWARN_SMALL_DELTA_CHI2, tg.ZWARN_SMALL_DELTA_CHI2 | tg.ZWARN_BAD_MINFLUX], n_zwarn
    )
    fiberstatus[per_tile + n_zwarn : n_qso] = rng.choice(
        [tg.FIBERSTATUS_BROKENFIBER, tg.FIBERSTATUS_BADPOSITION, tg.FIBERSTATUS_LOWEFFTIME], n_fiber
    )
    z = np.zeros(len(spectype))
    z[:n_qso] = sample_redshift(n_qso, rng)
    snr = np.zeros(len(spectype))
    snr[:n_qso] = sample_snr(n_qso, rng)
    snr[per_tile : per_tile + n_zwarn] *= 0.3  # redshift failures are the faint ones
    snr[n_qso:] = rng.lognormal(np.log(1.5), 0.8, n_gal + n_star)
    desi_target = np.zeros(len(spectype), np.int64)
    desi_target[:n_qso] = tg.DESI_TARGET_BITS["QSO"]
    anomaly = np.full(len(spectype), "none", dtype=object)
    params: list[dict] = [{} for _ in spectype]
    for i in np.flatnonzero(rng.random(n_qso) < anomaly_fraction):
        kinds = [k for k in ANOMALY_KINDS if applicable(k, z[i])]
        anomaly[i] = kinds[rng.integers(len(kinds))]
    order = rng.permutation(len(spectype))
    return _Targets(spectype[order], spectype[order].copy(), z[order], snr[order], zwarn[order],
                    fiberstatus[order], desi_target[order], anomaly[order], params)  # fmt: skip


def _unit_models(t: _Targets, rows: np.ndarray, rng) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Noiseless unit-amplitude models on the merged grid of the ``rows`` targets."""
    wave = merged_wavelength()
    model = np.zeros((len(rows), len(wave)), np.float32)
    info: dict[str, np.ndarray] = {}
    qso = np.flatnonzero(t.spectype[rows] == "QSO")
    if qso.size:
        r = rows[qso]
        p = draw_qso_params(t.z[r], rng)
        wave_rest = wave[None, :] / (1.0 + t.z[r, None])
        comp = qso_components(wave_rest, p)
        intrinsic = comp.flux
        for j, i in enumerate(r):
            if t.anomaly[i] in REST_FRAME_KINDS:
                intrinsic[j], t.params[i] = inject(
                    t.anomaly[i], wave_rest[j], intrinsic[j], rng, z=float(t.z[i]),
                    continuum=comp.continuum[j], lines=comp.lines[j], feii=comp.feii[j],
                )  # fmt: skip
        transmission, n_abs = forest_transmission(wave, t.z[r], rng)
        model[qso] = intrinsic * transmission
        info = {"ALPHA_NU": p.alpha_nu, "LOG_L": p.log_l, "FEII_AMP": p.feii,
                "EW_CIV": p.ew[:, LINE_INDEX["CIV"]], "EW_MGII": p.ew[:, LINE_INDEX["MgII"]],
                "N_ABSORBERS": n_abs}  # fmt: skip
        info = {k: _scatter(len(rows), qso, v) for k, v in info.items()}
    for kind, make in (("GALAXY", galaxies), ("STAR", stars)):
        sel = np.flatnonzero(t.spectype[rows] == kind)
        if sel.size:
            other = make(wave, sel.size, rng)
            model[sel] = other.model
            t.z[rows[sel]] = other.z
            t.subtype[rows[sel]] = other.subtype
            t.desi_target[rows[sel]] = [_other_target_bit(s) for s in other.subtype]
    # normalise each model to a median of 1 so that amplitudes are comparable
    norm = np.nan_to_num(np.nanmedian(model, axis=1), nan=1.0)
    model /= np.where(norm > 0, norm, 1.0)[:, None].astype(np.float32)
    return model, info


def _scatter(n: int, where: np.ndarray, values: np.ndarray) -> np.ndarray:
    out = np.full(n, np.nan)
    out[where] = values
    return out


def _other_target_bit(subtype: str) -> int:
    bits = tg.DESI_TARGET_BITS
    return {"ELG": bits["ELG"], "LRG": bits["LRG"], "BGS": bits["BGS_ANY"]}.get(
        subtype, bits["MWS_ANY"]
    )


def _apply_arm_anomalies(t: _Targets, rows, arm_flux: dict[str, np.ndarray], kind: str, rng,
                         ivar: dict[str, np.ndarray] | None = None) -> None:  # fmt: skip
    """Apply an observed-frame anomaly to the arm arrays (in place) of the affected rows."""
    wave = merged_wavelength()
    for j, i in enumerate(rows):
        if t.anomaly[i] != kind:
            continue
        z = float(t.z[i])
        if not t.params[i]:
            t.params[i] = draw_params(kind, rng, z, wave / (1 + z))
        params = dict(t.params[i])
        for arm in ARMS:
            if kind == "arm_seam" and params["arm"] != arm:
                continue
            if kind == "spikes":  # a cosmic hits one arm: the first arm covering the wavelength
                params["wave_obs"] = [w for w in t.params[i]["wave_obs"] if _first_arm(w) == arm]
            arm_rest = arm_wavelength(arm) / (1 + z)
            arm_ivar = None if ivar is None else ivar[arm][j]
            arm_flux[arm][j], _ = inject(
                kind, arm_rest, arm_flux[arm][j], rng, z=z, ivar=arm_ivar, **params
            )


def _first_arm(wave_obs: float) -> str:
    return next(a for a in ARMS if wave_obs <= ARM_GRIDS[a][1])


def _photometry(model: np.ndarray, amplitude: np.ndarray) -> dict[str, np.ndarray]:
    """Synthetic g, r, z fluxes (nanomaggies) of the noiseless models."""
    wave = merged_wavelength()
    out = {}
    for band, (lo, hi) in {"G": (4100, 5400), "R": (5700, 6900), "Z": (8500, 9800)}.items():
        sel = (wave >= lo) & (wave <= hi)
        f_lambda = amplitude * model[:, sel].mean(axis=1) * 1e-17
        f_nu = f_lambda * ((lo + hi) / 2) ** 2 / 2.998e18
        out[band] = f_nu / 3631e-23 * 1e9
    return out


__all__ = ["TRUTH_NAME", "DropSummary", "arm_slices", "generate_drop", "simulate_partition"]
