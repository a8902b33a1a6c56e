"""The gradient-speed changes (growth table on 256 Hermite nodes, ...) keep the lensing maps and
their gradients those of the stored reference to float32 round-off (its history:
``data/make_gradient_reference.py``).

``data/gradient_reference.npz`` holds the κ maps, loss and gradients (Ω_c and the
white-noise field) of the small randomised lightcone case, both gradient modes
(``data/make_gradient_reference.py``).
"""

from pathlib import Path

import numpy as np
import pytest

from tests.data.make_gradient_reference import compute

REF = Path(__file__).parent / "data" / "gradient_reference.npz"


@pytest.fixture(scope="module")
def now():
    return compute()


@pytest.mark.parametrize("mode", ["adjoint", "checkpoint"])
def test_maps_and_gradients_match_parent_commit(now, mode):
    ref = np.load(REF)
    for key in ("loss", "kappa", "grad_omega_c", "grad_noise"):
        got, want = np.asarray(now[f"{mode}_{key}"]), ref[f"{mode}_{key}"]
        # Relative to the largest entry. Measured with the 256-node growth table (changed by
        # <= 2.5e-8, then rounded to float32 in the step factors): <= 2.1e-7 (the noise gradient),
        # i.e. float32 round-off of a 6-step PM run and ~10^5 ray samples. 1e-6 leaves 5x; κ is
        # linear in the growth factors, so an error of 1e-5 in them, a missing or doubled paint,
        # or a wrong adjoint term fails.
        scale = np.max(np.abs(want))
        err = np.max(np.abs(got - want)) / scale
        assert err < 1e-6, f"{mode} {key}: max |diff| / max |ref| = {err:.2e}"
