"""experiments.report and the comparison plots of experiments.plots (Agg, files only)."""

import copy
import re
import warnings

import numpy as np
import pytest

from experiments.io import Samples, write_samples
from experiments.metrics import compare_metrics, method_label, param_label, write_metrics
from experiments.plots import legend_label, plot_cl_data_theory, plot_triangle
from experiments.report import plot_results, summary_lines, write_report

NAMES = ("Omega_c", "sigma8")
BASE = {"Omega_c": 0.2664, "Omega_b": 0.0492, "h": 0.6727, "n_s": 0.9645, "sigma8": 0.831,
        "w0": -1.0, "wa": 0.0}
TRUTH = {"Omega_c": 0.2664, "sigma8": 0.831}
PNG = b"\x89PNG\r\n\x1a\n"


def _gauss(rng, mean, std, rho, n):
    cov = np.array([[std[0] ** 2, rho * std[0] * std[1]], [rho * std[0] * std[1], std[1] ** 2]])
    return rng.multivariate_normal(mean, cov, n)


@pytest.fixture(scope="module")
def samples():
    rng = np.random.default_rng(7)
    npe = _gauss(rng, [0.265, 0.83], [0.018, 0.025], -0.6, 1500)
    return {
        "cl_analytic": Samples(_gauss(rng, [0.26, 0.84], [0.03, 0.04], -0.6, 2000), NAMES,
                               "cl_analytic", info={"wall_time_s": 12.5, "n_cov": 1000}),
        "hmc": Samples(_gauss(rng, [0.27, 0.83], [0.015, 0.02], -0.7, 2000), NAMES, "hmc",
                       info={"wall_time_s": 3600.0, "n_gradients": 123456}),
        "npe_vmim": Samples(np.column_stack([npe, 0.049 + 0.006 * rng.standard_normal(1500)]),
                            NAMES + ("Omega_b",), "npe_vmim",
                            info={"fit_time_s": 40.0, "sample_time_s": 2.0, "n_train_sims": 2000,
                                  "calibration": {"tarp_atc": -0.0123, "tarp_ks_pval": 0.4,
                                                  "sbc_ks_pvals": {"Omega_c": 0.31, "sigma8": 0.72},
                                                  "n_test": 200}}),
    }


def _is_png(path, min_bytes=10_000):
    data = path.read_bytes()
    return data[:8] == PNG and len(data) > min_bytes


def test_triangle_plot_methods_params_and_derived(samples, tmp_path):
    out = plot_triangle(tmp_path / "figs" / "triangle.png", samples, base=BASE, truth=TRUTH,
                        methods=["hmc", "npe_vmim"], params=["Omega_m", "sigma8", "S8"])
    assert out.is_file() and _is_png(out)
    with pytest.raises(ValueError, match="unknown parameter 'Om'"):
        plot_triangle(tmp_path / "x.png", samples, base=BASE, params=["Om", "sigma8"])
    with pytest.raises(ValueError, match="unknown method 'mcmc'"):
        plot_triangle(tmp_path / "x.png", samples, base=BASE, methods=["mcmc"])
    with pytest.raises(ValueError, match="'exact' has no samples"):
        plot_triangle(tmp_path / "x.png", samples, base=BASE, methods=["exact"])


def test_triangle_plot_fills_the_first_method_on_top(samples, tmp_path, monkeypatch):
    """The first method (the field level, usually the narrowest) is filled last, on top of the
    wider posteriors, in the colour of its legend entry, and the legend keeps the methods' order:
    drawn first, the field level's filled contours lay under the others, invisible."""
    from getdist import plots as gdplots

    seen = {}
    export = gdplots.GetDistPlotter.export
    monkeypatch.setattr(gdplots.GetDistPlotter, "export",
                        lambda self, *a, **k: seen.setdefault("g", self) and export(self, *a, **k))
    plot_triangle(tmp_path / "t.png", samples, base=BASE, methods=["hmc", "cl_analytic"],
                  params=["Omega_c", "sigma8"])
    g = seen["g"]
    legend = g.legend
    assert [t.get_text() for t in legend.get_texts()] == [method_label("hmc"),
                                                         method_label("cl_analytic")]
    handle_rgb = [np.asarray(h.get_facecolor())[:3] for h in legend.legend_handles]
    filled = [c for c in g.subplots[1][0].collections if len(c.get_facecolor())]
    inner_rgb = [np.asarray(c.get_facecolor())[-1][:3] for c in filled]  # the 68 % region
    np.testing.assert_allclose(inner_rgb[-1], handle_rgb[0], atol=1e-6)  # hmc on top
    np.testing.assert_allclose(inner_rgb[0], handle_rgb[1], atol=1e-6)


