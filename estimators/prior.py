"""The parameter prior as a ``torch.distributions.Distribution`` for sbi.

``torch_prior(spec)`` reads a prior spec duck-typed like ``experiments.priors.Prior`` (an object
with ``.params``, each having ``name``, ``dist`` in {"normal", "truncated_normal", "uniform"},
``loc``, ``scale``, ``low``, ``high``) so this package does not import ``experiments``.

The joint prior is independent across parameters, has event shape (d,), returns float32, and
exposes ``support`` (a per-parameter ``constraints.cat`` so that ``biject_to`` — used by sbi when
it builds a posterior — maps R^d onto the box), ``mean`` and ``variance``.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch.distributions import Distribution, Normal, Uniform, biject_to, constraints, transform_to
from torch.distributions.transforms import (AffineTransform, ComposeTransform, ExpTransform,
                                            Transform)

_DTYPE = torch.float32


class TruncatedNormal(Distribution):
    """A normal N(loc, scale²) restricted to [low, high]; either bound may be ±inf.

    Sampling inverts the CDF (``ndtri``) in float64 and reflects the interval into the lower
    tail when it lies above the mean, so truncations far in a tail stay accurate. ``log_prob``
    is the normal log density minus log Z (Z = Φ(b) − Φ(a)), and −inf outside [low, high].
    """

    arg_constraints = {"loc": constraints.real, "scale": constraints.positive}
    has_rsample = True

    def __init__(self, loc, scale, low=-math.inf, high=math.inf, validate_args=None):
        self.loc, self.scale, self.low, self.high = (
            torch.as_tensor(v, dtype=_DTYPE) for v in (loc, scale, low, high))
        self.loc, self.scale, self.low, self.high = torch.broadcast_tensors(
            self.loc, self.scale, self.low, self.high)
        if not bool((self.low < self.high).all()):
            raise ValueError(f"TruncatedNormal: low must be < high, got {self.low}, {self.high}")
        super().__init__(self.loc.shape, validate_args=validate_args)
        # Standardised bounds and normaliser, kept in float64: Φ differences lose digits in fp32.
        loc64, scale64 = self.loc.double(), self.scale.double()
        self._a = (self.low.double() - loc64) / scale64
        self._b = (self.high.double() - loc64) / scale64
        self._log_z = _log_ndtr_diff(self._a, self._b)

    @constraints.dependent_property(is_discrete=False, event_dim=0)
    def support(self):
        return _interval(self.low, self.high)

    @property
    def mean(self):
        pa, pb = _phi(self._a), _phi(self._b)
        return (self.loc.double() + self.scale.double() * (pa - pb) / self._log_z.exp()).to(_DTYPE)

    @property
    def variance(self):
        z = self._log_z.exp()
        pa, pb = _phi(self._a), _phi(self._b)
        apa = torch.where(torch.isinf(self._a), 0.0, self._a * pa)  # a·φ(a) → 0 at ±inf
        bpb = torch.where(torch.isinf(self._b), 0.0, self._b * pb)
        var = self.scale.double() ** 2 * (1 + (apa - bpb) / z - ((pa - pb) / z) ** 2)
        return var.to(_DTYPE)

    def cdf(self, value):
        z = (torch.as_tensor(value).double() - self.loc.double()) / self.scale.double()
        z = torch.minimum(torch.maximum(z, self._a), self._b)
        return (_log_ndtr_diff(self._a, z) - self._log_z).exp().to(_DTYPE)

    def icdf(self, u):
        u = torch.as_tensor(u, dtype=torch.float64)
        # For a > 0 reflect x → −x: the interval [−b, −a] then has small, representable
        # Φ values (1 − Φ(a) would round to 0 for a ≳ 8.3), and ndtri is accurate there.
        flip = self._a > 0
        a = torch.where(flip, -self._b, self._a)
        b = torch.where(flip, -self._a, self._b)
        # exp(log_ndtr): torch's ndtr underflows to 0 below about −8 even in float64.
        pa, pb = torch.special.log_ndtr(a).exp(), torch.special.log_ndtr(b).exp()
        u = torch.where(flip, 1 - u, u)
        z = torch.special.ndtri(pa + u * (pb - pa))
        z = torch.where(flip, -z, z).clamp(self._a, self._b)  # round-off must not leave [a, b]
        return (self.loc.double() + self.scale.double() * z).to(_DTYPE)

    def rsample(self, sample_shape=torch.Size()):
        shape = self._extended_shape(sample_shape)
        u = torch.rand(shape, dtype=torch.float64, device=self.loc.device)
        u = u.clamp_(min=torch.finfo(torch.float64).tiny)  # u = 0 maps to an infinite bound
        return self.icdf(u)

    def log_prob(self, value):
        if self._validate_args:
            self._validate_sample(value)
        value = torch.as_tensor(value, dtype=_DTYPE)
        lp = (Normal(self.loc.double(), self.scale.double(), validate_args=False)
              .log_prob(value.double()) - self._log_z)
        inside = (value >= self.low) & (value <= self.high)
        return torch.where(inside, lp, -math.inf).to(_DTYPE)


class IndependentPrior(Distribution):
    """Product of scalar distributions: event shape (d,), float32, ``names`` kept for reference.

    ``support`` is ``independent(cat([c_1, ..., c_d]), 1)`` with each c_i one of real,
    greater_than_eq, less-than-or-equal or interval (bounds included, as in the JAX prior), so
    ``biject_to(support)`` is a bijection R^d → support (sbi builds one in ``build_posterior``).
    All-unbounded priors get ``independent(real, 1)`` so sbi z-scores with mean/std instead.
    """

    arg_constraints: dict = {}
    has_rsample = False

    def __init__(self, components: Sequence[Distribution], names: Sequence[str] = (),
                 validate_args=None):
        self.components = tuple(components)
        self.names = tuple(names)
        super().__init__(torch.Size(), torch.Size([len(self.components)]),
                         validate_args=validate_args)

    @constraints.dependent_property(is_discrete=False, event_dim=1)
    def support(self):
        cs = [c.support for c in self.components]
        if all(isinstance(c, constraints._Real) for c in cs):
            # Unbounded: sbi z-scores with mean/std instead of a bijection.
            return constraints.independent(constraints.real, 1)
        return constraints.independent(constraints.cat(cs, dim=-1, lengths=[1] * len(cs)), 1)

    @property
    def mean(self):
        return torch.stack([c.mean for c in self.components])

    @property
    def variance(self):
        return torch.stack([c.variance for c in self.components])

    def sample(self, sample_shape=torch.Size()):
        with torch.no_grad():
            cols = [c.sample(sample_shape).to(_DTYPE) for c in self.components]
        return torch.stack(cols, dim=-1)

    def log_prob(self, value):
        value = torch.as_tensor(value, dtype=_DTYPE)
        if value.shape[-1:] != self.event_shape:
            raise ValueError(f"prior log_prob: expected θ with last dimension {self.dim}, "
                             f"got shape {tuple(value.shape)}")
        return sum(c.log_prob(value[..., i]).to(_DTYPE) for i, c in enumerate(self.components))

    @property
    def dim(self) -> int:
        return len(self.components)


def torch_prior(prior) -> IndependentPrior:
    """The prior spec as an sbi-ready torch distribution over θ (d,), float32.

    ``prior``: any object with ``.params`` whose items have ``name``, ``dist``, ``loc``,
    ``scale``, ``low``, ``high`` (``experiments.priors.Prior``).
    """
    comps, names = [], []
    for p in prior.params:
        comps.append(_component(p))
        names.append(p.name)
    return IndependentPrior(comps, names)


def _component(p) -> Distribution:
    # validate_args=False: sbi evaluates log_prob outside the support and expects -inf.
    t = lambda v: torch.tensor(float(v), dtype=_DTYPE)  # noqa: E731
    if p.dist == "normal":
        return Normal(t(p.loc), t(p.scale), validate_args=False)
    if p.dist == "uniform":
        return Uniform(t(p.low), t(p.high), validate_args=False)
    if p.dist == "truncated_normal":
        low = -math.inf if p.low is None else p.low
        high = math.inf if p.high is None else p.high
        return TruncatedNormal(p.loc, p.scale, low, high, validate_args=False)
    raise ValueError(f"{p.name}: unsupported prior distribution {p.dist!r}")


def _interval(low: torch.Tensor, high: torch.Tensor) -> constraints.Constraint:
    """The tightest torch constraint for [low, high] with possibly infinite ends."""
    lo_fin, hi_fin = bool(torch.isfinite(low).all()), bool(torch.isfinite(high).all())
    if lo_fin and hi_fin:
        return constraints.interval(low, high)
    if lo_fin and bool(torch.isinf(high).all()):
        return constraints.greater_than_eq(low)
    if hi_fin and bool(torch.isinf(low).all()):
        return _LessThanEq(high)
    if bool(torch.isinf(low).all()) and bool(torch.isinf(high).all()):
        return constraints.real
    return constraints.interval(low, high)  # mixed batch: checking works, biject_to does not


class _LessThanEq(constraints._LessThan):
    """x ≤ upper_bound (torch only has the strict ``less_than``); the bound itself is in the
    support, as in the JAX prior and in ``greater_than_eq`` for lower bounds."""

    def check(self, value):
        return value <= self.upper_bound


def _to_less_than_eq(constraint: _LessThanEq) -> Transform:
    # Same bijection R → (−inf, upper) as torch uses for less_than.
    return ComposeTransform([ExpTransform(), AffineTransform(constraint.upper_bound, -1.0)])


biject_to.register(_LessThanEq, _to_less_than_eq)
transform_to.register(_LessThanEq, _to_less_than_eq)


def _phi(z: torch.Tensor) -> torch.Tensor:
    """Standard normal density, 0 at ±inf."""
    return torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)


def _log_ndtr_diff(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """log(Φ(b) − Φ(a)) for a ≤ b, accurate in both tails (upper tail via Φ(−a) − Φ(−b))."""
    upper = a > 0
    lo = torch.where(upper, -b, a)
    hi = torch.where(upper, -a, b)
    log_hi, log_lo = torch.special.log_ndtr(hi), torch.special.log_ndtr(lo)
    # log(e^h − e^l) = h + log1p(−e^{l−h}); −inf when the interval is empty.
    return log_hi + torch.log1p(-torch.exp(log_lo - log_hi))
