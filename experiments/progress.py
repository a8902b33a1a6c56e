"""A tqdm progress bar driven by the simulator's per-step host callback.

``simulate(..., progress=callback)`` calls ``callback(steps_done)`` from inside ``jit`` (through
``jax.debug.callback``). The callback is a *static* argument of the jitted function, so a new
callable on every run would force a recompilation; ``step_callback`` is therefore one fixed
module-level function that forwards to whichever ``StepProgress`` bar is currently open.
"""

from __future__ import annotations

import sys

from tqdm import tqdm

_active: "StepProgress | None" = None


def step_callback(steps_done) -> None:
    """The callable to pass as ``progress=``: advances the open bar (no-op when none is open)."""
    bar = _active
    if bar is not None:
        bar.update_to(int(steps_done))


class StepProgress:
    """Context manager showing a bar of ``n_steps`` time steps while it is open.

    >>> with StepProgress(10, desc="simulating"):
    ...     simulate(cosmo, cfg, progress=step_callback)
    """

    def __init__(self, n_steps: int, desc: str = "PM steps", enabled: bool = True, file=None):
        self.n_steps = int(n_steps)
        self.desc = desc
        self.enabled = enabled
        self.file = file if file is not None else sys.stderr
        self.bar: tqdm | None = None
        self.done = 0

    def __enter__(self) -> "StepProgress":
        global _active
        if _active is not None:
            raise RuntimeError("a StepProgress bar is already open")
        if self.enabled:
            self.bar = tqdm(total=self.n_steps, desc=self.desc, unit="step", file=self.file,
                            dynamic_ncols=True)
        _active = self
        return self

    def update_to(self, steps_done: int) -> None:
        # Callbacks from a scan arrive in order, but never let the bar move backwards.
        steps_done = min(max(steps_done, self.done), self.n_steps)
        if self.bar is not None and steps_done > self.done:
            self.bar.update(steps_done - self.done)
        self.done = steps_done

    def __exit__(self, *exc) -> None:
        global _active
        _active = None
        if self.bar is not None:
            self.bar.close()
            self.bar = None
