"""Figures: κ maps (one panel per tomographic bin), the tomographic C_ℓ triangle, a PM run's P(k),
C_ℓ data with error bars against theory, and getdist triangle plots comparing methods' posteriors.

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


def _save(fig, out) -> Path:
    """Write a figure (creating its folder) and close it."""
    from .files import save_figure

    try:
        return save_figure(fig, out, dpi=110)
    finally:
        _pyplot().close(fig)


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
    return _save(fig, out)


def plot_cl_triangle(out, ell: np.ndarray, cl: np.ndarray, theory: np.ndarray, pairs: np.ndarray,
                     *, ell_fine=None, theory_fine=None, noise=None, title: str = "",
                     valid=None) -> Path:
    """Lower triangle of an n_bins × n_bins grid: panel (row j, column i) shows pair (i, j).

    Plots ℓ(ℓ+1)C_ℓ/2π on log-log axes: the measurement (points; negative cross-spectra as open
    markers at |C_ℓ|), the binned theory (crosses) and, if given, the smooth theory curve and the
    noise level (auto-spectra only; included in ``theory`` when given).
    Args: ell (n_ell,); cl, theory (n_pairs, n_ell); pairs (n_pairs, 2); ell_fine (n_fine,),
      theory_fine (n_pairs, n_fine); noise (n_pairs,) flat noise C_ℓ (0 for cross pairs);
      valid: optional (lo, hi), each (n_pairs,): the validated ℓ range of each pair; outside it the
      panel is shaded grey.
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
        if valid is not None:
            lo, hi = float(valid[0][p]), float(valid[1][p])
            edge_lo, edge_hi = ell[ok].min() / 1.2, ell[ok].max() * 1.2
            if lo > edge_lo:
                ax.axvspan(edge_lo, lo, color="0.85", zorder=0,
                           label="outside the validated range")
            if hi < edge_hi:
                ax.axvspan(hi, edge_hi, color="0.85", zorder=0,
                           label=None if lo > edge_lo else "outside the validated range")
            ax.set_xlim(edge_lo, edge_hi)
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
    return _save(fig, out)


def plot_power_spectrum(out, spectra: dict, *, a_final: float, n_steps: int, mesh_factor: int = 1,
                        title: str = "", option: str | None = None) -> Path:
    """P(k) of a PM run on log-log axes: linear theory (dashed), the run's linear field grown to
    a_final (grey), the PM density (points), and the mesh Nyquist wavenumber (and the particle
    grid's, which is mesh_factor times lower). ``spectra`` as ``runs.power_spectra`` returns it
    (k in h/Mpc, P in (Mpc/h)^3); ``option`` names ``out`` in error messages."""
    from .files import save_figure

    plt = _pyplot()
    k_nyq = spectra["k_nyq"]
    fig, ax = plt.subplots(figsize=(6.4, 4.8), constrained_layout=True)
    ax.loglog(spectra["k_fine"], spectra["p_lin_fine"], "k--", lw=1.2,
              label=f"linear theory $P_{{lin}}(k)\\,D^2(a={a_final:g})$")
    ax.loglog(spectra["k_lin"], spectra["pk_lin"], "-", lw=1, color="0.55",
              label="this run's linear field $\\times\\,D^2$")
    ax.loglog(spectra["k"], spectra["pk"], "o-", ms=3.5, lw=1.2, color="C0",
              label=f"PM density, {n_steps} steps")
    ax.axvline(k_nyq, color="0.6", ls=":", lw=1, label="mesh Nyquist")
    if mesh_factor > 1:  # the particle lattice is coarser than the mesh
        ax.axvline(k_nyq / mesh_factor, color="0.6", ls="-.", lw=1, label="particle-grid Nyquist")
    ax.set_xlabel(r"$k$ [$h\,\mathrm{Mpc}^{-1}$]")
    ax.set_ylabel(r"$P(k)$ [$h^{-3}\,\mathrm{Mpc}^{3}$]")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=9)
    ax.grid(True, which="both", alpha=0.25)
    try:
        return save_figure(fig, out, dpi=120, option=option)
    finally:
        plt.close(fig)


