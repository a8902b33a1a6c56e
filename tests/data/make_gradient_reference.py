"""Writes gradient_reference.npz: κ maps, the loss and its gradients (Ω_c and the white-noise field)
of the small lightcone case of ``tests/lightcone_cases.py`` (16×16×64 mesh, 6 PM steps, 2 bins,
randomised replicas), for both gradient modes.

The stored numbers guard the gradient-speed work: ``test_gradient_regression.py`` checks that the
current code reproduces them to float32 round-off. They were first written by commit 13080d7 (before
the growth table went to 256 Hermite nodes), and written again, by the tree that introduced shells
(``Lightcone.chi_min``), because that tree changes the maps on purpose: a step cut by chi_max (this
case's first: χ(a_init) ≈ 2900 > chi_max = 1500 Mpc/h) now interpolates the density in time between
its true boundaries, not between chi_max and its near boundary (κ moved by 2.2e-3 of its largest
value, the loss by 3.9e-4). Regenerate only when the maps are meant to change, from that tree:

    PYTHONPATH=. python tests/data/make_gradient_reference.py tests/data/gradient_reference.npz
"""

import sys

import jax
import numpy as np

jax.config.update("jax_enable_x64", True)

from simulators import SimConfig  # noqa: E402
from simulators.ics import white_noise  # noqa: E402
from tests.lightcone_cases import BASE, lightcone, map_loss  # noqa: E402

OMEGA_C = 0.27


def compute() -> dict:
    lc = lightcone(randomize=True, seed=3)
    noise = white_noise(SimConfig(**BASE), seed=11)
    out = {"omega_c": np.float64(OMEGA_C), "noise_seed": np.int64(11)}
    for mode in ("adjoint", "checkpoint"):
        cfg = SimConfig(**BASE, gradient=mode)
        (loss, kappa), (g_om, g_noise) = map_loss(cfg, lc)(OMEGA_C, noise)
        out[f"{mode}_loss"] = np.asarray(loss)
        out[f"{mode}_kappa"] = np.asarray(kappa)
        out[f"{mode}_grad_omega_c"] = np.asarray(g_om)
        out[f"{mode}_grad_noise"] = np.asarray(g_noise)
    return out


if __name__ == "__main__":
    np.savez_compressed(sys.argv[1], **compute())
