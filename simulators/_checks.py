"""Input checks shared by the simulator modules."""

import jax


def is_concrete(*xs) -> bool:
    """True when no argument is a jax tracer, so its values can be checked eagerly (bad input is
    reported with a clear error outside jit; inside jit the check is skipped)."""
    return not any(isinstance(x, jax.core.Tracer) for x in xs)
