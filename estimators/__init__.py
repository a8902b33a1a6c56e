"""estimators: neural posterior estimation (sbi NPE), calibration (SBC, TARP) and C2ST.

The only package that imports torch. Importing ``estimators`` is light: names are re-exported
lazily (module ``__getattr__``), so torch/sbi load on first use of e.g. ``estimators.fit_npe``.

Public API::

    torch_prior(prior) -> IndependentPrior             # estimators.prior
    fit_npe(theta, x, prior_torch, ...) -> NPEResult    # estimators.npe
    MapEmbedding(n_bins, npix, n_out, ...)              # CNN for one-stage NPE on maps
    NPEResult.sample / .sample_batched / .log_prob / .log_prob_pairs / .save;  load_npe(dir)
    calibrate(posterior, theta_test, x_test, ...) -> dict   # estimators.calibration
    c2st(a, b, ...) -> float;  fom(samples) -> float;  s8(omega_m, sigma8)   # .metrics
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "torch_prior": "prior", "TruncatedNormal": "prior", "IndependentPrior": "prior",
    "fit_npe": "npe", "NPEResult": "npe", "MapEmbedding": "npe", "load_npe": "npe",
    "add_noise_copies": "npe",
    "calibrate": "calibration", "write_calibration": "calibration",
    "c2st": "metrics", "fom": "metrics", "s8": "metrics",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