def test_triangle_plot_survives_degenerate_methods(samples, tmp_path):
    rng = np.random.default_rng(1)
    const = samples["hmc"].samples.copy()
    const[:, 0] = 0.27  # constant Omega_c (a stuck chain)
    narrow = samples["hmc"].samples.copy()
    narrow[:, 0] = 0.27 * (1 + 1e-9 * rng.standard_normal(len(narrow)))  # nearly constant
    line = samples["hmc"].samples.copy()
    line[:, 1] = 3 * line[:, 0]  # 100 % correlated
    few = samples["hmc"].samples[:5]
    degenerate = {"hmc": samples["hmc"], "npe_mse": Samples(const, NAMES, "npe_mse"),
                  "npe_mae": Samples(narrow, NAMES, "npe_mae"),
                  "npe_gnll": Samples(line, NAMES, "npe_gnll"),
                  "exact": Samples(few, NAMES, "exact"),
                  "npe_cl": Samples(np.tile([0.27, 0.8], (100, 1)), NAMES, "npe_cl")}
    with pytest.warns(UserWarning) as record:
        out = plot_triangle(tmp_path / "deg.png", degenerate, base=BASE, truth=TRUTH)
    text = " ".join(str(w.message) for w in record)
    assert "npe_mse is constant in Omega_c" in text
    assert "exact left out (5 samples" in text
    assert "npe_cl left out (no varying parameter" in text
    assert _is_png(out)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="nothing to draw"):
            plot_triangle(tmp_path / "none.png", {"npe_cl": degenerate["npe_cl"]}, base=BASE)


# the extents below format tick labels with getdist 1.7.7's Formatter (see plot_triangle)
@pytest.mark.filterwarnings("ignore:The format attribute was deprecated:DeprecationWarning")
def test_triangle_plot_title_clears_the_legend_and_axes(samples, tmp_path, monkeypatch):
    """The title sits above getdist's figure legend and the panels (a default suptitle overlaps
    both on two parameters with a long legend entry), inside the area the file keeps."""
    from matplotlib.figure import Figure
    from matplotlib.text import Text

    saved = []
    savefig = Figure.savefig

    def recording(fig, *args, **kw):  # the renderer too: a closed figure's canvas has none
        saved.append((fig, kw, fig.canvas.get_renderer()))
        return savefig(fig, *args, **kw)

    monkeypatch.setattr(Figure, "savefig", recording)
    title = "gaussian_check: posteriors"
    out = plot_triangle(tmp_path / "t.png", samples, base=BASE, truth=TRUTH, title=title,
                        params=["Omega_c", "sigma8"], converged={"hmc": False})
    assert _is_png(out)
    [(fig, kw, renderer)] = saved
    text = next(t for t in fig.get_children() if isinstance(t, Text) and t.get_text() == title)
    box = text.get_window_extent(renderer)
    (legend,) = fig.legends
    assert "(unconverged)" in " ".join(t.get_text() for t in legend.get_texts())
    assert not box.overlaps(legend.get_window_extent(renderer))
    for ax in fig.axes:
        assert not box.overlaps(ax.get_window_extent(renderer)), ax
    kept = fig.get_tightbbox(renderer, bbox_extra_artists=kw["bbox_extra_artists"])
    kept_px = kept.transformed(fig.dpi_scale_trans)  # inches → pixels, as the extents
    assert kept_px.y1 >= box.y1 and kept_px.x0 <= box.x0 and kept_px.x1 >= box.x1


