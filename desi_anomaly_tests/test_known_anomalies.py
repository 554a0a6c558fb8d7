"""Recovery of known anomalous quasars: sky cross-match, recovery report, catalog merge."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from desi_anomaly.catalog.build import build_catalog
from desi_anomaly.validation import (
    KnownListError,
    crossmatch_known,
    known_recovery,
    merge_known,
    read_known_anomalies,
    recovery_summary,
)
from desi_anomaly.validation.known import unit_vectors

ARCSEC = 1.0 / 3600.0


def offset(ra: float, dec: float, arcsec: float, angle_deg: float) -> tuple[float, float]:
    """A position ``arcsec`` from (ra, dec) towards position angle ``angle_deg``."""
    a = np.radians(angle_deg)
    return (
        ra + arcsec * ARCSEC * np.sin(a) / np.cos(np.radians(dec)),
        dec + arcsec * ARCSEC * np.cos(a),
    )


@pytest.fixture
def known_csv(tmp_path):
    path = tmp_path / "known.csv"
    pd.DataFrame(
        {
            "SDSS_NAME": ["A", "B", "C"],
            "RA": [10.0, 150.0, 359.99995],
            "DEC": [-5.0, 60.0, 2.0],
            "Z": [2.1, 2.3, 2.0],
            "Anomaly_Type": ["red BAL", "FeLoBAL", "plateau-shaped"],
        }
    ).to_csv(path, index=False)
    return path


def scores_near(known: pd.DataFrame, seps: list[float]) -> pd.DataFrame:
    """One scored spectrum near each known object (``seps`` arcsec away) and two far ones."""
    pos = [
        offset(r, d, s, 37.0 * i)
        for i, (r, d, s) in enumerate(zip(known.RA, known.DEC, seps, strict=True))
    ]
    pos = [(r % 360.0, d) for r, d in pos]  # C's neighbour lies across RA = 0
    pos += [(40.0, 10.0), (0.0009, 2.0)]  # the second is 4 arcsec from C
    return pd.DataFrame(
        {
            "TARGETID": np.arange(100, 100 + len(pos)),
            "TARGET_RA": [p[0] for p in pos],
            "TARGET_DEC": [p[1] for p in pos],
            "RANK": np.arange(1, len(pos) + 1),
            "Q_VALUE": [0.001, 0.5, 0.004, 0.002, 0.003],
        }
    )


def test_read_known_list_finds_columns_and_names(known_csv):
    known = read_known_anomalies(known_csv)
    assert list(known.columns) == ["RA", "DEC", "KNOWN_TYPE", "KNOWN_NAME"]
    assert known["KNOWN_TYPE"].tolist() == ["red BAL", "FeLoBAL", "plateau-shaped"]
    assert known["KNOWN_NAME"].tolist() == ["A", "B", "C"]


def test_missing_coordinate_column_names_the_file_and_column(tmp_path, known_csv):
    path = tmp_path / "no_dec.csv"
    pd.read_csv(known_csv).drop(columns="DEC").to_csv(path, index=False)
    with pytest.raises(KnownListError, match=r"no_dec\.csv: no DEC column"):
        read_known_anomalies(path)
    with pytest.raises(KnownListError, match=r"known\.csv: no column 'Kind'"):
        read_known_anomalies(known_csv, type_column="Kind")
    bad = tmp_path / "bad_dec.csv"
    pd.read_csv(known_csv).assign(DEC=[1.0, 95.0, "x"]).to_csv(bad, index=False)
    with pytest.raises(KnownListError, match=r"bad_dec\.csv.*2 row\(s\) with missing or invalid"):
        read_known_anomalies(bad)
    with pytest.raises(KnownListError, match="does not exist"):
        read_known_anomalies(tmp_path / "absent.csv")


def test_crossmatch_within_one_arcsec_and_not_at_two(known_csv):
    known = read_known_anomalies(known_csv)
    close = crossmatch_known(scores_near(known, [0.6, 0.9, 0.3]), known)
    assert close["KNOWN_NAME"].tolist() == ["A", "B", "C", "", ""]
    assert close["KNOWN_TYPE"].tolist()[:3] == ["red BAL", "FeLoBAL", "plateau-shaped"]
    assert np.allclose(close["KNOWN_SEP_ARCSEC"][:3], [0.6, 0.9, 0.3], atol=1e-3)
    assert close["KNOWN_SEP_ARCSEC"][3:].isna().all()
    far = crossmatch_known(scores_near(known, [2.0, 2.0, 2.0]), known)
    assert (far["KNOWN_NAME"] == "").all() and (far["KNOWN_INDEX"] == -1).all()
    wide = crossmatch_known(scores_near(known, [2.0, 2.0, 2.0]), known, radius_arcsec=2.5)
    assert wide["KNOWN_NAME"].tolist()[:3] == ["A", "B", "C"]


def test_recovery_report_gives_rank_q_and_recovered(known_csv):
    known = read_known_anomalies(known_csv)
    scores = scores_near(known, [0.5, 0.5, 3.0])  # C is not matched
    report = known_recovery(scores, known, alpha=0.01)
    assert report["MATCHED"].tolist() == [True, True, False]
    assert report["TARGETID"].tolist() == [100, 101, -1]
    assert report["RANK"].tolist()[:2] == [1, 2] and np.isnan(report["RANK"][2])
    assert report["RECOVERED"].tolist() == [True, False, False]  # B has q = 0.5
    summary = recovery_summary(report).set_index("KNOWN_TYPE")
    assert summary.loc["all", "N_KNOWN"] == 3 and summary.loc["all", "N_RECOVERED"] == 1
    assert summary.loc["all", "RECALL"] == 0.5
    assert np.isnan(summary.loc["plateau-shaped", "RECALL"])


def test_closest_of_several_spectra_represents_a_known_object(known_csv):
    known = read_known_anomalies(known_csv).iloc[:1]
    near, nearer = offset(10.0, -5.0, 0.8, 0.0), offset(10.0, -5.0, 0.2, 90.0)
    scores = pd.DataFrame(
        {"TARGETID": [7, 8], "TARGET_RA": [near[0], nearer[0]],
         "TARGET_DEC": [near[1], nearer[1]], "Q_VALUE": [0.001, 0.3]}
    )  # fmt: skip
    report = known_recovery(scores, known)
    assert report["TARGETID"].tolist() == [8] and not report["RECOVERED"][0]
    assert np.isnan(report["RANK"][0])  # scores without RANK


def test_matches_merge_into_build_catalog(known_csv):
    known = read_known_anomalies(known_csv)
    scores = scores_near(known, [0.5, 0.5, 0.5]).drop(columns="RANK")
    scores = scores.assign(
        PARTITION="main-dark-9557", ANOMALY_SCORE=[9.0, 1.0, 7.0, 8.0, 6.0], P_VALUE=1e-4, Z=2.0
    )
    clusters = pd.DataFrame({"TARGETID": [100, 103], "CLUSTER": [0, 1], "TYPE": ["BAL-like"] * 2})
    merged = merge_known(clusters, crossmatch_known(scores, known))
    assert sorted(merged["TARGETID"]) == [100, 101, 102, 103]
    cat = build_catalog(scores, merged, alpha=0.01).set_index("TARGETID")
    assert cat.loc[100, "KNOWN_NAME"] == "A" and cat.loc[100, "TYPE"] == "BAL-like"
    assert cat.loc[102, "KNOWN_TYPE"] == "plateau-shaped" and cat.loc[102, "CLUSTER"] == -1
    assert cat.loc[103, "KNOWN_NAME"] == "" and 101 not in cat.index  # q = 0.5
    assert cat.loc[100, "FOLLOWUP_PRIORITY"] == "medium"  # already known


def test_squad_list_is_recovered_from_shifted_positions(shared_data):
    path = shared_data / "known-anomalies" / "SQuAD_I_catalog.csv"
    with pytest.warns(UserWarning, match="168 repeated row"):
        known = read_known_anomalies(path)
    assert len(known) == 2066 - 168 and (known["KNOWN_TYPE"] != "").all()
    rng = np.random.default_rng(0)
    pick = rng.choice(len(known), 300, replace=False)
    shifted = [offset(known.RA[i], known.DEC[i], 0.7, rng.uniform(0, 360)) for i in pick]
    decoys = rng.uniform([0, -10], [360, 60], size=(5000, 2))
    ra = np.r_[[p[0] for p in shifted], decoys[:, 0]]
    dec = np.r_[[p[1] for p in shifted], decoys[:, 1]]
    scores = pd.DataFrame(
        {"TARGETID": np.arange(len(ra)), "TARGET_RA": ra, "TARGET_DEC": dec, "Q_VALUE": 0.001}
    )
    matches = crossmatch_known(scores, known)
    found = matches["KNOWN_INDEX"][:300].to_numpy()
    assert np.allclose(known.RA[found], known.RA[pick]) and np.allclose(
        known.DEC[found], known.DEC[pick]
    )
    for i, j in zip(pick, range(300), strict=True):
        assert known["KNOWN_TYPE"][i] in matches["KNOWN_TYPE"][j].split("; ")
        assert known["KNOWN_NAME"][i] in matches["KNOWN_NAME"][j]
    assert (matches["KNOWN_INDEX"][300:] == -1).all()
    report = known_recovery(scores, known)
    # the 300 picked objects and any other entry listed at one of their positions
    same_position = known.set_index(["RA", "DEC"]).index.isin(
        list(zip(known.RA[pick], known.DEC[pick], strict=True))
    )
    assert report["RECOVERED"].to_numpy().tolist() == same_position.tolist()
    assert np.all(report.loc[report["MATCHED"], "SEP_ARCSEC"].between(0.69, 0.71))


def test_entries_at_one_position_with_different_types_are_all_reported(tmp_path):
    path = tmp_path / "two_types.csv"
    pd.DataFrame(
        {"NAME": ["X", "X", "X"], "RA": [5.0, 5.0, 5.0], "DEC": [1.0, 1.0, 1.0],
         "TYPE": ["flat BAL", "red BAL", "flat BAL"]}
    ).to_csv(path, index=False)  # fmt: skip
    with pytest.warns(UserWarning, match="1 repeated row"):
        known = read_known_anomalies(path)
    scores = pd.DataFrame({"TARGETID": [1], "TARGET_RA": [5.0], "TARGET_DEC": [1.0 + 1e-4]})
    matches = crossmatch_known(scores, known)
    assert matches["KNOWN_TYPE"][0] == "flat BAL; red BAL" and matches["KNOWN_NAME"][0] == "X"


def test_unit_vectors_are_unit_length():
    v = unit_vectors(np.array([0.0, 90.0, 359.0]), np.array([0.0, 45.0, -89.0]))
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0)
