"""How much of a FID/KID is noise: bootstrap intervals from saved features, and the real-vs-real split.

Pure statistics over Inception features (numpy arrays or tensors [n, d]); `harness.evaluate` extracts the
features, caches them and writes the rows. docs/statistics.md explains the choices and gives measured costs.

Bootstrap (`bootstrap_scores`): `scipy.stats.bootstrap` draws the resamples (two samples, unpaired: the generated
and the reference features are resampled independently) and computes the interval; the data handed to it are
*row indices* into the feature matrices, not the features, so that scipy never materialises B copies of a
[10000, 2048] matrix and the statistic can work on counts. Each index array is given a leading axis of length 2
(the same indices twice): scipy resamples along the last axis only, so row 0 of the statistic's output is FID
and row 1 KID of the very same resample, from one call.

FID per resample uses tr sqrt(S1 S2) = sum sqrt(eig(G^T G)), G = F2^T F1 with S = F F^T (F = centred rows /
sqrt(n-1) when n <= d, else the Cholesky factor): symmetric eigenvalues of at most min(n, d) x min(n, d), in
float64, equal to torch-fidelity's `fid_statistics_to_metric` to ~1e-8 (tests/test_noise.py). When both sets are
smaller than d, resamples use the Gram matrices X1 X1', X2 X2', X2 X1' made once (centring on the Gram side), so
no 2048-wide product is made per resample. KID per resample is
the full-sample unbiased MMD^2 (same kernel as torch-fidelity's KID, same expectation as its subset mean) written
in resample counts w, v over pairs of *different* images: (w'Kw - sum w_i^2 K_ii)/(m^2 - sum w_i^2) + (same for
the reference) - 2 w'Kxy v/(mn); kernels computed block by block, once per call.

Resamples contain duplicates, which raises FID (and the U-statistic's KID) by a bias of their own; the reported
interval is the percentile interval shifted by that bias (observed + quantile - bootstrap mean), i.e. the spread
of the metric at the evaluation's own counts, centred on the value measured.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

CONFIDENCE = 0.95
METHOD = "percentile-shifted"  # what rows call the interval (bootstrap_method); see the module docstring
SCIPY_METHOD = "percentile"
KID_DEGREE, KID_COEF0 = 3, 1.0  # torch-fidelity's KID kernel defaults (gamma = 1/d)


# ------------------------------------------------------------------------------------------------------- FID


def _as_tensor(x, device) -> torch.Tensor:
    import torch

    if torch.is_tensor(x):
        return x.to(device=device, dtype=torch.float64)
    return torch.as_tensor(np.asarray(x), dtype=torch.float64, device=device)


def _moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean, a factor F of the covariance S = F F^T [d, min(n, d)], trace of S) of rows x [n, d]."""
    import torch

    n, d = x.shape
    mu = x.mean(0)
    a = x - mu
    if n <= d:  # S has rank < n: the centred rows are the smaller factor
        return mu, a.T / math.sqrt(n - 1), (a * a).sum() / (n - 1)
    cov = a.T @ a / (n - 1)
    factor, info = torch.linalg.cholesky_ex(cov)
    if int(info) != 0:  # singular (a constant feature, too few distinct rows): any square root will do
        values, vectors = torch.linalg.eigh(cov)
        factor = vectors * values.clamp(min=0).sqrt()
    return mu, factor, torch.diagonal(cov).sum()


def fid_from_moments(m1, m2) -> float:
    mu1, f1, tr1 = m1
    mu2, f2, tr2 = m2
    import torch

    g = f2.T @ f1
    gram = g.T @ g if g.shape[1] <= g.shape[0] else g @ g.T
    tr_sqrt = torch.linalg.eigvalsh(gram).clamp(min=0).sqrt().sum()
    diff = mu1 - mu2
    return float(diff @ diff + tr1 + tr2 - 2 * tr_sqrt)


def fid(features_1, features_2, device="cpu") -> float:
    """FID between two feature sets [n, d] (float64 arithmetic; n >= 2 each)."""
    return fid_from_moments(_moments(_as_tensor(features_1, device)), _moments(_as_tensor(features_2, device)))


# ------------------------------------------------------------------------------------------------------- KID