def test_cl_data_theory_plot(tmp_path):
    rng = np.random.default_rng(2)
    n_bins, ell = 3, np.geomspace(100, 3000, 8)
    n_pairs = n_bins * (n_bins + 1) // 2
    theory = 1e-9 * (ell / 100.0) ** -1.2 * np.linspace(0.5, 2, n_pairs)[:, None]
    std = 0.1 * theory
    cov = np.diag(std.reshape(-1) ** 2)
    data = theory + std * rng.standard_normal(theory.shape)
    data[1, -1] = -0.5 * theory[1, -1]  # a negative cross-spectrum point
    out = plot_cl_data_theory(tmp_path / "cl.png", ell, data.reshape(-1),
                              {"halofit": theory, "linear": 0.9 * theory}, cov=cov)
    assert _is_png(out)
    out = plot_cl_data_theory(tmp_path / "cl_lin.png", ell, data, theory, std=std, yscale="linear")
    assert _is_png(out)
    with pytest.raises(ValueError, match="exactly one of cov"):
        plot_cl_data_theory(tmp_path / "x.png", ell, data, theory)
    with pytest.raises(ValueError, match="cov: expected"):
        plot_cl_data_theory(tmp_path / "x.png", ell, data, theory, cov=cov[:-1, :-1])
    with pytest.raises(ValueError, match="not n_bins"):
        plot_cl_data_theory(tmp_path / "x.png", ell, data[:4], theory[:4], std=std[:4])


def _rows(text, section):
    """The table rows (after the header) of a ## section."""
    body = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    return [ln for ln in body.splitlines() if ln.startswith("| ")][1:]


