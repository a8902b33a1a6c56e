"""Priors over cosmological parameters, declared once and viewed from JAX (numpyro) and torch (sbi).

A ``Prior`` is a frozen tuple of independent one-parameter priors (``ParamPrior``). Parameter
names are ``simulators.Cosmology`` field names (``Omega_c``, ``Omega_b``, ``h``, ``n_s``,
``sigma8``, ``w0``, ``wa``), so a parameter vector θ maps onto a cosmology by name.

Views:
  * ``prior.numpyro_dists()`` / ``prior.sample_sites()`` for numpyro models (one site per name);
  * ``prior.sample(key, n)`` and ``prior.log_prob(theta)`` as plain JAX functions;
  * ``prior.torch()`` — a ``torch.distributions.Distribution`` over θ (built in ``estimators``,
    the only package that imports torch).

Distributions: ``normal(loc, scale)``, ``truncated_normal(loc, scale, low=None, high=None)``
(either bound may be open) and ``uniform(low, high)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

COSMOLOGY_PARAMS = ("Omega_c", "Omega_b", "h", "n_s", "sigma8", "w0", "wa")
DISTRIBUTIONS = ("normal", "truncated_normal", "uniform")
LABELS = {"Omega_c": r"\Omega_c", "Omega_b": r"\Omega_b", "h": "h", "n_s": "n_s",
          "sigma8": r"\sigma_8", "w0": "w_0", "wa": "w_a"}


# Standard deviations of an unbounded normal side that must lie inside a parameter's range: at
# most 0.13% of the prior mass then falls outside (such draws fail and are counted as failed
# simulations); the LSST-Y10 preset's Omega_c ~ TN(0.2664, 0.2, low=0) is 3.7 sigma from Omega_c = 1.
NORMAL_TAIL = 3.0


class PriorError(ValueError):
    """An invalid prior declaration; the message names the parameter."""


@dataclass(frozen=True)
class ParamPrior:
    """The prior of one cosmological parameter.

    Attributes: name: a ``Cosmology`` field; dist: one of ``DISTRIBUTIONS``; loc, scale: the
    normal's mean and standard deviation (normal, truncated_normal); low, high: bounds (uniform:
    both required; truncated_normal: at least one).
    """

    name: str
    dist: str
    loc: float | None = None
    scale: float | None = None
    low: float | None = None
    high: float | None = None

    def __post_init__(self):
        n = self.name
        if n not in COSMOLOGY_PARAMS:
            raise PriorError(f"{n}: unknown parameter; valid: {', '.join(COSMOLOGY_PARAMS)}")
        if self.dist not in DISTRIBUTIONS:
            raise PriorError(f"{n}: unknown distribution {self.dist!r}; valid: "
                             f"{', '.join(DISTRIBUTIONS)}")
        for attr in ("loc", "scale", "low", "high"):
            v = getattr(self, attr)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))
                                  or not math.isfinite(v)):
                raise PriorError(f"{n}: {attr} must be a finite number, got {v!r}")
        if self.dist in ("normal", "truncated_normal"):
            if self.loc is None or self.scale is None:
                raise PriorError(f"{n}: a {self.dist} prior needs loc and scale")
            if self.scale <= 0:
                raise PriorError(f"{n}: scale must be > 0, got {self.scale}")
        if self.dist == "normal" and (self.low is not None or self.high is not None):
            raise PriorError(f"{n}: a normal prior takes no bounds (use truncated_normal)")
        if self.dist == "truncated_normal" and self.low is None and self.high is None:
            raise PriorError(f"{n}: a truncated_normal prior needs low and/or high")
        if self.dist == "uniform":
            if self.low is None or self.high is None:
                raise PriorError(f"{n}: a uniform prior needs low and high")
            if self.loc is not None or self.scale is not None:
                raise PriorError(f"{n}: a uniform prior takes low and high only")
        if self.low is not None and self.high is not None and not self.low < self.high:
            raise PriorError(f"{n}: low must be < high, got [{self.low}, {self.high}]")

    def check_physical(self) -> "ParamPrior":
        """This prior, if its support lies in the parameter's physical range (simulators'
        ``PARAM_RANGES``): bounds inside it, and an unbounded normal side at least
        ``NORMAL_TAIL`` standard deviations from the range's edge; PriorError otherwise.
        Configurations check it when they load (a prior that feeds the simulator); a prior used
        as an abstract distribution (tests of the estimators) need not."""
        from simulators.cosmology import PARAM_RANGES

        lo, hi = PARAM_RANGES[self.name]
        low, high = self.bounds
        if self.dist != "uniform":
            if self.low is None:
                low = self.loc - NORMAL_TAIL * self.scale
            if self.high is None:
                high = self.loc + NORMAL_TAIL * self.scale
        if low < lo or high > hi:
            span = f"[{low:g}, {high:g}]"
            what = (f"the {self.dist} support {span}" if self.dist == "uniform" else
                    f"{self.dist}({self.loc:g}, {self.scale:g}) spans {span} (bounds, or "
                    f"{NORMAL_TAIL:g} sigma where unbounded)")
            hint = "" if self.dist == "uniform" else "; bound it with truncated_normal low/high"
            raise PriorError(f"{self.name}: {what}, outside the physical range ({lo:g}, {hi:g}) "
                             f"of {self.name}{hint}")
        return self

    @classmethod
    def from_table(cls, name: str, table) -> "ParamPrior":
        """From a TOML inline table ``{dist = "normal", loc = 0.8, scale = 0.1}``."""
        if not isinstance(table, dict):
            raise PriorError(f"{name}: expected a table such as "
                             f"{{dist = \"normal\", loc = 0.8, scale = 0.1}}, got {table!r}")
        unknown = sorted(set(table) - {"dist", "loc", "scale", "low", "high"})
        if unknown:
            raise PriorError(f"{name}: unknown key {unknown[0]!r}; valid keys: "
                             "dist, loc, scale, low, high")
        if "dist" not in table:
            raise PriorError(f"{name}: missing 'dist' (one of {', '.join(DISTRIBUTIONS)})")
        return cls(name, **table)

    def to_table(self) -> dict:
        return {k: v for k, v in (("dist", self.dist), ("loc", self.loc), ("scale", self.scale),
                                  ("low", self.low), ("high", self.high)) if v is not None}

    @property
    def bounds(self) -> tuple[float, float]:
        return (-math.inf if self.low is None else float(self.low),
                math.inf if self.high is None else float(self.high))

    def numpyro(self):
        import numpyro.distributions as dist

        if self.dist == "normal":
            return dist.Normal(self.loc, self.scale)
        if self.dist == "uniform":
            return dist.Uniform(self.low, self.high)
        return dist.TruncatedNormal(self.loc, self.scale, low=self.low, high=self.high)

    def moments(self) -> tuple[float, float]:
        """(mean, std) of this prior, exact."""
        if self.dist == "normal":
            return float(self.loc), float(self.scale)
        if self.dist == "uniform":
            return (self.low + self.high) / 2, (self.high - self.low) / math.sqrt(12)
        a, b = ((x - self.loc) / self.scale for x in self.bounds)
        phi = lambda x: 0.0 if math.isinf(x) else math.exp(-x * x / 2) / math.sqrt(2 * math.pi)  # noqa: E731
        cdf = lambda x: 0.5 * (1 + math.erf(x / math.sqrt(2)))  # noqa: E731
        z = cdf(b) - cdf(a)
        xa = 0.0 if math.isinf(a) else a * phi(a)
        xb = 0.0 if math.isinf(b) else b * phi(b)
        mean = self.loc + self.scale * (phi(a) - phi(b)) / z
        var = self.scale ** 2 * (1 + (xa - xb) / z - ((phi(a) - phi(b)) / z) ** 2)
        return mean, math.sqrt(var)


@dataclass(frozen=True)
class Prior:
    """Independent priors over the parameter vector θ = (params[0].name, params[1].name, ...)."""

    params: tuple[ParamPrior, ...]

    def __post_init__(self):
        object.__setattr__(self, "params", tuple(self.params))
        if not self.params:
            raise PriorError("prior: at least one parameter is needed")
        names = [p.name for p in self.params]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise PriorError(f"{dupes[0]}: declared twice in the prior")

    # ---- description -------------------------------------------------------------------------
    @property
    def names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.params)

    @property
    def labels(self) -> tuple[str, ...]:
        """LaTeX labels (without $) for plots."""
        return tuple(LABELS[n] for n in self.names)

    @property
    def dim(self) -> int:
        return len(self.params)

    @property
    def mean(self) -> np.ndarray:
        return np.array([p.moments()[0] for p in self.params])

    @property
    def std(self) -> np.ndarray:
        return np.array([p.moments()[1] for p in self.params])

    @property
    def low(self) -> np.ndarray:
        return np.array([p.bounds[0] for p in self.params])

    @property
    def high(self) -> np.ndarray:
        return np.array([p.bounds[1] for p in self.params])

    def select(self, names) -> "Prior":
        """The prior restricted to ``names`` (in that order)."""
        by_name = {p.name: p for p in self.params}
        missing = [n for n in names if n not in by_name]
        if missing:
            raise PriorError(f"{missing[0]}: not in this prior ({', '.join(self.names)})")
        return Prior(tuple(by_name[n] for n in names))

    # ---- JAX / numpyro -----------------------------------------------------------------------
    def numpyro_dists(self) -> dict:
        """name -> numpyro distribution."""
        return {p.name: p.numpyro() for p in self.params}

    def sample_sites(self):
        """Inside a numpyro model: one ``numpyro.sample`` site per parameter; returns θ (dim,)."""
        import jax.numpy as jnp
        import numpyro

        return jnp.stack([numpyro.sample(n, d) for n, d in self.numpyro_dists().items()])

    def sample(self, key, n: int | None = None):
        """θ drawn from the prior: (dim,) for n None, else (n, dim); float64 where enabled."""
        import jax
        import jax.numpy as jnp

        keys = jax.random.split(key, self.dim)
        shape = () if n is None else (n,)
        cols = [d.sample(k, shape) for k, d in zip(keys, self.numpyro_dists().values())]
        return jnp.stack(cols, axis=-1)

    def log_prob(self, theta):
        """log p(θ) for θ (..., dim): -inf outside the support."""
        import jax.numpy as jnp

        theta = jnp.asarray(theta)
        total = 0.0
        for i, (p, d) in enumerate(zip(self.params, self.numpyro_dists().values())):
            x = theta[..., i]
            lo, hi = p.bounds
            inside = (x >= lo) & (x <= hi)
            lp = d.log_prob(jnp.clip(x, lo if math.isfinite(lo) else None,
                                     hi if math.isfinite(hi) else None))
            total = total + jnp.where(inside, lp, -jnp.inf)
        return total

    def cosmology(self, theta, base):
        """``base`` (a ``Cosmology``) with the parameters of θ (dim,) replaced by name."""
        return replace(base, **{n: theta[i] for i, n in enumerate(self.names)})

    # ---- torch (sbi) -------------------------------------------------------------------------
    def torch(self):
        """The same prior as a ``torch.distributions.Distribution`` over θ (float32), for sbi."""
        from estimators.prior import torch_prior

        return torch_prior(self)

    # ---- serialisation -----------------------------------------------------------------------
    def to_dict(self) -> dict:
        """name -> table, in parameter order (JSON/TOML friendly); ``from_dict`` inverts it."""
        return {p.name: p.to_table() for p in self.params}

    @classmethod
    def from_dict(cls, table: dict) -> "Prior":
        return cls(tuple(ParamPrior.from_table(n, spec) for n, spec in table.items()))


def lsst_y10() -> Prior:
    """The LSST-Y10 prior of Zeghal et al. 2025 / Lanzieri et al. 2025 (6 parameters).

    σ_8 ~ N(0.831, 0.14) is truncated at 0 (a mass of 2e-9 removed): σ_8 is an rms, and the linear
    field δ_L ∝ σ_8 z is unchanged by (σ_8, z) → (-σ_8, -z), so without the bound field-level
    samplers find an exact mirror mode at negative σ_8 (measured: NUTS on the quick PM problem
    jumped there in its first warm-up step)."""
    return Prior((
        ParamPrior("Omega_c", "truncated_normal", 0.2664, 0.2, low=0.0),
        ParamPrior("Omega_b", "normal", 0.0492, 0.006),
        ParamPrior("sigma8", "truncated_normal", 0.831, 0.14, low=0.0),
        ParamPrior("h", "normal", 0.6727, 0.063),
        ParamPrior("n_s", "normal", 0.9645, 0.08),
        ParamPrior("w0", "truncated_normal", -1.0, 0.9, low=-2.0, high=-0.3),
    ))


PRESETS = {"lsst_y10": lsst_y10}
