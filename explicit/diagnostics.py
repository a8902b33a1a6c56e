"""Convergence and cost diagnostics of a finished run (host numpy in, a JSON-ready dict out)."""

from __future__ import annotations

import math

import numpy as np
from numpyro.diagnostics import effective_sample_size, split_gelman_rubin

MIN_DRAWS = 4  # split R̂ halves each chain; numpyro needs >= 4 draws


def _finite_or_none(x) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def ess_rhat(x: np.ndarray) -> tuple[float | None, float | None]:
    """(ESS over all chains, split R̂) of draws x (n_chains, n_draws); None when undefined.

    Split R̂ compares the halves of every chain, so it is defined for one chain too (then it only
    detects drift within the chain, not disagreement between chains).
    """
    x = np.asarray(x, np.float64)
    if x.shape[1] < MIN_DRAWS or not np.all(np.isfinite(x)) or np.ptp(x) == 0:
        return None, None
    return (_finite_or_none(effective_sample_size(x)), _finite_or_none(split_gelman_rubin(x)))


def summarize(names, theta, potential_energy, grads_warmup, grads_sampling, div_warmup,
              div_sampling, step_size, accept_rate, wall_s, extra: dict | None = None) -> dict:
    """Diagnostics dict of a run.

    Args:
      names: d parameter names; theta: (n_chains, n_samples, d) constrained samples;
      potential_energy: (n_chains, n_samples); grads_warmup, grads_sampling: (n_chains,) gradient
      evaluations; div_warmup, div_sampling: (n_chains,) divergence counts; step_size,
      accept_rate, wall_s: (n_chains,) (accept_rate NaN for MCLMC).
    Returns per-parameter mean, std, ESS, split R̂; the same for the potential energy; totals;
    gradient evaluations per effective sample (sampling only, and with warm-up) using the smallest
    θ ESS; wall time and gradient evaluations per second.
    """
    theta = np.asarray(theta, np.float64)
    params = {}
    for i, name in enumerate(names):
        ess, rhat = ess_rhat(theta[..., i])
        params[name] = {"mean": float(theta[..., i].mean()), "std": float(theta[..., i].std()),
                        "ess": ess, "r_hat": rhat}
    ess_pe, rhat_pe = ess_rhat(potential_energy)
    g_w, g_s = int(np.sum(grads_warmup)), int(np.sum(grads_sampling))
    ess_values = [p["ess"] for p in params.values()]
    min_ess = None if any(e is None for e in ess_values) else min(ess_values)
    wall = float(np.sum(wall_s))
    out = {
        "num_chains": int(theta.shape[0]), "num_samples": int(theta.shape[1]),
        "parameters": params,
        "potential_energy": {"ess": ess_pe, "r_hat": rhat_pe},
        "divergences": {"warmup": int(np.sum(div_warmup)), "sampling": int(np.sum(div_sampling)),
                        "per_chain": [int(v) for v in div_sampling]},
        "step_size": [float(v) for v in step_size],
        "accept_rate": [_finite_or_none(v) for v in accept_rate],
        "gradient_evaluations": {"warmup": g_w, "sampling": g_s, "total": g_w + g_s,
                                 "per_chain_warmup": [int(v) for v in grads_warmup],
                                 "per_chain_sampling": [int(v) for v in grads_sampling]},
        "min_ess": min_ess,
        "grads_per_ess": None if not min_ess else g_s / min_ess,
        "grads_per_ess_with_warmup": None if not min_ess else (g_w + g_s) / min_ess,
        "wall_time_s": wall, "wall_time_s_per_chain": [float(v) for v in wall_s],
        "grads_per_second": (g_w + g_s) / wall if wall > 0 else None,
    }
    out.update(extra or {})
    return out