def _kernel(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (x @ y.T / x.shape[1] + KID_COEF0) ** KID_DEGREE


def _quad_forms(x: torch.Tensor, y: torch.Tensor, wx: torch.Tensor, wy: torch.Tensor, block: int = 2048):
    """Per column b: wx[:, b]' K(x, y) wy[:, b], with K made block by block (never [n, n] in memory)."""
    out = wx.new_zeros(wx.shape[1])
    for start in range(0, x.shape[0], block):
        k = _kernel(x[start:start + block], y)
        out += (wx[start:start + block] * (k @ wy)).sum(0)
    return out


def kid_unbiased(features_1, features_2, counts_1=None, counts_2=None, device="cpu") -> np.ndarray:
    """Full-sample unbiased MMD^2 (KID's kernel) of the multisets given by resample counts [n_i, B]
    (None: every row once). Returns [B]."""
    import torch

    x, y = _as_tensor(features_1, device), _as_tensor(features_2, device)
    w = torch.ones(len(x), 1, dtype=x.dtype, device=x.device) if counts_1 is None else _as_tensor(counts_1, device)
    v = torch.ones(len(y), 1, dtype=y.dtype, device=y.device) if counts_2 is None else _as_tensor(counts_2, device)
    m, n = w.sum(0), v.sum(0)
    diag_x = ((x * x).sum(1) / x.shape[1] + KID_COEF0) ** KID_DEGREE
    diag_y = ((y * y).sum(1) / y.shape[1] + KID_COEF0) ** KID_DEGREE
    # pairs of two different original images only: a resample's duplicates would otherwise add k(x, x) terms,
    # much larger than k(x, y) in 2048 dimensions, whose random number would dominate the spread
    kxx = (_quad_forms(x, x, w, w) - diag_x @ (w * w)) / (m * m - (w * w).sum(0))
    kyy = (_quad_forms(y, y, v, v) - diag_y @ (v * v)) / (n * n - (v * v).sum(0))
    kxy = _quad_forms(x, y, w, v) / (m * n)
    return (kxx + kyy - 2 * kxy).cpu().numpy()


# ------------------------------------------------------------------------------------------------- bootstrap


def _counts(indices: np.ndarray, n: int) -> np.ndarray:
    """[B, k] row indices -> [n, B] counts."""
    flat = indices + n * np.arange(len(indices))[:, None]
    return np.bincount(flat.ravel(), minlength=n * len(indices)).reshape(len(indices), n).T.astype(np.float64)


class _Statistic:
    """scipy's vectorised statistic over index arrays [2, batch, k] (see the module docstring)."""

    def __init__(self, gen, ref, want_fid: bool, want_kid: bool, device) -> None:
        self.gen, self.ref = _as_tensor(gen, device), _as_tensor(ref, device)
        self.want_fid, self.want_kid, self.device = want_fid, want_kid, device
        d = self.gen.shape[1]
        # Fewer images than dimensions in both sets: every resample's FID comes from the Gram matrices, made once
        self.gram = None
        if want_fid and len(self.gen) <= d and len(self.ref) <= d:
            self.gram = (self.gen @ self.gen.T, self.ref @ self.ref.T, self.ref @ self.gen.T)

    def _fid_gram(self, i1: torch.Tensor, i2: torch.Tensor) -> float:
        """FID of rows i1 of gen and i2 of ref from X1 X1', X2 X2', X2 X1' (centring done on the Gram side)."""
        import torch

        k11, k22, k21 = self.gram
        a, b, p = k11[i1][:, i1], k22[i2][:, i2], k21[i2][:, i1]
        m1, m2 = len(i1), len(i2)
        mean_term = a.sum() / m1 ** 2 + b.sum() / m2 ** 2 - 2 * p.sum() / (m1 * m2)
        tr1 = (torch.diagonal(a).sum() - a.sum() / m1) / (m1 - 1)
        tr2 = (torch.diagonal(b).sum() - b.sum() / m2) / (m2 - 1)
        g = p - p.mean(0, keepdim=True) - p.mean(1, keepdim=True) + p.mean()  # centred rows of ref x gen
        gram = g.T @ g if m1 <= m2 else g @ g.T
        tr_sqrt = torch.linalg.eigvalsh(gram).clamp(min=0).sqrt().sum() / math.sqrt((m1 - 1) * (m2 - 1))
        return float(mean_term + tr1 + tr2 - 2 * tr_sqrt)

    def __call__(self, ig: np.ndarray, ir: np.ndarray, axis: int = -1) -> np.ndarray:
        import torch

        ig, ir = np.asarray(ig), np.asarray(ir)
        single = ig.ndim == 2 and ir.ndim == 2  # the data themselves (BCa and 'basic' ask for the observed value)
        # rows 0 and 1 are the same indices; a sample without a batch axis (BCa's jackknife of the other) is one
        ig, ir = (a[0] if a.ndim == 3 else a[0][None] for a in (ig, ir))
        batch = max(len(ig), len(ir))
        ig = np.broadcast_to(ig, (batch, ig.shape[-1]))
        ir = np.broadcast_to(ir, (batch, ir.shape[-1]))
        out = np.zeros((2, batch))  # a metric not asked for stays 0 (a NaN row would make scipy warn)
        if self.want_fid:
            for b in range(batch):
                tg = torch.as_tensor(np.array(ig[b]), device=self.gen.device)  # a copy: broadcast views are
                tr = torch.as_tensor(np.array(ir[b]), device=self.ref.device)  # read-only
                out[0, b] = (self._fid_gram(tg, tr) if self.gram is not None
                             else fid_from_moments(_moments(self.gen[tg]), _moments(self.ref[tr])))
        if self.want_kid:
            out[1] = kid_unbiased(self.gen, self.ref, _counts(ig, len(self.gen)), _counts(ir, len(self.ref)),
                                  device=self.device)
        return out[:, 0] if single else out


def bootstrap_scores(gen, ref, observed: dict[str, float], resamples: int, seed: int, *, device="cpu",
                     method: str = SCIPY_METHOD, confidence: float = CONFIDENCE) -> dict[str, Any]:
    """Bootstrap spread of FID (and KID) between generated features `gen` [n1, d] and reference `ref` [n2, d].

    `observed`: torch-fidelity's keys for the measured values (frechet_inception_distance,
    kernel_inception_distance_mean); a metric is bootstrapped only when it is there. Returns the row keys
    fid_boot_std, fid_ci_low, fid_ci_high, kid_ci_low, kid_ci_high, bootstrap_method, bootstrap_resamples.
    Deterministic for a seed (numpy Generator). `resamples=0`: no bootstrap (method 'none').
    """
    from scipy import stats

    want_fid = "frechet_inception_distance" in observed
    want_kid = "kernel_inception_distance_mean" in observed
    if resamples <= 0 or not (want_fid or want_kid):
        return {"bootstrap_method": "none", "bootstrap_resamples": 0}
    statistic = _Statistic(gen, ref, want_fid, want_kid, device)
    data = (np.tile(np.arange(len(gen)), (2, 1)), np.tile(np.arange(len(ref)), (2, 1)))
    import torch

    threads = torch.get_num_threads()
    if statistic.gram is not None and statistic.gen.device.type == "cpu":
        # a few hundred rows: one thread is faster (6x for a 250 x 250 eigvalsh on a busy 2-core machine)
        torch.set_num_threads(1)
    try:
        res = stats.bootstrap(data, statistic, n_resamples=int(resamples), vectorized=True, paired=False,
                              axis=-1, confidence_level=confidence, method=method, rng=np.random.default_rng(seed))
    finally:
        torch.set_num_threads(threads)
    dist = np.asarray(res.bootstrap_distribution)
    low, high = np.asarray(res.confidence_interval.low), np.asarray(res.confidence_interval.high)
    out: dict[str, Any] = {"bootstrap_method": METHOD if method == SCIPY_METHOD else method,
                           "bootstrap_resamples": int(resamples)}
    for row, key, prefix in ((0, "frechet_inception_distance", "fid"), (1, "kernel_inception_distance_mean", "kid")):
        if key not in observed:
            continue
        value = float(observed[key])
        if method == SCIPY_METHOD:  # centre the resampling distribution on the value measured
            shift = value - float(np.mean(dist[row]))
            low_row, high_row = float(low[row]) + shift, float(high[row]) + shift
        else:
            low_row, high_row = float(low[row]), float(high[row])
        if prefix == "fid":
            out["fid_boot_std"] = float(np.std(dist[row], ddof=1))
        out[f"{prefix}_ci_low"], out[f"{prefix}_ci_high"] = low_row, high_row
    return out


# ------------------------------------------------------------------------------------------------ noise floor


def floor_split(dataset_images: int, n_ref: int, n_gen: int, minimum: int = 2) -> tuple[range, range, str]:
    """Two disjoint index ranges of the dataset for the real-vs-real floor, and a note ('' when exact).

    Set A is the evaluation's reference (the dataset's first n_ref images), set B the next n_gen images. When the
    dataset holds fewer than n_ref + n_gen, the split is reduced to the one whose finite-sample FID bias
    (about proportional to 1/a + 1/b) is closest to the evaluation's: a <= n_ref, b <= n_gen, a + b <= N, as
    balanced as those allow. A stays a prefix of the reference, so its features are the cached reference's rows.
    """
    total, n_ref, n_gen = int(dataset_images), int(n_ref), int(n_gen)
    if n_ref > total:
        raise ValueError(f"reference of {n_ref} images from a dataset of {total}")
    if total >= n_ref + n_gen:
        return range(0, n_ref), range(n_ref, n_ref + n_gen), ""
    if n_ref <= total / 2:
        a, b = n_ref, total - n_ref
    elif n_gen <= total / 2:
        a, b = total - n_gen, n_gen
    else:
        a = total // 2
        b = total - a
    if a < minimum or b < minimum:
        raise ValueError(f"a dataset of {total} images cannot hold two disjoint sets of {minimum} images")
    note = (f"dataset too small for two disjoint real sets of {n_ref} and {n_gen} images ({total} images): "
            f"floor measured between {a} and {b}, so it is somewhat higher than the floor at the "
            "evaluation's counts")
    return range(0, a), range(a, a + b), note
