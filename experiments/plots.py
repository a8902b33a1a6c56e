"""Figures of map files: κ maps (one panel per tomographic bin) and the tomographic C_ℓ triangle.

Matplotlib runs with the Agg backend (files only, no display needed).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _bin_label(mean_z: float, i: int) -> str:
    return f"bin {i + 1}, $\\langle z\\rangle$={mean_z:.2f}"


def plot_maps(out, kappa: np.ndarray, *, sky: str, field_deg: float | None = None,
              mean_z=None, title: str = "") -> Path:
    """One panel per bin: imshow (flat sky, degrees on the axes) or a Mollweide view (HEALPix).

    kappa: (n_bins, npix, npix) or (n_bins, 12 nside²). Each panel has its own colour scale
    (symmetric ±3σ around the mean), since the signal grows with source redshift.
    """
    plt = _pyplot()
    n = kappa.shape[0]
    mean_z = np.full(n, np.nan) if mean_z is None else np.asarray(mean_z)
    cols = min(n, 5)
    rows = -(-n // cols)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if sky == "flat":
        fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.0 * rows + 0.4), squeeze=False,
                                 constrained_layout=True)
        half = field_deg / 2
        for i, ax in enumerate(axes.flat):
            if i >= n:
                ax.set_visible(False)
                continue
            m = kappa[i]
            lo, hi = m.mean() - 3 * m.std(), m.mean() + 3 * m.std()
            # row index i of a map is theta_x: transpose so x runs to the right
            im = ax.imshow(m.T, origin="lower", extent=(-half, half, -half, half), cmap="inferno",
                           vmin=lo, vmax=hi, interpolation="nearest")
            ax.set_title(_bin_label(mean_z[i], i), fontsize=9)
            ax.set_xlabel(r"$\theta_x$ [deg]", fontsize=8)
            if i % cols == 0:
                ax.set_ylabel(r"$\theta_y$ [deg]", fontsize=8)
            ax.tick_params(labelsize=7)
            fig.colorbar(im, ax=ax, shrink=0.8).ax.tick_params(labelsize=7)
    else:
        import healpy

        fig = plt.figure(figsize=(4.0 * cols, 2.6 * rows + 0.4))
        for i in range(n):
            m = kappa[i]
            healpy.mollview(m, fig=fig.number, sub=(rows, cols, i + 1), title=_bin_label(mean_z[i], i),
                            cmap="inferno", min=m.mean() - 3 * m.std(), max=m.mean() + 3 * m.std(),
                            hold=False, cbar=True, notext=True)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_cl_triangle(out, ell: np.ndarray, cl: np.ndarray, theory: np.ndarray, pairs: np.ndarray,
                     *, ell_fine=None, theory_fine=None, noise=None, title: str = "") -> Path:
    """Lower triangle of an n_bins × n_bins grid: panel (row j, column i) shows pair (i, j).

    Plots ℓ(ℓ+1)C_ℓ/2π on log-log axes: the measurement (points; negative cross-spectra as open
    markers at |C_ℓ|), the binned theory (crosses) and, if given, the smooth theory curve and the
    noise level (auto-spectra only; included in ``theory`` when given).
    Args: ell (n_ell,); cl, theory (n_pairs, n_ell); pairs (n_pairs, 2); ell_fine (n_fine,),
      theory_fine (n_pairs, n_fine); noise (n_pairs,) flat noise C_ℓ (0 for cross pairs).
    """
    plt = _pyplot()
    n = int(pairs.max()) + 1
    size = max(2.2, min(3.0, 11.0 / n))
    fig, axes = plt.subplots(n, n, figsize=(size * n + 0.6, size * n), sharex=True,
                             squeeze=False, constrained_layout=True)
    f = ell * (ell + 1) / (2 * np.pi)
    for ax in axes[np.triu_indices(n, 1)]:
        ax.set_visible(False)
    for p, (i, j) in enumerate(pairs):
        ax = axes[j, i]
        ok = np.isfinite(cl[p]) & np.isfinite(ell)
        pos, neg = ok & (cl[p] > 0), ok & (cl[p] <= 0)
        if ell_fine is not None and theory_fine is not None:
            ff = ell_fine * (ell_fine + 1) / (2 * np.pi)
            ax.plot(ell_fine, ff * theory_fine[p], "k-", lw=1, label="Limber (halofit)")
            if noise is not None and noise[p] > 0:
                ax.plot(ell_fine, ff * (theory_fine[p] + noise[p]), "k--", lw=1, label="+ shape noise")
        good = np.isfinite(theory[p]) & ok
        ax.plot(ell[good], f[good] * theory[p][good], "x", color="0.35", ms=4, label="theory, binned")
        ax.plot(ell[pos], f[pos] * cl[p][pos], "o", color="C0", ms=3.5, label="maps")
        if neg.any():
            ax.plot(ell[neg], -f[neg] * cl[p][neg], "o", mfc="none", color="C0", ms=3.5,
                    label="maps (< 0)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.grid(True, which="major", alpha=0.25)
        ax.text(0.04, 0.94, f"({i + 1},{j + 1})", transform=ax.transAxes, va="top", fontsize=9)
        ax.tick_params(labelsize=7)
        if j == n - 1:
            ax.set_xlabel(r"$\ell$")
        if i == 0:
            ax.set_ylabel(r"$\ell(\ell+1)C_\ell/2\pi$")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    if n > 1:
        fig.legend(handles, labels, loc="upper right", fontsize=8, frameon=False)
    else:
        axes[0, 0].legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
