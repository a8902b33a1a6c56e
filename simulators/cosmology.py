"""Background cosmology in pure JAX: expansion rate, distances, linear growth, linear power.

Model: spatially flat, matter + CPL dark energy w(a) = w0 + wa (1 - a), no radiation and no
massive neutrinos, so Omega_de = 1 - Omega_m. Units: distances in Mpc/h, wavenumbers in h/Mpc,
power in (Mpc/h)^3, H0 = 100 h km/s/Mpc.

Everything is a pure function of an immutable ``Cosmology`` pytree and works under ``jax.jit``,
``jax.grad`` and ``jax.vmap`` with respect to the parameters. Tables (``Background``,
``GrowthTable``) are float64 pytrees on a uniform grid in ln a, built once per cosmology inside the
caller's trace and interpolated locally with O(h^4) errors (4-point cubic Lagrange stencils for
distances, cubic Hermite with the ODE's derivatives for growth), far below the 1e-6 level at the
default resolutions. Float64 needs
``jax_enable_x64`` (``simulators.enable_x64()``; building a table without it raises).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from .runtime import require_x64

Array = jax.Array

C_OVER_H0 = 2997.92458  # c / H0 in Mpc/h (c = 299792.458 km/s, H0 = 100 h km/s/Mpc)
T_CMB = 2.7255  # K, used only by the Eisenstein & Hu transfer function

# sigma(R) quadrature grid: uniform in ln k over [1e-4, 1e2] h/Mpc, odd count for Simpson. The
# integrand k^3 P W^2 is < 1e-12 of its peak outside this range for any R >= ~1 Mpc/h, and 4097
# points (d ln k = 3.4e-3) resolve both the BAO wiggles and the window oscillations.
_K_MIN, _K_MAX, _N_K = 1e-4, 1e2, 4097


def _f64(x) -> Array:
    require_x64()  # every float64 table starts here: without x64 JAX would make it float32
    return jnp.asarray(x, dtype=jnp.float64)


# ------------------------------------------------------------------------------------------------
# Parameters


def _concrete_value(v):
    """v as a float64 numpy array if it is a concrete Python/NumPy number, else None.

    jax arrays are deliberately skipped: besides tracers, pytree transformations rebuild Cosmology
    from arbitrary leaves (gradients, which may be negative; batching sentinels; None).
    """
    if isinstance(v, (bool, int, float, np.number, np.ndarray)):
        return np.asarray(v, dtype=np.float64)
    return None


def _is_int_or_none(v) -> bool:
    return v is None or (isinstance(v, (int, np.integer)) and not isinstance(v, bool))


# The range of each parameter for which the background, growth and power spectrum are defined
# (Omega_c + Omega_b < 1 and w0 + wa < 0 are checked jointly); priors must lie inside them.
PARAM_RANGES = {"Omega_c": (0.0, 1.0), "Omega_b": (0.0, 1.0), "h": (0.2, 2.0), "n_s": (0.0, 2.0),
                "sigma8": (0.0, math.inf), "w0": (-3.0, 0.0), "wa": (-3.0, 3.0)}


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class Cosmology:
    """Flat w0waCDM parameters (all pytree leaves; scalars, or equal-shape arrays when batched).

    Attributes (allowed ranges, checked when the values are concrete Python/NumPy numbers):
      Omega_c: cold dark matter density today, > 0.
      Omega_b: baryon density today, >= 0; Omega_m = Omega_c + Omega_b must be < 1 (flat, with
        Omega_de = 1 - Omega_m > 0).
      h: H0 / (100 km/s/Mpc), in (0.2, 2).
      n_s: scalar spectral index, in (0, 2).
      sigma8: rms linear density contrast in 8 Mpc/h top-hat spheres at z = 0, > 0.
      w0: dark-energy equation of state today, in (-3, 0).
      wa: CPL evolution, in (-3, 3), with w0 + wa < 0 so that dark energy is negligible at early
        times (the growth initial conditions assume matter domination).
    All values must be finite. Validation is skipped for jax arrays (tracers, gradients, batches
    built by pytree maps) and for all-int/None instances, which are vmap axis specs
    (``in_axes=(Cosmology(0, None, None, None, None, None, None),)``). Python ints become floats.
    """

    Omega_c: float
    Omega_b: float
    h: float
    n_s: float
    sigma8: float
    w0: float = -1.0
    wa: float = 0.0

    def __post_init__(self):
        names = ("Omega_c", "Omega_b", "h", "n_s", "sigma8", "w0", "wa")
        # All ints/None is a vmap in_axes spec such as Cosmology(0, None, None, ...), never a
        # cosmology (Omega_c in (0, 1) cannot be an integer): leave it untouched.
        if all(_is_int_or_none(getattr(self, n)) for n in names):
            return
        vals = {}
        for name in names:
            raw = getattr(self, name)
            # Python/NumPy integers become floats so that grad works on every leaf.
            if raw is not None and _is_int_or_none(raw):
                object.__setattr__(self, name, float(raw))
            v = _concrete_value(raw)
            if v is None:
                continue
            if not np.all(np.isfinite(v)):
                raise ValueError(f"{name} must be finite, got {raw}")
            vals[name] = v

        def check(name, ok, rule):
            if name in vals and not np.all(ok(vals[name])):
                raise ValueError(f"{name} must be {rule}, got {getattr(self, name)}")

        check("Omega_c", lambda v: v > 0, "> 0")
        check("Omega_b", lambda v: v >= 0, ">= 0")
        for name in ("h", "n_s", "w0", "wa"):
            lo, hi = PARAM_RANGES[name]
            check(name, lambda v: (v > lo) & (v < hi), f"in ({lo:g}, {hi:g})")
        check("sigma8", lambda v: v > 0, "> 0")
        if "Omega_c" in vals and "Omega_b" in vals:
            om = vals["Omega_c"] + vals["Omega_b"]
            if not np.all(om < 1.0):
                raise ValueError(
                    f"Omega_m = Omega_c + Omega_b must be < 1 (flat universe with dark energy), got {om}"
                )
        if "w0" in vals and "wa" in vals:
            if not np.all(vals["w0"] + vals["wa"] < 0.0):
                raise ValueError(
                    "w0 + wa must be < 0 (dark energy subdominant at early times), "
                    f"got {vals['w0'] + vals['wa']}"
                )

    @property
    def Omega_m(self):
        """Total matter density today, Omega_c + Omega_b (dimensionless)."""
        return self.Omega_c + self.Omega_b

    @property
    def Omega_de(self):
        """Dark-energy density today, 1 - Omega_m (flatness)."""
        return 1.0 - self.Omega_m

    @classmethod
    def fiducial(cls) -> Cosmology:
        """LSST DESC Y10 fiducial (flat LCDM)."""
        return cls(Omega_c=0.2664, Omega_b=0.0492, h=0.6727, n_s=0.9645, sigma8=0.831, w0=-1.0, wa=0.0)


# ------------------------------------------------------------------------------------------------
# Expansion history


def _E2_and_dlnE(cosmo: Cosmology, log_a):
    """E^2 = (H/H0)^2 and dlnE/dlna at ln a (any shape); written in ln a to avoid log(exp(.))."""
    log_a = _f64(log_a)
    a = jnp.exp(log_a)
    om, w0, wa = _f64(cosmo.Omega_m), _f64(cosmo.w0), _f64(cosmo.wa)
    ode = 1.0 - om
    matter = om * jnp.exp(-3.0 * log_a)
    # CPL: rho_de / rho_de0 = a^{-3(1 + w0 + wa)} exp(-3 wa (1 - a))
    de = ode * jnp.exp(-3.0 * (1.0 + w0 + wa) * log_a - 3.0 * wa * (1.0 - a))
    E2 = matter + de
    w = w0 + wa * (1.0 - a)
    dE2 = -3.0 * matter - 3.0 * (1.0 + w) * de  # dE^2/dlna
    return E2, 0.5 * dE2 / E2


def E(cosmo: Cosmology, a) -> Array:
    """H(a)/H0 (dimensionless). a: scale factor, scalar or array of any shape; returns float64, same shape."""
    return jnp.sqrt(_E2_and_dlnE(cosmo, jnp.log(_f64(a)))[0])


def Omega_m_of_a(cosmo: Cosmology, a) -> Array:
    """Matter density parameter at a, Omega_m a^-3 / E(a)^2. a: any shape; returns float64, same shape."""
    a = _f64(a)
    return _f64(cosmo.Omega_m) / (a**3 * E(cosmo, a) ** 2)


# ------------------------------------------------------------------------------------------------
# Interpolation


def _interp_cubic(x, xp, fp):
    """Local cubic (4-point Lagrange) interpolation of fp(xp) at x; xp increasing, len >= 4.

    x is clipped to [xp[0], xp[-1]]. Differentiable in x, xp and fp (the stencil index is not).
    """
    n = xp.shape[0]
    x = jnp.clip(x, xp[0], xp[-1])
    # interval [xp[i], xp[i+1]] containing x, stencil i-1..i+2 (shifted inwards at the ends)
    i = jnp.clip(jnp.searchsorted(xp, x, side="right") - 1, 1, n - 3)
    xs = [xp[i + j] for j in (-1, 0, 1, 2)]
    fs = [fp[i + j] for j in (-1, 0, 1, 2)]
    out = jnp.zeros_like(x)
    for j in range(4):
        w = jnp.ones_like(x)
        for m in range(4):
            if m != j:
                w = w * (x - xs[m]) / (xs[j] - xs[m])
        out = out + w * fs[j]
    return out


def _log_a_grid(a_min, n: int) -> Array:
    if n < 4:
        raise ValueError(f"n must be >= 4 table points, got {n}")
    return jnp.linspace(jnp.log(_f64(a_min)), 0.0, n, dtype=jnp.float64)


# ------------------------------------------------------------------------------------------------
# Distances


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class Background:
    """Comoving distance table on a uniform ln a grid from a_min to 1.

    Attributes:
      log_a: (n,) ln a, increasing, last entry 0.
      chi: (n,) comoving distance to a in Mpc/h, decreasing, last entry 0.
    """

    log_a: Array
    chi: Array

    def comoving_distance(self, a) -> Array:
        """Comoving distance [Mpc/h] to scale factor a (any shape; clipped to [a_min, 1]). float64."""
        return _interp_cubic(jnp.log(_f64(a)), self.log_a, self.chi)

    def a_of_chi(self, chi) -> Array:
        """Scale factor at comoving distance chi [Mpc/h] (any shape; clipped to [0, chi(a_min)]). float64."""
        # chi is monotonic in a: interpolate ln a on the reversed (increasing) chi nodes.
        return jnp.exp(_interp_cubic(_f64(chi), self.chi[::-1], self.log_a[::-1]))


def background(cosmo: Cosmology, a_min: float = 1e-3, n: int = 1024) -> Background:
    """Comoving distance table, chi(a) = c/H0 int_a^1 da' / (a'^2 E(a')) in Mpc/h.

    Args:
      cosmo: parameters (may be traced).
      a_min: smallest tabulated scale factor (default 1e-3, z = 999).
      n: number of table points (static), uniform in ln a.
    Returns: Background with (n,) float64 arrays.
    """
    log_a = _log_a_grid(a_min, n)

    def integrand(x):  # d chi / d(-ln a) in Mpc/h
        return C_OVER_H0 / (jnp.exp(x) * jnp.sqrt(_E2_and_dlnE(cosmo, x)[0]))

    # Simpson per interval with a midpoint evaluation (error O(h^5) per interval).
    dx = log_a[1:] - log_a[:-1]
    mid = 0.5 * (log_a[1:] + log_a[:-1])
    g = integrand(log_a)
    pieces = dx / 6.0 * (g[:-1] + 4.0 * integrand(mid) + g[1:])
    # chi_i = sum_{j >= i} pieces_j, with chi = 0 at a = 1
    chi = jnp.concatenate([jnp.cumsum(pieces[::-1])[::-1], jnp.zeros(1, jnp.float64)])
    return Background(log_a=log_a, chi=chi)


def comoving_distance(cosmo: Cosmology, a, a_min: float = 1e-3, n: int = 1024) -> Array:
    """Comoving distance [Mpc/h] to scale factor a (any shape, >= a_min). Builds the table each call."""
    return background(cosmo, a_min, n).comoving_distance(a)


def a_of_chi(cosmo: Cosmology, chi, a_min: float = 1e-3, n: int = 1024) -> Array:
    """Scale factor at comoving distance chi [Mpc/h] (any shape). Builds the table each call."""
    return background(cosmo, a_min, n).a_of_chi(chi)


# For concrete cosmologies on the host: the table and the look-up as one compiled program (which
# JAX's persistent cache keeps between processes) instead of dozens of eagerly compiled operations.
comoving_distance_jit = jax.jit(comoving_distance, static_argnames=("a_min", "n"))


# ------------------------------------------------------------------------------------------------
# Linear growth


# Growth-table nodes (uniform in ln a from a_min to 1) and RK4 steps per node interval. Each
# interval is one iteration of a sequential loop, run forward and, under a gradient in the
# cosmology, in reverse; on an accelerator every iteration costs kernel launches, so the table's
# cost follows n, not the (scalar) arithmetic: the substeps share an iteration. Measured against an
# n = 8192 table over [a_min, 1], six cosmologies: <= 2.5e-8 relative for D1, D2, f1, f2 (one
# substep: 7.4e-8; the former 1024-node, one-substep Lagrange table: 1.5e-9), below float32's
# 6e-8, in which the PM uses them (NOTEBOOK 7l).
N_GROWTH = 256
GROWTH_SUBSTEPS = 2


def _uniform_cell(x, x0, dx, n: int):
    """Interval index i (clipped to [0, n - 2]) and offset t = (x - x0)/dx - i of x on the uniform
    grid x0 + k dx, k < n. Replaces a binary search (a loop of log2 n iterations) by arithmetic;
    t is differentiable in x, x0 and dx (the index is not)."""
    u = (x - x0) / dx
    i = jnp.clip(jnp.floor(u), 0, n - 2)
    return i.astype(jnp.int32), u - i


def _hermite(i, t, dx, f, df):
    """Cubic Hermite interpolant at offset t in interval i from node values f and node
    derivatives df (per unit x; dx the node spacing): exact for cubics, error O(dx^4 d^4f/dx^4)."""
    t2 = t * t
    t3 = t2 * t
    h00 = 2.0 * t3 - 3.0 * t2 + 1.0
    h10 = t3 - 2.0 * t2 + t
    h01 = -2.0 * t3 + 3.0 * t2
    h11 = t3 - t2
    return h00 * f[i] + h10 * dx * df[i] + h01 * f[i + 1] + h11 * dx * df[i + 1]


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class GrowthTable:
    """First- and second-order growth on a uniform ln a grid from a_min to 1.

    Attributes (all (n,) float64):
      log_a: ln a, increasing, uniform, last entry 0.
      D1: linear growth, normalised to D1(a=1) = 1 (D1 ~ a/a_1 deep in matter domination).
      D2: second-order growth in units of D1_raw(1)^2; NEGATIVE, D2 ~ -3/7 D1^2, for displacements
        x = q + D1 Psi1 + D2 Psi2 with lap(phi2) = sum_{i>j} (phi1_ii phi1_jj - phi1_ij^2), Psi2 = grad phi2.
      f1, f2: growth rates dlnD1/dlna and dlnD2/dlna (f2 > 0, ~ 2 Omega_m(a)^(6/11)).
      df1, df2: their derivatives df/dlna (from the ODEs), for Hermite interpolation of f.

    Between nodes every quantity is a cubic Hermite interpolant in ln a (D from D and dD/dlna = f D,
    f from f and df/dlna). Outside [a_min, 1] D1, D2 continue as power laws a^f with the edge
    growth rates and f1, f2 are held constant.
    """

    log_a: Array
    D1: Array
    D2: Array
    f1: Array
    f2: Array
    df1: Array
    df2: Array

    def _cell(self, la):
        n = self.log_a.shape[0]
        dx = (self.log_a[-1] - self.log_a[0]) / (n - 1)
        i, t = _uniform_cell(jnp.clip(la, self.log_a[0], self.log_a[-1]), self.log_a[0], dx, n)
        return i, t, dx

    def _growth(self, a, D, f):
        la = jnp.log(jnp.maximum(_f64(a), 1e-300))  # floor keeps a = 0 free of inf * 0 gradients
        i, t, dx = self._cell(la)
        inside = _hermite(i, t, dx, D, f * D)  # dD/dlna = f D
        below = D[0] * jnp.exp(f[0] * (la - self.log_a[0]))
        above = D[-1] * jnp.exp(f[-1] * (la - self.log_a[-1]))
        return jnp.where(la < self.log_a[0], below, jnp.where(la > self.log_a[-1], above, inside))

    def _rate(self, a, f, df):
        i, t, dx = self._cell(jnp.log(_f64(a)))  # clipped: constant outside [a_min, 1]
        return _hermite(i, t, dx, f, df)

    def D1_at(self, a) -> Array:
        """D1 at scale factor a (any shape, any float dtype); float64, same shape."""
        return self._growth(a, self.D1, self.f1)

    def D2_at(self, a) -> Array:
        """D2 (negative) at scale factor a (any shape); float64, same shape."""
        return self._growth(a, self.D2, self.f2)

    def f1_at(self, a) -> Array:
        """f1 = dlnD1/dlna at scale factor a (any shape); float64, same shape."""
        return self._rate(a, self.f1, self.df1)

    def f2_at(self, a) -> Array:
        """f2 = dlnD2/dlna at scale factor a (any shape); float64, same shape."""
        return self._rate(a, self.f2, self.df2)


def growth_table(cosmo: Cosmology, a_min: float = 1e-3, n: int = N_GROWTH,
                 substeps: int = GROWTH_SUBSTEPS) -> GrowthTable:
    """Solve the growth ODEs in x = ln a with fixed-step RK4 (``substeps`` steps per table interval).

      D1'' + (2 + dlnE/dlna) D1' - 1.5 Omega_m(a) D1 = 0
      D2'' + (2 + dlnE/dlna) D2' - 1.5 Omega_m(a) D2 = -1.5 Omega_m(a) D1^2

    starting from the matter-era growing modes D1 = a, D2 = -3/7 a^2 at a_min, corrected to first
    order in the dark-energy fraction x = rho_de/rho_m (~1e-9 for LCDM at a_min = 1e-3). Residual
    errors O(x^2) only excite decaying modes, which shrink by a further (a_min/a)^{5/2}. Accuracy
    degrades as w0 + wa -> 0, where dark energy is not negligible at a_min.

    Args:
      cosmo: parameters (may be traced).
      a_min: first table point (default 1e-3).
      n: number of table points (static, >= 4). RK4 error ~ (ln(1/a_min)/(n substeps))^4, Hermite
        interpolation error ~ (ln(1/a_min)/n)^4 / 384; the defaults (``N_GROWTH`` = 256,
        ``GROWTH_SUBSTEPS`` = 2) give <= 2.5e-8 relative.
      substeps: RK4 steps per interval (static).
    Returns: GrowthTable with (n,) float64 arrays.
    """
    log_a = _log_a_grid(a_min, n)
    om0 = _f64(cosmo.Omega_m)

    def coefficients(x):  # 1.5 Omega_m(a) and the drag 2 + dlnE/dlna at ln a = x (any shape)
        E2, dlnE = _E2_and_dlnE(cosmo, x)
        return 1.5 * om0 * jnp.exp(-3.0 * x) / E2, 2.0 + dlnE

    def rhs(x, y):  # y = (D1, D1', D2, D2') with ' = d/dlna; x scalar or (n,) with y (4, n)
        D1, dD1, D2, dD2 = y
        src, drag = coefficients(x)
        return jnp.stack([dD1, src * D1 - drag * dD1, dD2, src * (D2 - D1 * D1) - drag * dD2])

    # Growing modes at a_min to first order in x = rho_de/rho_m ~ a^p, p = -3 w (from substituting
    # D1 = a (1 + alpha x), D2 = -3/7 a^2 (1 + beta x) into the ODEs; for LCDM alpha = -2/11 and
    # beta = -51/143, the Bouchet et al. expansion). Left-over error O(x^2, x a_min) excites only
    # decaying modes.
    la0 = log_a[0]
    a0 = jnp.exp(la0)
    w0, wa = _f64(cosmo.w0), _f64(cosmo.wa)
    x = (1.0 - om0) / om0 * jnp.exp(-3.0 * (w0 + wa) * la0 - 3.0 * wa * (1.0 - a0))
    p = -3.0 * (w0 + wa * (1.0 - a0))
    alpha = -(p + 3.0) / (2.0 * p * (p + 2.5))
    beta = (7.0 * alpha - p - 5.0) / ((p + 1.0) * (p + 3.5))
    y0 = jnp.stack([
        a0 * (1.0 + alpha * x),
        a0 * (1.0 + alpha * (1.0 + p) * x),
        -3.0 / 7.0 * a0**2 * (1.0 + beta * x),
        -3.0 / 7.0 * a0**2 * (2.0 + beta * (2.0 + p) * x),
    ])
    # RK4 in ``substeps`` steps per table interval, written as maps between consecutive steps:
    # (D1, D1') obeys a linear ODE, so a step is a 2x2 matrix M_k; (D2, D2') obeys the same one
    # forced by -1.5 Omega_m(a) D1^2, so a step is affine, M_k y + c_k, with c_k from the D1 values
    # at the step's RK4 stages. The maps are built for all steps at once (vectorised), so the
    # sequential loop only applies a 2x2 map per step: its reverse is as small, and it compiles
    # 3x faster and runs faster than prefix products by an associative scan (NOTEBOOK 24). The
    # arithmetic of each step is the classical RK4 stage by stage; only the order of the products
    # differs (round-off).
    h = jnp.repeat((log_a[1:] - log_a[:-1]) / substeps, substeps)  # (N,) N = (n - 1) substeps
    x0 = jnp.repeat(log_a[:-1], substeps) + h * jnp.tile(jnp.arange(substeps), n - 1)
    s0, d0 = coefficients(x0)
    sm, dm = coefficients(x0 + 0.5 * h)
    s1, d1 = coefficients(x0 + h)

    def stages(u, v, forcing=(0.0, 0.0, 0.0, 0.0)):
        """One RK4 step of (u, v)' = (v, s u - d v + forcing) from (u, v) (arrays over the steps,
        or with a trailing axis); returns the next (u, v) and the u of the four stages."""
        f1, f2, f3, f4 = forcing
        def deriv(s, d, uu, vv, f):
            return vv, s * uu - d * vv + f
        k1 = deriv(s0, d0, u, v, f1)
        u2, v2 = u + 0.5 * h * k1[0], v + 0.5 * h * k1[1]
        k2 = deriv(sm, dm, u2, v2, f2)
        u3, v3 = u + 0.5 * h * k2[0], v + 0.5 * h * k2[1]
        k3 = deriv(sm, dm, u3, v3, f3)
        u4, v4 = u + h * k3[0], v + h * k3[1]
        k4 = deriv(s1, d1, u4, v4, f4)
        nu = u + h / 6.0 * (k1[0] + 2.0 * k2[0] + 2.0 * k3[0] + k4[0])
        nv = v + h / 6.0 * (k1[1] + 2.0 * k2[1] + 2.0 * k3[1] + k4[1])
        return (nu, nv), (u, u2, u3, u4)

    one, zero = jnp.ones_like(h), jnp.zeros_like(h)
    col0, _ = stages(one, zero)
    col1, _ = stages(zero, one)
    M = jnp.stack([jnp.stack(col0, -1), jnp.stack(col1, -1)], -1)  # (N, 2, 2): M[k] @ y

    def run(c, start):  # the state after every step from ``start``: (N + 1, 2)
        def step(y, mc):
            y = mc[0] @ y + mc[1]
            return y, y

        _, ys = jax.lax.scan(step, start, (M, c))
        return jnp.concatenate([start[None], ys], axis=0)

    y1 = run(jnp.zeros((h.shape[0], 2)), y0[:2])
    _, d1_stages = stages(y1[:-1, 0], y1[:-1, 1])
    forcing = tuple(-s * u * u for s, u in zip((s0, sm, sm, s1), d1_stages))
    c2, _ = stages(zero, zero, forcing)
    y2 = run(jnp.stack(c2, -1), y0[2:])
    ys = jnp.concatenate([y1, y2], axis=1)[::substeps]  # (n, 4) at the table's nodes
    # second derivatives at all nodes at once (no loop): df/dlna = D''/D - f^2, in raw units
    # (f and D''/D do not depend on the normalisation)
    _, ddD1, _, ddD2 = rhs(log_a, ys.T)
    D1, dD1, D2, dD2 = ys.T
    f1, f2 = dD1 / D1, dD2 / D2
    norm = D1[-1]
    return GrowthTable(log_a=log_a, D1=D1 / norm, D2=D2 / norm**2, f1=f1, f2=f2,
                       df1=ddD1 / D1 - f1 * f1, df2=ddD2 / D2 - f2 * f2)


# ------------------------------------------------------------------------------------------------
# Linear power spectrum


def _sinc(x):
    """sin(x)/x, series near 0 (double where: no NaN value or gradient at x = 0)."""
    small = jnp.abs(x) < 1e-3
    xs = jnp.where(small, 1.0, x)
    return jnp.where(small, 1.0 - x * x / 6.0 + x**4 / 120.0, jnp.sin(xs) / xs)


def _tophat(x):
    """Fourier transform of a unit top-hat sphere, 3 (sin x - x cos x) / x^3."""
    small = jnp.abs(x) < 1e-2
    xs = jnp.where(small, 1.0, x)
    return jnp.where(
        small, 1.0 - x * x / 10.0 + x**4 / 280.0, 3.0 * (jnp.sin(xs) - xs * jnp.cos(xs)) / xs**3
    )


def eisenstein_hu_transfer(cosmo: Cosmology, k) -> Array:
    """Eisenstein & Hu (1998, ApJ 496, 605) matter transfer function with baryon wiggles (eq. 16).

    k: wavenumber in h/Mpc, any shape, > 0 (k = 0 gives T = 1). Returns float64, same shape, T(k->0) = 1.
    T_CMB = 2.7255 K. Omega_b = 0 is the continuous limit (pure-CDM fit).
    """
    h = _f64(cosmo.h)
    om = _f64(cosmo.Omega_m)
    fb = _f64(cosmo.Omega_b) / om
    fc = _f64(cosmo.Omega_c) / om
    w_m = om * h * h
    # The baryon-only pieces (sound horizon, Silk scale) are singular at Omega_b = 0, where their
    # weight fb vanishes anyway; a floor keeps them finite.
    w_b = jnp.maximum(_f64(cosmo.Omega_b) * h * h, 1e-12)
    theta = T_CMB / 2.7
    kM = _f64(k) * h  # 1/Mpc

    z_eq = 2.50e4 * w_m * theta**-4  # eq. 2
    k_eq = 7.46e-2 * w_m * theta**-2  # eq. 3, 1/Mpc
    b1 = 0.313 * w_m**-0.419 * (1.0 + 0.607 * w_m**0.674)  # eq. 4
    b2 = 0.238 * w_m**0.223
    z_d = 1291.0 * w_m**0.251 / (1.0 + 0.659 * w_m**0.828) * (1.0 + b1 * w_b**b2)
    R_d = 31.5 * w_b * theta**-4 * (1e3 / z_d)  # eq. 5
    R_eq = 31.5 * w_b * theta**-4 * (1e3 / z_eq)
    s = (  # eq. 6, sound horizon at the drag epoch in Mpc
        2.0 / (3.0 * k_eq) * jnp.sqrt(6.0 / R_eq)
        * jnp.log((jnp.sqrt(1.0 + R_d) + jnp.sqrt(R_d + R_eq)) / (1.0 + jnp.sqrt(R_eq)))
    )
    k_silk = 1.6 * w_b**0.52 * w_m**0.73 * (1.0 + (10.4 * w_m) ** -0.95)  # eq. 7
    q = kM / (13.41 * k_eq)  # eq. 10

    # CDM part (eqs. 11, 12, 17-20)
    a1 = (46.9 * w_m) ** 0.670 * (1.0 + (32.1 * w_m) ** -0.532)
    a2 = (12.0 * w_m) ** 0.424 * (1.0 + (45.0 * w_m) ** -0.582)
    alpha_c = a1**-fb * a2 ** -(fb**3)
    bb1 = 0.944 / (1.0 + (458.0 * w_m) ** -0.708)
    bb2 = (0.395 * w_m) ** -0.0266
    beta_c = 1.0 / (1.0 + bb1 * (fc**bb2 - 1.0))

    def T0(alpha, beta):
        L = jnp.log(jnp.e + 1.8 * beta * q)
        C = 14.2 / alpha + 386.0 / (1.0 + 69.9 * q**1.08)
        return L / (L + C * q * q)

    ks = kM * s
    f = 1.0 / (1.0 + (ks / 5.4) ** 4)
    T_c = f * T0(1.0, beta_c) + (1.0 - f) * T0(alpha_c, beta_c)

    # Baryon part (eqs. 14, 15, 21-24); 1/(1 + (b/ks)^3) written as ks^3/(ks^3 + b^3) so k = 0 is finite
    y = (1.0 + z_eq) / (1.0 + z_d)
    sq = jnp.sqrt(1.0 + y)
    G = y * (-6.0 * sq + (2.0 + 3.0 * y) * jnp.log((sq + 1.0) / (sq - 1.0)))
    alpha_b = 2.07 * k_eq * s * (1.0 + R_d) ** -0.75 * G
    beta_b = 0.5 + fb + (3.0 - 2.0 * fb) * jnp.sqrt((17.2 * w_m) ** 2 + 1.0)
    beta_node = 8.41 * w_m**0.435
    s_tilde = s * ks / (ks**3 + beta_node**3) ** (1.0 / 3.0)
    T_b = (
        T0(1.0, 1.0) / (1.0 + (ks / 5.2) ** 2)
        + alpha_b * ks**3 / (ks**3 + beta_b**3) * jnp.exp(-((kM / k_silk) ** 1.4))
    ) * _sinc(kM * s_tilde)
    return fb * T_b + fc * T_c


def _unnormalised_power(cosmo: Cosmology, k) -> Array:
    return k ** _f64(cosmo.n_s) * eisenstein_hu_transfer(cosmo, k) ** 2


def _sigma_k() -> Array:
    """The sigma(R) quadrature nodes, (_N_K,) float64 in h/Mpc."""
    return jnp.exp(jnp.linspace(math.log(_K_MIN), math.log(_K_MAX), _N_K, dtype=jnp.float64))


def _sigma2_unnormalised(cosmo: Cosmology, R, p_nodes=None) -> Array:
    """sigma^2(R) of k^n_s T^2 (top hat R in Mpc/h, any shape), Simpson in ln k.

    p_nodes: k^n_s T^2 at the ``_sigma_k`` nodes, where the caller has evaluated it already.
    """
    k = _sigma_k()
    w = np.ones(_N_K)
    w[1:-1:2], w[2:-1:2] = 4.0, 2.0
    w = jnp.asarray(w * (math.log(_K_MAX / _K_MIN) / (_N_K - 1) / 3.0), jnp.float64)
    R = _f64(R)
    p = _unnormalised_power(cosmo, k) if p_nodes is None else p_nodes
    integrand = k**3 * p / (2.0 * jnp.pi**2) * _tophat(R[..., None] * k) ** 2
    return jnp.sum(integrand * w, axis=-1)


def linear_power(cosmo: Cosmology, k) -> Array:
    """Linear matter power spectrum at z = 0 in (Mpc/h)^3.

    P(k) = A k^n_s T_EH(k)^2 with A set so that sigma(8 Mpc/h) = cosmo.sigma8 (top hat).
    k: wavenumber in h/Mpc, any shape; k <= 0 gives 0 (with finite gradients). Returns float64.
    Scale to other times with GrowthTable.D1_at(a)^2.
    """
    k = _f64(k)
    pos = k > 0
    k_safe = jnp.where(pos, k, 1.0)  # double where: no log(0) in the k^n_s gradient
    # One transfer-function evaluation for the sigma_8 nodes and k together: the same values as two
    # evaluations, half the program to trace and compile (it dominates a simulation's set-up).
    p_all = _unnormalised_power(cosmo, jnp.concatenate([_sigma_k(), k_safe.reshape(-1)]))
    amp = _f64(cosmo.sigma8) ** 2 / _sigma2_unnormalised(cosmo, 8.0, p_all[:_N_K])
    return jnp.where(pos, amp * p_all[_N_K:].reshape(k.shape), 0.0)


def sigma_R(cosmo: Cosmology, R) -> Array:
    """rms linear density contrast at z = 0 in top-hat spheres of radius R [Mpc/h] (any shape, > ~1)."""
    return _f64(cosmo.sigma8) * jnp.sqrt(_sigma2_unnormalised(cosmo, R) / _sigma2_unnormalised(cosmo, 8.0))
