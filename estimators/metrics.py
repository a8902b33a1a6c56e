"""Posterior comparison metrics: C2ST, figure of merit, S8.

``c2st`` imports torch/sbi lazily, so ``fom`` and ``s8`` are usable without torch.
"""

from __future__ import annotations

import numpy as np


def c2st(a: np.ndarray, b: np.ndarray, *, seed: int = 0, n_folds: int = 5,
         classifier: str = "mlp") -> float:
    """Classifier two-sample test accuracy between samples a (n, d) and b (m, d).

    0.5: the classifier cannot tell them apart; 1.0: perfectly separable.
    Uses ``sbi.utils.metrics.c2st``: both samples z-scored with a's mean and std, then
    ``n_folds``-fold cross-validated accuracy of the classifier. classifier="mlp" (default) is
    sklearn's ``MLPClassifier`` with two ReLU hidden layers of 10·d units, adam, early
    stopping, max 1000 iterations (the sbibm / Zeghal et al. configuration); "rf" is a
    random forest. Deterministic given ``seed`` (classifier init and fold split).
    """
    import torch
    from sbi.utils.metrics import c2st as sbi_c2st

    a, b = (np.asarray(v, dtype=np.float64) for v in (a, b))
    if a.ndim == 1:
        a = a[:, None]
    if b.ndim == 1:
        b = b[:, None]
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"c2st: expected (n, d) and (m, d) samples, got {a.shape} and {b.shape}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("c2st: samples contain NaN or inf")
    if classifier not in ("mlp", "rf"):
        raise ValueError(f"c2st: classifier must be 'mlp' or 'rf', got {classifier!r}")
    acc = sbi_c2st(torch.from_numpy(a), torch.from_numpy(b), seed=seed, n_folds=n_folds,
                   classifier=classifier)
    return float(acc)


def fom(samples: np.ndarray) -> float:
    """Figure of merit 1/sqrt(det Cov) of 2-parameter samples (n, 2), in 1/(units of θ)²."""
    s = np.asarray(samples, dtype=np.float64)
    if s.ndim != 2 or s.shape[1] != 2 or s.shape[0] < 3:
        raise ValueError(f"fom: expected samples of shape (n >= 3, 2), got {s.shape}")
    return float(1.0 / np.sqrt(np.linalg.det(np.cov(s, rowvar=False))))


def s8(omega_m, sigma8):
    """S8 = σ8 · sqrt(Ω_m / 0.3); works elementwise on scalars or arrays."""
    return np.asarray(sigma8) * np.sqrt(np.asarray(omega_m) / 0.3)
