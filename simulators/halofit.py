"""Halofit nonlinear matter power spectrum (Takahashi et al. 2012 revision of Smith et al. 2003).

Units: k in h/Mpc, P in (Mpc/h)^3, lengths in Mpc/h. Linear input: ``cosmology.linear_power``
(Eisenstein & Hu 1998 with baryon wiggles, sigma8-normalised at z = 0) times D1(a)^2.

Model (Smith et al. 2003, MNRAS 341, 1311, Appendix C, eqs. C1-C4; revised coefficients of
Takahashi et al. 2012, ApJ 761, 152, Appendix A), with Delta^2(k) = k^3 P(k) / (2 pi^2):

  Delta^2_NL = Delta^2_Q + Delta^2_H,  y = k / k_sigma,  f(y) = y/4 + y^2/8,
  Delta^2_Q = Delta^2_L (1 + Delta^2_L)^beta_n / (1 + alpha_n Delta^2_L) exp(-f(y)),
  Delta^2_H = a_n y^(3 f1) / (1 + b_n y^f2 + (c_n f3 y)^(3 - gamma_n)) / (1 + mu_n/y + nu_n/y^2),

where k_sigma = 1/R_sigma with sigma(R_sigma, a) = 1 for the Gaussian filter,

  sigma^2(R, a) = int dln k Delta^2_L(k, a) exp(-k^2 R^2),                     (Smith eq. 54)
  n_eff + 3 = -dln sigma^2/dln R,  C = -d^2 ln sigma^2/dln R^2  at R_sigma.     (Smith eqs. 59-60)

With y = k R and S_m = int dln k Delta^2_L y^(2m) exp(-y^2): n_eff + 3 = 2 S_1/S_0 and
C = (n_eff + 3)^2 + 4 (S_1 - S_2)/S_0.

Dark energy enters through Omega_m(a), Omega_de(a) = 1 - Omega_m(a) (flat) and w(a) = w0 + wa (1 - a)
in the Omega_de (1 + w) terms of a_n and b_n (Takahashi's constant w, evaluated at the redshift of
interest, as CAMB's and jax_cosmo's halofit do). Takahashi et al. calibrated the fit for
0.1 <~ k <~ 30 h/Mpc, 0 <= z <= 10 and |w + 1| <~ 0.2 (their quoted accuracy ~5% for k < 1 h/Mpc and
~10% up to 10 h/Mpc); outside that range the formula is an extrapolation.

Numerics (pure JAX, float64, jit/grad-able): sigma^2 integrals are a trapezoid sum on a fixed grid
uniform in ln k (spectrally accurate for this smooth, rapidly decaying integrand). ln R_sigma is found
with gradients stopped (initial guess from a table of ln S_0 on a ln R grid, then Newton steps on
g(ln R) = ln S_0(R) + 2 ln D1(a)), followed by one Newton step with gradients on: since g = 0 at the
root, that step carries the exact first derivative d ln R_sigma / d theta = -(dg/dtheta) / g'
(implicit function theorem) while leaving the value unchanged.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from .cosmology import Cosmology, Omega_m_of_a, growth_table, linear_power

Array = jax.Array

# Quadrature grid for the Gaussian-filtered sigma^2: uniform in ln k over [1e-4, 1e4] h/Mpc. For
# R in [_R_MIN, _R_MAX] the integrand is < 1e-10 of its peak outside this range (exp(-(k R)^2) at the
# top end, Delta^2 ~ k^(3 + n_s) at the bottom), and d ln k = 0.036 samples the BAO wiggles ~10 times
# per period; doubling the resolution changes k_sigma, n_eff, C by < 2e-6 (relative) for 0.05 <= a <= 1.
_LNK_MIN, _LNK_MAX, _N_K = math.log(1e-4), math.log(1e4), 512
# Range of R_sigma [Mpc/h] searched: k_sigma in [0.01, 1000] h/Mpc. z = 0 has k_sigma ~ 0.3 h/Mpc;
# k_sigma reaches 1000 h/Mpc only at z ~ 10 or so, where halofit reduces to linear theory anyway.
_R_MIN, _R_MAX, _N_R_TABLE = 1e-3, 1e2, 64
_N_NEWTON = 3  # from the table guess, 2 steps already reach machine precision


def _f64(x) -> Array:
    return jnp.asarray(x, dtype=jnp.float64)


def _lnk_grid() -> tuple[np.ndarray, np.ndarray]:
    """(ln k nodes, trapezoid weights in ln k), both (_N_K,) numpy float64."""
    lnk = np.linspace(_LNK_MIN, _LNK_MAX, _N_K)
    w = np.full(_N_K, (_LNK_MAX - _LNK_MIN) / (_N_K - 1))
    w[[0, -1]] *= 0.5
    return lnk, w


def _moments(ln_r, lnk, wdelta2):
    """S_0, S_1, S_2 at ln R (any shape), S_m = sum_i wdelta2_i y_i^(2m) exp(-y_i^2), y = k R.

    wdelta2: (n_k,) quadrature weight times Delta^2_L(k, a=1). Returns three arrays of ln_r's shape.
    """
    y2 = jnp.exp(2.0 * (lnk + ln_r[..., None]))  # (..., n_k)
    g = wdelta2 * jnp.exp(-y2)
    return g.sum(-1), (g * y2).sum(-1), (g * y2 * y2).sum(-1)


def halofit_parameters(cosmo: Cosmology, a) -> tuple[Array, Array, Array]:
    """Nonlinear scale k_sigma [h/Mpc], effective index n_eff and curvature C at scale factor a.

    a: scale factor(s), any shape, in (0, 1]. Returns three float64 arrays of a's shape. k_sigma is
    clipped to [1/_R_MAX, 1/_R_MIN] = [0.01, 1000] h/Mpc (reached only at z >~ 10, where the
    nonlinear correction is negligible).
    """
    a = _f64(a)
    lnk, wk = _lnk_grid()
    k = np.exp(lnk)
    wdelta2 = jnp.asarray(wk * k**3 / (2.0 * np.pi**2)) * linear_power(cosmo, jnp.asarray(k))  # (n_k,)
    ln_d = jnp.log(growth_table(cosmo).D1_at(a))
    return _parameters_from_grid(wdelta2, ln_d)


def _parameters_from_grid(wdelta2, ln_d):
    """k_sigma, n_eff, C from weighted z = 0 Delta^2 on the ln k grid and ln D1 (any shape)."""
    lnk = jnp.asarray(_lnk_grid()[0])
    lo, hi = math.log(_R_MIN), math.log(_R_MAX)

    # --- root of g(x) = ln S_0(x) + 2 ln D = 0 in x = ln R, with gradients stopped
    wd_s, lnd_s = jax.lax.stop_gradient(wdelta2), jax.lax.stop_gradient(ln_d)
    x_tab = jnp.linspace(lo, hi, _N_R_TABLE)
    ln_s0_tab = jnp.log(_moments(x_tab, lnk, wd_s)[0])  # decreasing in x
    # linear interpolation of the inverse function: -ln S_0 is increasing in x
    x = jnp.interp(2.0 * lnd_s, -ln_s0_tab, x_tab)
    for _ in range(_N_NEWTON):
        s0, s1, _ = _moments(x, lnk, wd_s)
        # g'(x) = dln S_0/dln R = -2 S_1/S_0 < 0
        x = jnp.clip(x + (jnp.log(s0) + 2.0 * lnd_s) * s0 / (2.0 * s1), lo, hi)
    x = jax.lax.stop_gradient(x)

    # --- one Newton step with gradients: exact first derivative of the root, value unchanged
    s0, s1, _ = _moments(x, lnk, wdelta2)
    x = jnp.clip(x + (jnp.log(s0) + 2.0 * ln_d) * s0 / (2.0 * s1), lo, hi)

    s0, s1, s2 = _moments(x, lnk, wdelta2)  # D^2 cancels in the ratios below
    n_eff = 2.0 * s1 / s0 - 3.0
    curv = (n_eff + 3.0) ** 2 + 4.0 * (s1 - s2) / s0
    return jnp.exp(-x), n_eff, curv


def nonlinear_power(cosmo: Cosmology, k, a) -> Array:
    """Halofit (Takahashi et al. 2012) nonlinear matter power spectrum P_NL(k, a) in (Mpc/h)^3.

    Args:
      cosmo: parameters (may be traced; flat w0waCDM as in ``cosmology``).
      k: wavenumbers in h/Mpc, > 0.
      a: scale factors in (0, 1]. k and a broadcast against each other; the halofit parameters
        (k_sigma, n_eff, C) are computed once per element of a, so pass a at its smallest shape:
        e.g. k (n,) with scalar a for a spectrum, k (n,) with a (n,) elementwise, or
        k (n_ell, n_chi) with a (n_chi,) along a Limber chi grid.
    Returns: float64 array of shape broadcast(k.shape, a.shape).
    """
    k = _f64(k)
    a = _f64(a)
    lnk, wk = _lnk_grid()
    kg = np.exp(lnk)
    # one linear_power call for the quadrature grid and the requested k (one sigma8 normalisation)
    p_all = linear_power(cosmo, jnp.concatenate([jnp.asarray(kg), k.reshape(-1)]))
    wdelta2 = jnp.asarray(wk * kg**3 / (2.0 * np.pi**2)) * p_all[:_N_K]
    p_lin0 = p_all[_N_K:].reshape(k.shape)

    d1 = growth_table(cosmo).D1_at(a)
    k_sigma, n, c = _parameters_from_grid(wdelta2, jnp.log(d1))

    om_a = Omega_m_of_a(cosmo, a)
    ode_w = (1.0 - om_a) * (1.0 + _f64(cosmo.w0) + _f64(cosmo.wa) * (1.0 - a))  # Omega_de(a) (1 + w(a))

    # Takahashi et al. 2012, Appendix A coefficients (log = log10)
    a_n = 10.0 ** (1.5222 + 2.8553 * n + 2.3706 * n**2 + 0.9903 * n**3 + 0.2250 * n**4
                   - 0.6038 * c + 0.1749 * ode_w)
    b_n = 10.0 ** (-0.5642 + 0.5864 * n + 0.5716 * n**2 - 1.5474 * c + 0.2279 * ode_w)
    c_n = 10.0 ** (0.3698 + 2.0404 * n + 0.8161 * n**2 + 0.5869 * c)
    gamma_n = 0.1971 - 0.0843 * n + 0.8460 * c
    alpha_n = jnp.abs(6.0835 + 1.3373 * n - 0.1959 * n**2 - 5.5274 * c)
    beta_n = 2.0379 - 0.7354 * n + 0.3157 * n**2 + 1.2490 * n**3 + 0.3980 * n**4 - 0.1682 * c
    nu_n = 10.0 ** (5.2105 + 3.6902 * n)  # mu_n = 0
    # flat universe: Smith eqs. C17-C18 in their Omega_de-dominated form, as in Takahashi Appendix A
    f1 = om_a ** -0.0307
    f2 = om_a ** -0.0585
    f3 = om_a ** 0.0743

    d2_lin = k**3 * p_lin0 * d1**2 / (2.0 * jnp.pi**2)
    y = k / k_sigma
    # two-halo term (Smith eq. C2)
    d2_q = d2_lin * (1.0 + d2_lin) ** beta_n / (1.0 + alpha_n * d2_lin) * jnp.exp(-(y / 4.0 + y * y / 8.0))
    # one-halo term (Smith eqs. C3-C4 with mu_n = 0)
    d2_h = a_n * y ** (3.0 * f1) / (1.0 + b_n * y**f2 + (c_n * f3 * y) ** (3.0 - gamma_n))
    d2_h = d2_h / (1.0 + nu_n / (y * y))
    return (d2_q + d2_h) * 2.0 * jnp.pi**2 / k**3
