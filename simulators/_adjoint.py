"""Scheduling for backward passes that recompute their forward instead of saving it."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp


def after_cotangents(adjoint: Callable, inputs, cotangents):
    """``adjoint(inputs, cotangents)``, made to run once ``cotangents`` exist.

    For the backward of a ``jax.custom_vjp`` whose residuals are its inputs and which rebuilds
    everything else from them: nothing in the recomputation depends on the cotangents, so XLA may
    schedule it early, e.g. before the N-body backward loop, and hold its fields across it (an
    optimization barrier does not order it: XLA's CPU pipeline removes barriers). A conditional
    on a cotangent's value is an operation XLA cannot start before that value exists.

    Args:
      adjoint: (inputs, cotangents) -> cotangents of ``inputs`` (the same pytree structure).
      inputs, cotangents: pytrees of arrays.
    Returns:
      ``adjoint``'s result; NaN everywhere if the first cotangent's first element is not finite
      (the gradient is then not finite anyway).
    """
    first = jax.tree.leaves(cotangents)[0]
    finite = jnp.isfinite(first[(0,) * first.ndim])

    def poisoned(inputs, cotangents):
        return jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), inputs)

    return jax.lax.cond(finite, adjoint, poisoned, inputs, cotangents)
