"""A Fourier-space preconditioner of the latent field: a linear change of variables z = S w.

The field-level posterior of the white-noise field z is, to first order, Gaussian with precision
1 + J^T N^{-1} J (the prior's identity plus the data term of the linearised map model). Both are
nearly diagonal in Fourier space: the prior exactly, the data term because the map model is close
to translation invariant (a periodic box, seen through a projection). With s_k the posterior
standard deviation of mode k, sampling w = S^{-1} z, where S multiplies mode k by s_k, gives every
mode of w a posterior scale near 1: a sampler's one step size then fits the well-measured large
scales and the prior-dominated small scales alike.

S is a real symmetric linear map (rfftn, a real even factor per mode, irfftn), so log p(w) =
log p(S w) + log |det S| with a constant log-determinant: the samplers target exactly the same
posterior, and θ's draws are unchanged in law.

The per-mode data precision is estimated once from Hessian-vector products of the potential
(central differences of the field gradient along random ±1 probes, Hutchinson's estimator in the
Fourier basis) and averaged over modes that the model treats alike: for a 3-D field, over shells
of transverse wavenumber |k_⊥| at each line-of-sight |k_∥| (the last axis is the line of sight of
the lightcone); for per-bin sky fields, over shells of |ℓ| in each bin.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

# Random probes of the Hessian (2 gradients each). Each probe measures every Fourier mode once; the
# shell average then pools the tens to hundreds of modes per shell on the quick mesh, so 8 probes
# leave a few percent of noise on each shell's precision, well below what a sampler notices.
N_PROBES = 8
# Central-difference step of the Hessian-vector products, in units of the prior's standard
# deviation per cell: small enough that the PM map model is linear over it (κ changes by ~1% of
# its rms), large enough that the float32 gradient's round-off (relative ~1e-6) stays far below it.
PROBE_STEP = 1e-2


@dataclass(frozen=True, eq=False)  # equal when the factors are (see __eq__)
class FourierScale:
    """z = S w: ``irfftn(s · rfftn(w))`` over ``axes`` of a real field of ``shape``, with one
    factor s per shell of modes (``shell_labels``).

    Attributes:
      shells: (n_shells,) float64 factors, > 0, in the order of ``shell_labels``' sorted labels.
      axes: the Fourier axes of the field (others are independent, e.g. tomographic bins).
      shape: the field's shape.
    A shell's modes share a factor and the labels are even in k, so S is a real symmetric map and
    ``from_model`` is its exact inverse.
    """

    shells: np.ndarray
    axes: tuple[int, ...]
    shape: tuple[int, ...]

    def __post_init__(self):
        shells = np.asarray(self.shells, np.float64)
        n = int(shell_index(self.shape, self.axes).max()) + 1
        if shells.shape != (n,) or not np.all(np.isfinite(shells) & (shells > 0)):
            raise ValueError(f"a Fourier preconditioner of a {list(self.shape)} field needs {n} "
                             f"finite factors > 0, got shape {list(shells.shape)}")
        object.__setattr__(self, "shells", shells)

    def _key(self) -> tuple:
        return (tuple(self.axes), tuple(self.shape), self.shells.tobytes())

    def __eq__(self, other) -> bool:  # a compiled sampler can be reused for equal factors
        return isinstance(other, FourierScale) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    @cached_property
    def scale(self) -> Array:
        """Per-mode factors in the rfftn layout, float64."""
        return jnp.asarray(self.shells[shell_index(self.shape, self.axes)])

    def _apply(self, x: Array, factor: Array) -> Array:
        sizes = [self.shape[a] for a in self.axes]
        xk = jnp.fft.rfftn(x, axes=self.axes)
        return jnp.fft.irfftn(xk * factor, s=sizes, axes=self.axes).astype(x.dtype)

    def to_model(self, w: Array) -> Array:
        """The model's field z = S w (same shape and dtype as w)."""
        return self._apply(w, self.scale)

    def from_model(self, z: Array) -> Array:
        """The sampler's field w = S^{-1} z."""
        return self._apply(z, 1.0 / self.scale)

    def to_dict(self) -> dict:
        return {"axes": list(self.axes), "shape": list(self.shape), "shells": self.shells.tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> "FourierScale":
        return cls(np.asarray(d["shells"], np.float64), tuple(d["axes"]), tuple(d["shape"]))


def fourier_axes(shape: Sequence[int], sky_fields: bool) -> tuple[int, ...]:
    """The Fourier axes of a latent field: all of a 3-D PM field's; the last two (the sky) of a
    (n_bins, npix, npix) stack of per-bin sky fields."""
    return tuple(range(len(shape) - 2, len(shape))) if sky_fields else tuple(range(len(shape)))


def shell_labels(shape: Sequence[int], axes: tuple[int, ...]) -> np.ndarray:
    """Integer label per rfftn mode (and per index of the non-Fourier axes): modes with one label
    are pooled. 3 Fourier axes: (round |n_⊥|, |n_∥|) with n_∥ along the last axis; otherwise
    round |n| over all Fourier axes. Labels are even in n, so a pooled scale keeps S symmetric."""
    rshape = [shape[a] if i < len(axes) - 1 else shape[a] // 2 + 1 for i, a in enumerate(axes)]
    ints = [np.fft.fftfreq(shape[a], 1.0 / shape[a]) for a in axes[:-1]]
    ints.append(np.arange(rshape[-1], dtype=float))
    n = np.meshgrid(*ints, indexing="ij")
    if len(axes) == 3:
        radial = np.rint(np.hypot(n[0], n[1])).astype(np.int64)
        label = radial * (rshape[-1] + 1) + np.abs(n[2]).astype(np.int64)
    else:
        label = np.rint(np.sqrt(sum(c**2 for c in n))).astype(np.int64)
    # independent copies of the Fourier block along the other axes (e.g. tomographic bins)
    full = list(shape)
    for i, a in enumerate(axes):
        full[a] = rshape[i]
    others = [s if ax not in axes else 1 for ax, s in enumerate(full)]
    block = int(label.max()) + 1
    offset = np.arange(int(np.prod(others))).reshape(others) * block
    expand = [slice(None) if ax in axes else None for ax in range(len(shape))]
    return np.broadcast_to(label[tuple(expand)] + offset, full)


def shell_index(shape: Sequence[int], axes: tuple[int, ...]) -> np.ndarray:
    """Per rfftn mode, the index of its shell: the rank of its ``shell_labels`` label among the
    sorted distinct labels (0 .. n_shells - 1), in the rfftn layout."""
    labels = shell_labels(shape, axes)
    return np.unique(labels.ravel(), return_inverse=True)[1].reshape(labels.shape)


def pooled_precision(numerator: np.ndarray, denominator: np.ndarray,
                     index: np.ndarray) -> np.ndarray:
    """Per-shell precision Σ Re(conj(V) HV) / Σ |V|² over the modes of each shell (``index``:
    ``shell_index``), in shell order."""
    num = np.bincount(index.ravel(), numerator.ravel())
    den = np.bincount(index.ravel(), denominator.ravel())
    return num / np.maximum(den, np.finfo(float).tiny)


def estimate_scale(ld, position: dict, key: Array, *, sky_fields: bool,
                   n_probes: int = N_PROBES, step: float = PROBE_STEP) -> FourierScale:
    """The preconditioner at ``position`` (model space: θ unconstrained, z the model's field).

    Precision per shell h = mean over its modes of the potential's Hessian in the Fourier basis
    (prior identity included), floored at the prior's 1 (the Gauss-Newton data term is positive;
    a smaller estimate is noise or the nonlinear part), and s = h^{-1/2}.
    Cost: 2 × n_probes gradients of the log-density.
    """
    site = ld.field_site
    z = position[site]
    shape = tuple(z.shape)
    axes = fourier_axes(shape, sky_fields)

    def field_grad(field):
        return ld.value_and_grad({**position, site: field})[1][site]

    num = den = 0.0
    for k in jax.random.split(key, n_probes):
        v = jax.random.rademacher(k, shape, jnp.float64)
        # Hessian of the potential (−log p) along v
        hv = -(field_grad(z + step * v) - field_grad(z - step * v)) / (2 * step)
        vk = np.asarray(jnp.fft.rfftn(v, axes=axes))
        hk = np.asarray(jnp.fft.rfftn(hv, axes=axes))
        num = num + np.real(np.conj(vk) * hk)
        den = den + np.abs(vk) ** 2
    h = pooled_precision(num, den, shell_index(shape, axes))
    if not np.all(np.isfinite(h)):
        raise FloatingPointError("the field Hessian probes returned NaN or inf: the start position "
                                 "is outside the model's valid range")
    return FourierScale(1.0 / np.sqrt(np.maximum(h, 1.0)), axes, shape)