# ---- posterior comparison ------------------------------------------------------------------------

def legend_label(key: str, converged: bool | None = None) -> str:
    """A method's legend entry: its label, with " (unconverged)" when its draws failed the
    convergence thresholds (``converged`` False), so that contours are not read as a result;
    None (unknown: no metrics, or an older metrics file) adds nothing."""
    from .metrics import method_label

    return method_label(key) + (" (unconverged)" if converged is False else "")


def _title_above(fig, title: str):
    """A figure title centred just above the axes and legends drawn so far, returned (Text).
    getdist puts its figure legend at the top of the triangle, where a default suptitle sits."""
    renderer = fig.canvas.get_renderer()
    top = max(a.get_tightbbox(renderer).y1 for a in [*fig.axes, *fig.legends] if a.get_visible())
    pad = 4 * fig.dpi / 72  # 4 points, in pixels
    return fig.suptitle(title, y=(top + pad) / fig.bbox.height, va="bottom")


def plot_triangle(out, samples: dict, *, base, truth: dict | None = None, methods=None,
                  params=None, title: str = "", min_samples: int = 10,
                  converged: dict | None = None) -> Path:
    """getdist triangle plot overlaying several methods' posteriors, truth marked.

    Args:
      samples: method key -> ``experiments.io.Samples`` (keys as in ``experiments.metrics``).
      base: the fixed cosmology {param: value}, for the derived parameters' unsampled inputs.
      truth: {param: value}; derived truths (Omega_m, S8) are computed from it and ``base``.
      methods: the keys to draw (default: all, in ``metrics.order_methods`` order).
      params: parameters to draw, sampled ones or the derived "Omega_m", "S8" (default: every
        parameter sampled by any drawn method, in ``metrics.PARAM_ORDER``).
      min_samples: a method with fewer samples is left out (getdist cannot smooth it).
      converged: method key -> its ``metrics.json`` certificate (``methods[k]["converged"]``);
        False labels the method unconverged in the legend (``legend_label``).
    A parameter a method holds (nearly) constant is dropped from that method only (drawn for
    the others); a method constant in every drawn parameter is left out; each case warns
    (``UserWarning``). Parameters no drawn method varies are dropped; none left is a ValueError.
    """
    import warnings

    import getdist.chains
    from getdist import MCSamples, plots as gdplots

    from . import metrics as M

    plt = _pyplot()
    getdist.chains.print_load_details = False
    keys = M.order_methods(samples if methods is None else methods)
    missing = [k for k in keys if k not in samples]
    if missing:
        raise ValueError(f"method {missing[0]!r} has no samples here; have: "
                         f"{', '.join(M.order_methods(samples))}")
    if params is None:
        params = M.param_order(p for k in keys for p in samples[k].names)
    params = list(params)
    for p in params:
        if p not in M.PARAM_ORDER:
            raise ValueError(f"unknown parameter {p!r} to plot; valid: {', '.join(M.PARAM_ORDER)}")
    base = M._as_params(base, "base")
    truth = M._as_params(truth, "truth")
    truth = {**truth, **M.derived_truth(truth, base)}

    roots, used = [], set()
    for k in keys:
        s = samples[k]
        if len(s.samples) < min_samples:
            warnings.warn(f"triangle plot: {k} left out ({len(s.samples)} samples < {min_samples})")
            continue
        values, names = M.with_derived(s, base)
        idx = [names.index(p) for p in params if p in names]
        finite = np.isfinite(values[:, idx]).all(axis=1)
        if not finite.all():  # S8 of samples with Omega_m <= 0
            warnings.warn(f"triangle plot: {k}: {int((~finite).sum())} samples with undefined "
                          f"derived parameters left out")
            values = values[finite]
        cols, kept, flat = [], [], []
        for p in params:
            if p not in names:
                continue
            col = values[:, names.index(p)]
            scale = max(abs(float(col.mean())), float(np.ptp(col)), 1e-300)
            if float(col.std()) <= 1e-10 * scale:
                flat.append(p)
                continue
            cols.append(col)
            kept.append(p)
        if flat:
            warnings.warn(f"triangle plot: {k} is constant in {', '.join(flat)}; not drawn there")
        if not kept:
            warnings.warn(f"triangle plot: {k} left out (no varying parameter among "
                          f"{', '.join(params)})")
            continue
        used.update(kept)
        roots.append(MCSamples(samples=np.column_stack(cols), names=kept,
                               labels=[M.param_label(p) for p in kept],
                               label=legend_label(k, (converged or {}).get(k)),
                               settings={"ignore_rows": 0}))
    drawn = [p for p in params if p in used]
    if not roots or not drawn:
        raise ValueError(f"triangle plot: nothing to draw for methods {', '.join(keys)} and "
                         f"parameters {', '.join(params)} (too few or constant samples)")
    dropped = [p for p in params if p not in used]
    if dropped:
        warnings.warn(f"triangle plot: {', '.join(dropped)} not drawn (no method varies them)")
    from matplotlib import MatplotlibDeprecationWarning

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    markers = {p: truth[p] for p in drawn if p in truth}
    with warnings.catch_warnings():  # getdist 1.7.7 uses a Formatter attribute matplotlib 3.11 deprecates
        warnings.filterwarnings("ignore", category=MatplotlibDeprecationWarning, module="getdist")
        g = gdplots.get_subplot_plotter(width_inch=max(4.0, 2.0 * len(drawn) + 1))
        g.settings.legend_fontsize = 10
        g.settings.axes_labelsize = 12
        # drawn in reverse, so that the first method (the field level, usually the narrowest) is
        # filled on top instead of under the others; colours and legend keep the methods' order
        n, solid = len(roots), g.settings.solid_colors
        colors = [solid[(n - i - 1) % len(solid)] for i in range(n)]
        g.triangle_plot(roots[::-1], drawn, filled=True, markers=markers, legend_loc="upper right",
                        contour_colors=colors[::-1], label_order=-1)
        if title:
            g.extra_artists.append(_title_above(g.fig, title))  # extra artists: kept by export
        g.export(str(out))
    plt.close(g.fig)
    return out