def test_report_tables_figures_and_calibration(samples, tmp_path):
    metrics = compare_metrics(samples, base=BASE, truth=TRUTH, max_samples=300)
    write_metrics(tmp_path / "metrics.json", metrics)
    fig = plot_triangle(tmp_path / "figs" / "triangle.png", samples, base=BASE, truth=TRUTH)
    cal_full = {"tarp": {"atc": 0.0456, "ks_pval": 0.9},
                "sbc": {"ks_pvals": {"Omega_c": 0.11, "sigma8": 0.22}}, "n_test": 100}
    path = write_report(tmp_path / "report", metrics,
                        {"Posterior contours": fig, "Missing": tmp_path / "nope.png"},
                        title="Toy comparison", config_toml="[cosmology]\nsigma8 = 0.831\n",
                        calibration={"cl_analytic": cal_full})
    assert path == tmp_path / "report" / "report.md"
    text = path.read_text()
    assert text.startswith("# Toy comparison\n")
    assert "![Posterior contours](../figs/triangle.png)" in text  # relative to the report
    assert (path.parent / "../figs/triangle.png").is_file()
    assert "**Missing** *(file missing)*" in text
    keys = ["hmc", "cl_analytic", "npe_vmim"]
    for section in ("Constraining power", "Cost", "C2ST", "Draws"):
        rows = _rows(text, section)
        assert [r.split(" | ")[0] for r in rows] == [f"| {method_label(k)} (`{k}`)" for k in keys]
    bias_rows = _rows(text, "Posterior means and bias")
    assert bias_rows[0].startswith("| truth | 0.2664 |")
    assert len(bias_rows) == 4
    # values in the rows are the metrics' values
    m = metrics["methods"]
    power = dict(zip(keys, _rows(text, "Constraining power")))
    for k in keys:
        cells = power[k].split(" | ")
        assert cells[2] == f"{m[k]['fom']['Omega_c,sigma8']:.0f}"
        assert cells[3] == f"{m[k]['fom']['Omega_m,sigma8']:.0f}"
        assert cells[4] == f"{metrics['fom_ratio']['values'][k]['Omega_c,sigma8']:.2f}"
    assert power["cl_analytic"].split(" | ")[4:6] == ["1.00", "1.00"]
    hmc_bias = m["hmc"]["params"]["sigma8"]["bias_sigma"]
    assert f"({hmc_bias:+.2f}σ)" in dict(zip(keys, bias_rows[1:]))["hmc"]
    cost = dict(zip(keys, _rows(text, "Cost")))
    assert "| 3600.0 | — | 123456 |" in cost["hmc"]
    assert "| 42.0 | 2000 | — |" in cost["npe_vmim"]
    c2st = dict(zip(keys, _rows(text, "C2ST")))
    acc = {(e["a"], e["b"]): e["accuracy"] for e in metrics["c2st"]["pairs"]}
    assert c2st["hmc"].split(" | ")[1:] == ["—", f"{acc[('hmc', 'cl_analytic')]:.3f}",
                                            f"{acc[('hmc', 'npe_vmim')]:.3f} |"]
    assert "MLPClassifier" in text and "5-fold" in text
    draws = dict(zip(keys, _rows(text, "Draws")))
    header = text.split("## Draws\n", 1)[1].split("\n| ", 1)[1].split(" | ")
    for k in keys:  # a parameter the method did not sample (Omega_b for HMC) has a dash
        cells = dict(zip(header, draws[k].split(" | ")))
        for p in ("Omega_c", "Omega_b", "sigma8"):
            ess = m[k]["draws"]["ess"].get(p)
            assert cells[f"ESS ${param_label(p)}$"] == ("—" if ess is None else f"{ess:.0f}")
    # calibration: given explicitly (full calibrate() dict) and carried by the NPE samples
    cal = dict(zip(["cl_analytic", "npe_vmim"], _rows(text, "Calibration")))
    assert cal["cl_analytic"].split(" | ")[1:] == ["+0.046", "0.90", "100", "0.11", "0.22 |"]
    assert cal["npe_vmim"].split(" | ")[1:] == ["-0.012", "0.40", "200", "0.31", "0.72 |"]
    assert "```toml\n[cosmology]\nsigma8 = 0.831\n```" in text
    assert not re.search(r"\bnan\b|\bNone\b", text)


# ---- convergence flags ------------------------------------------------------------------------
# "hmc" below is two 1000-step Gaussian random walks: ESS of a few and split R̂ >> 1.01 at any
# seed (see tests/test_metrics.py), so it fails the default thresholds by orders of magnitude;
# the fixture's i.i.d. methods (1500-2000 draws: ESS ≈ n, R̂ within ~1e-3 of 1) pass.

def _walk(rng, n=1000):
    steps = 0.001 * rng.standard_normal((2, n, 2))
    return Samples((np.array([0.27, 0.83]) + np.cumsum(steps, axis=1)).reshape(-1, 2), NAMES,
                   "hmc", chain=np.repeat([0, 1], n), info={"wall_time_s": 3600.0})


@pytest.fixture(scope="module")
def unconverged(samples):
    """Metrics of the fixture's C_ell and NPE methods with an unconverged HMC."""
    return compare_metrics({**samples, "hmc": _walk(np.random.default_rng(5))}, base=BASE,
                           truth=TRUTH, c2st=False)


def _note(m):
    """The expected flag, from the metrics' own ESS (rounded down) and worst R̂."""
    d = m["draws"]
    return (f"unconverged (ESS {'/'.join(str(int(e)) for e in d['ess'].values())}, "
            f"R̂ {max(d['r_hat'].values()):.2f}")


