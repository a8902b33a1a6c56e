"""Writes gradient_reference.npz: κ maps, the loss and its gradients (Ω_c and the white-noise field)
of the small lightcone case of ``tests/lightcone_cases.py`` (16×16×64 mesh, 6 PM steps, 2 bins,
randomised replicas), for both gradient modes.

The stored numbers come from commit 13080d7, before the growth table went to 256 Hermite nodes
(and the other gradient-speed changes); ``test_gradient_regression.py`` checks that the current
code reproduces them to float32 round-off. Regenerate only from that commit's tree:

    git worktree add --detach /tmp/parent 13080d7
    cd /tmp/parent && PYTHONPATH=/tmp/parent python <this tree>/tests/data/make_gradient_reference.py OUT.npz
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