def plot_cl_data_theory(out, ell, data, theory, *, cov=None, std=None, pairs=None,
                        data_label: str = "data", yscale: str = "log", title: str = "") -> Path:
    """Binned tomographic C_ℓ data with error bars against theory curve(s), one panel per pair.

    Lower triangle of an n_bins × n_bins grid, panel (row j, column i) = pair (i, j); plots
    ℓ(ℓ+1)C_ℓ/2π against ℓ (log axis) and prints χ²/n_ℓ of the first theory using the diagonal
    errors. Args:
      ell: (n_ell,) bin centres; data: (n_pairs, n_ell) or flat (n_pairs * n_ell,) in
        ``cl_data_vector`` order (entry p * n_ell + b); theory: the same shape, or a dict
        {label: array} for several curves; cov: (n_data, n_data) data-vector covariance, or std:
        the per-entry standard deviation (one of the two); pairs: (n_pairs, 2) bin indices,
        default the ``flatsky.pair_indices`` order (0,0), (0,1), ..., (n-1,n-1).
      yscale: "log" (negative values drawn open at |C_ℓ|) or "linear".
    """
    plt = _pyplot()
    ell = np.asarray(ell, np.float64).reshape(-1)
    n_ell = len(ell)

    def as_grid(x, what):
        x = np.asarray(x, np.float64)
        if x.ndim == 1 and x.size % n_ell == 0:
            x = x.reshape(-1, n_ell)
        if x.ndim != 2 or x.shape[1] != n_ell:
            raise ValueError(f"{what}: expected (n_pairs, {n_ell}) or (n_pairs * {n_ell},), got "
                             f"{np.shape(x)}")
        return x

    data = as_grid(data, "data")
    n_pairs = data.shape[0]
    curves = theory if isinstance(theory, dict) else {"theory": theory}
    curves = {k: as_grid(v, f"theory {k!r}") for k, v in curves.items()}
    for k, v in curves.items():
        if v.shape != data.shape:
            raise ValueError(f"theory {k!r} has shape {v.shape}, data {data.shape}")
    if (cov is None) == (std is None):
        raise ValueError("give exactly one of cov (data-vector covariance) or std")
    if cov is not None:
        cov = np.asarray(cov, np.float64)
        if cov.shape != (data.size, data.size):
            raise ValueError(f"cov: expected ({data.size}, {data.size}), got {cov.shape}")
        std = np.sqrt(np.clip(np.diag(cov), 0, None))
    std = as_grid(std, "std")
    if std.shape != data.shape:
        raise ValueError(f"std has shape {std.shape}, data {data.shape}")
    if pairs is None:
        n = int(round((np.sqrt(8 * n_pairs + 1) - 1) / 2))
        if n * (n + 1) // 2 != n_pairs:
            raise ValueError(f"{n_pairs} spectra is not n_bins (n_bins + 1) / 2; pass pairs")
        pairs = np.column_stack(np.triu_indices(n))  # = simulators.flatsky.pair_indices(n)
    pairs = np.asarray(pairs, int)
    if pairs.shape != (n_pairs, 2):
        raise ValueError(f"pairs: expected ({n_pairs}, 2), got {pairs.shape}")
    if yscale not in ("log", "linear"):
        raise ValueError(f"yscale must be 'log' or 'linear', got {yscale!r}")

    n = int(pairs.max()) + 1
    size = max(2.2, min(3.0, 11.0 / n))
    fig, axes = plt.subplots(n, n, figsize=(size * n + 0.6, size * n), sharex=True,
                             squeeze=False, constrained_layout=True)
    for ax in axes[np.triu_indices(n, 1)]:
        ax.set_visible(False)
    f = ell * (ell + 1) / (2 * np.pi)
    first = next(iter(curves))
    for p, (i, j) in enumerate(pairs):
        ax = axes[max(i, j), min(i, j)]
        d, e = data[p], std[p]
        for c, (label, th) in enumerate(curves.items()):
            ax.plot(ell, f * (np.abs(th[p]) if yscale == "log" else th[p]), "-", color=f"C{c + 1}",
                    lw=1.2, label=label)
        if yscale == "log":
            pos = d > 0
            ax.errorbar(ell[pos], f[pos] * d[pos], yerr=f[pos] * e[pos], fmt="o", color="C0",
                        ms=3, capsize=1.5, lw=0.8, label=data_label)
            if (~pos).any():
                ax.errorbar(ell[~pos], -f[~pos] * d[~pos], yerr=f[~pos] * e[~pos], fmt="o",
                            mfc="none", color="C0", ms=3, capsize=1.5, lw=0.8,
                            label=f"{data_label} (< 0)")
            ax.set_yscale("log", nonpositive="clip")
        else:
            ax.errorbar(ell, f * d, yerr=f * e, fmt="o", color="C0", ms=3, capsize=1.5, lw=0.8,
                        label=data_label)
            ax.axhline(0, color="0.6", lw=0.6)
        ok = e > 0
        chi2 = float(np.sum(((d - curves[first][p])[ok] / e[ok]) ** 2)) / max(int(ok.sum()), 1)
        ax.text(0.04, 0.94, f"({i + 1},{j + 1})  $\\chi^2/n$={chi2:.2f}", transform=ax.transAxes,
                va="top", fontsize=8)
        ax.set_xscale("log")
        ax.grid(True, which="major", alpha=0.25)
        ax.tick_params(which="both", labelsize=7)
        if max(i, j) == n - 1:
            ax.set_xlabel(r"$\ell$")
        if min(i, j) == 0:
            ax.set_ylabel(r"$\ell(\ell+1)C_\ell/2\pi$")
    legend = {}  # unique labels over all panels (the "< 0" entry may appear in one only)
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(lab, h)
    if n > 1:
        fig.legend(legend.values(), legend.keys(), loc="upper right", fontsize=8, frameon=False)
    else:
        axes[0, 0].legend(legend.values(), legend.keys(), fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, out)