def test_console_summary_flags_an_unconverged_method(unconverged):
    assert unconverged["methods"]["hmc"]["converged"] is False
    lines = dict(zip(unconverged["methods_order"], summary_lines(unconverged)))
    assert "unconverged" in lines["hmc"] and "x C_ell" not in lines["hmc"]
    assert _note(unconverged["methods"]["hmc"]) in lines["hmc"]
    assert lines["hmc"].startswith("hmc          FoM(Omega_c, sigma8) = ")  # the FoM stays
    assert lines["cl_analytic"].endswith("(1.00 x C_ell)")  # certified: printed as before
    ratio = unconverged["fom_ratio"]["values"]["npe_vmim"]["Omega_c,sigma8"]
    assert lines["npe_vmim"].endswith(f"({ratio:.2f} x C_ell)")
    last = summary_lines(unconverged)[-1]
    assert "ESS ≥ 400" in last and "R̂ ≤ 1.01" in last  # the thresholds, with the flag


def test_no_ratio_to_an_unconverged_c_ell_reference(samples, tmp_path):
    """With the C_ell reference itself unconverged, no method's FoM ratio is presented."""
    walk = _walk(np.random.default_rng(6))
    m = compare_metrics({"cl_analytic": Samples(walk.samples, NAMES, "cl_analytic",
                                                chain=walk.chain),
                         "npe_vmim": samples["npe_vmim"]}, base=BASE, truth=TRUTH, c2st=False)
    assert m["methods"]["npe_vmim"]["converged"] is True
    lines = dict(zip(m["methods_order"], summary_lines(m)))
    assert "x C_ell" not in " ".join(lines.values())
    assert "no C_ell ratio: cl_analytic unconverged" in lines["npe_vmim"]
    text = write_report(tmp_path, m, title="t").read_text()
    power = dict(zip(m["methods_order"], _rows(text, "Constraining power")))
    assert power["npe_vmim"].split(" | ")[4:6] == ["— (reference cl_analytic unconverged)"] * 2


def test_report_flags_an_unconverged_method_in_the_fom_table(unconverged, tmp_path):
    text = write_report(tmp_path, unconverged, title="t").read_text()
    power = dict(zip(unconverged["methods_order"], _rows(text, "Constraining power")))
    cells = power["hmc"].split(" | ")
    assert cells[0] == f"| {method_label('hmc')} (`hmc`) — {_note(unconverged['methods']['hmc'])})"
    assert cells[4:6] == ["— (unconverged)"] * 2  # the FoM ratios: no result
    for k in ("cl_analytic", "npe_vmim"):  # certified rows as before
        assert power[k].split(" | ")[0] == f"| {method_label(k)} (`{k}`)"
        assert "unconverged" not in power[k]
    note = text.split("## Constraining power\n", 1)[1].split("\n| ", 1)[0]
    assert "ESS ≥ 400 and split R̂ ≤ 1.01" in note  # the thresholds are stated


def test_older_metrics_without_the_certificate_are_not_flagged(unconverged, tmp_path):
    """A metrics.json written before "converged" existed: no flags (unknown), no crash."""
    old = copy.deepcopy(unconverged)
    del old["convergence"]
    for m in old["methods"].values():
        del m["converged"]
    text = write_report(tmp_path, old, title="t").read_text()
    assert "unconverged" not in text
    assert "unconverged" not in " ".join(summary_lines(old))
    assert any("x C_ell" in line for line in summary_lines(old))


def test_legend_labels_unconverged_methods(samples, unconverged, tmp_path, monkeypatch):
    assert legend_label("hmc", False) == f"{method_label('hmc')} (unconverged)"
    for unknown_or_certified in (True, None):
        assert "unconverged" not in legend_label("hmc", unknown_or_certified)
    # `lensbench plot` hands metrics.json's certificates to the triangle plot
    (tmp_path / "samples").mkdir()
    write_samples(tmp_path / "samples" / "hmc.h5", _walk(np.random.default_rng(5)))
    write_samples(tmp_path / "samples" / "cl_analytic.h5", samples["cl_analytic"])
    write_metrics(tmp_path / "metrics.json", unconverged)
    got = {}
    monkeypatch.setattr("experiments.plots.plot_triangle",
                        lambda out, samples, **kw: got.update(kw) or out)
    plot_results(tmp_path)
    assert got["converged"]["hmc"] is False and got["converged"]["cl_analytic"] is True
