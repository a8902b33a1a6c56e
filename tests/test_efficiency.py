"""The simulation-efficiency curve (``[compare] efficiency``) on a tiny Gaussian-field problem:
the points, their budgets (online draws included), the C2ST and FoM against the exact posterior
recomputed from the saved samples, the report's table and figure, resumption point by point, and
the configuration's refusals.

The networks and flows are tiny and trained for a few epochs: the test checks the bookkeeping,
not how good a posterior 24 simulations give.
"""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from experiments import cli
from experiments.config import ConfigError, load_config
from experiments.io import read_samples

runner = CliRunner()

TINY = {
    "maps.npix": 16, "simulation.n_chi": 32, "cl.n_ell_bins": 3, "cl.ell_max": 820.0,
    "training_set.n_sims": 48, "training_set.n_calibration": 12,
    "compressor.network": "cnn", "compressor.width": 4, "compressor.depth": 2,
    "compressor.epochs": 2, "compressor.batch_size": 8, "compressor.loss": "mse",
    "compressor.steps_per_epoch": 3,
    "compressor.online": True,
    "npe.max_epochs": 5, "npe.noise_copies": 2, "npe.n_samples": 400,
    "npe.calibration_samples": 20,
    "compare.methods": ["exact", "npe_cl", "npe_mse"], "compare.c2st_samples": 200,
    "compare.efficiency": [12, 24],
}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    d = tmp_path_factory.mktemp("efficiency")
    config = d / "tiny.toml"
    config.write_text(load_config("gaussian_check").with_(**TINY).to_toml())
    out = d / "results"
    result = runner.invoke(cli.app, ["compare", "--config", str(config), "--out", str(out)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return config, out


def test_points_budgets_and_scores(run):
    from estimators.metrics import fom

    _, out = run
    eff = json.loads((out / "efficiency.json").read_text())
    exact = read_samples(out / "samples" / "exact.h5")
    ref_fom = fom(exact.samples)
    assert eff["reference"]["method"] == "exact"
    assert eff["reference"]["fom"] == pytest.approx(ref_fom, rel=1e-12)
    points = {(p["method"], p["n_train"]): p for p in eff["points"]}
    assert sorted(points) == [("npe_cl", 12), ("npe_cl", 24), ("npe_mse", 12), ("npe_mse", 24)]
    for (method, n), p in points.items():
        # NPE on C_ell spends the n training rows; the online compressor also its draws:
        # 2 epochs of compressor.steps_per_epoch = 3 fresh batches of 8, whatever n
        drawn = 0 if method == "npe_cl" else 2 * 3 * 8
        assert p["online_simulations"] == drawn and p["n_simulations"] == n + drawn
        s = read_samples(out / "efficiency" / f"{method}_n{n}" / "samples.h5")
        assert s.samples.shape == (400, 2) and s.method == method
        # the FoM and its ratio, recomputed from the saved samples (float64: 1e-12)
        assert p["fom"] == pytest.approx(fom(s.samples), rel=1e-12)
        assert p["fom_ratio"] == pytest.approx(fom(s.samples) / ref_fom, rel=1e-12)
        assert 0.45 <= p["c2st"] <= 1.0      # an accuracy: chance level 0.5 up to its noise
    # an NPE on 12-24 simulations is far from the exact posterior: the C2ST must see it
    # (a C2ST of samples against themselves would be ~0.5)
    assert max(p["c2st"] for p in points.values()) > 0.7
    assert eff["explicit"] is None            # no hmc in the methods


def test_report_has_the_table_and_the_figure(run):
    _, out = run
    report = (out / "report.md").read_text()
    assert "## Simulation efficiency" in report
    assert "| npe_mse | 24 |" in report and "| npe_cl | 12 | 12 |" in report
    assert report.count("| uncalibrated |") == 4      # no point is calibrated
    assert (out / "efficiency" / "efficiency.png").stat().st_size > 10_000
    assert "efficiency/efficiency.png" in report


def test_a_killed_curve_resumes_at_the_missing_point(run):
    config, out = run
    first_scores = {(p["method"], p["n_train"]): p for p in
                    json.loads((out / "efficiency.json").read_text())["points"]}
    keep = out / "efficiency" / "npe_cl_n12" / "point.json"
    kept = keep.read_text()
    redo = out / "efficiency" / "npe_mse_n24"
    before = json.loads((redo / "point.json").read_text())
    (redo / "point.json").unlink()
    (out / "stages" / "efficiency.json").unlink()   # as if killed inside the stage
    result = runner.invoke(cli.app, ["compare", "--config", str(config), "--out", str(out)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert keep.read_text() == kept              # a finished point is not redone
    eff = json.loads((out / "efficiency.json").read_text())
    assert len(eff["points"]) == 4
    redone = next(p for p in eff["points"] if (p["method"], p["n_train"]) == ("npe_mse", 24))
    # redone from the finished compressor (a resume is a no-op) and a refitted NPE, both
    # seeded: the same samples, hence the same scores (the fit is deterministic on one thread
    # count; 1e-6 allows for float32 reductions)
    assert redone["n_simulations"] == before["n_simulations"]
    assert redone["fom"] == pytest.approx(first_scores[("npe_mse", 24)]["fom"], rel=1e-6)
    assert redone["c2st"] == pytest.approx(first_scores[("npe_mse", 24)]["c2st"], abs=1e-9)


def test_rescoring_keeps_the_trained_points(run):
    """Other scoring settings ([compare] seed) rescore the cached points without training."""
    config, out = run
    stamps = {p: p.stat().st_mtime_ns for p in (out / "efficiency").glob("*/samples.h5")}
    result = runner.invoke(cli.app, ["compare", "--config", str(config), "--out", str(out),
                                     "--set", "compare.seed=1"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert len(json.loads((out / "efficiency.json").read_text())["points"]) == 4


def test_a_reference_file_scores_the_curve(run, tmp_path):
    """compare.reference: a samples file of the same observation (here the run's exact posterior,
    copied) is the reference without 'exact' among the methods: the cached points are rescored
    against it with the same subsample (the file's method names it), so the scores are the exact
    reference's. A file drawn for another observation is refused, naming the section."""
    import shutil

    from experiments.efficiency import read_reference
    from experiments.io import Samples, write_samples

    config, out = run
    seeded = {(p["method"], p["n_train"]): p for p in
              json.loads((out / "efficiency.json").read_text())["points"]}
    ref = tmp_path / "reference.h5"
    shutil.copy(out / "samples" / "exact.h5", ref)
    result = runner.invoke(cli.app, ["compare", "--config", str(config), "--out", str(out),
                                     "--set", 'compare.methods=["npe_cl", "npe_mse"]',
                                     "--set", f'compare.reference="{ref}"',
                                     "--set", "compare.seed=1"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    eff = json.loads((out / "efficiency.json").read_text())
    assert eff["reference"]["method"] == "reference" and eff["reference"]["file"] == str(ref)
    for p in eff["points"]:  # compare.seed=1 as in the rescoring test before this one
        assert p["c2st"] == pytest.approx(seeded[(p["method"], p["n_train"])]["c2st"], abs=1e-12)
    assert "reference (reference.h5)" in (out / "report.md").read_text()

    cfg = load_config(config).with_(**{"compare.reference": str(ref)})
    other = read_samples(ref)
    write_samples(ref, Samples(other.samples, other.names, other.method, chain=other.chain,
                               config_toml=cfg.with_(seed=5).to_toml()))
    with pytest.raises(ValueError, match=r"compare.reference: .* another \[seed\] than this run's"):
        read_reference(cfg, out)


def test_simulation_rate_after_a_resumed_generate(tmp_path):
    """The rate that turns HMC gradients into simulations is the finishing generate's own: a
    call that found 80 of 100 simulations done and ran the other 20 in 10 s of loop (12 s in
    all) did 2 sims/s, not the file's 100 ok simulations over its time (8.3/s). A call that
    found all of them done measured nothing."""
    from experiments.compare import _generate_meta, _write_marker
    from experiments.dataset import GenerateReport
    from experiments.efficiency import _sims_per_s

    def marker(n_resumed, sims_per_s):
        report = GenerateReport(path=tmp_path / "sims.h5", n_requested=100, n_ok=100,
                                n_failed=0, n_resumed=n_resumed, n_simulated=100 - n_resumed,
                                n_pending=0, failed_indices=(), wall_s=12.0, compile_s=1.5,
                                sims_per_s=sims_per_s, batch_size=10, n_devices=1,
                                mode="data-parallel")
        _write_marker(tmp_path, "sims", {"wall_s": 12.0, **_generate_meta(report)})

    marker(80, 20 / 10.0)
    assert _sims_per_s(tmp_path) == 2.0
    marker(100, 0.0)
    assert _sims_per_s(tmp_path) is None


@pytest.mark.parametrize("changes, message", [
    ({"compare.efficiency": [12, 40]}, r"compare.efficiency: size 40 exceeds the 36 training "
                                       r"simulations"),
    ({"compare.efficiency": [24, 12]}, r"compare.efficiency: must increase"),
    ({"compare.efficiency": [1]}, r"compare.efficiency: sizes must be >= 2"),
    ({"compare.efficiency": [4, 12]}, r"compare.efficiency: size 4 leaves an empty compressor "
                                      r"training or validation split"),
    ({"compare.methods": ["npe_cl"]}, r"compare.efficiency: needs a reference posterior: "
                                      r"compare.reference"),
    ({"compare.methods": ["exact", "cl_analytic"]}, r"compare.efficiency: needs an NPE method"),
])
def test_bad_efficiency_settings(changes, message):
    with pytest.raises(ConfigError, match=message):
        load_config("gaussian_check").with_(**{**TINY, **changes})


def test_observation_mismatch_names_what_differs(tmp_path):
    """A posterior's target: the observation (seed, or an observed file's path), the model
    sections and scales, and the prior; the device layout and gradient mode are not part of it."""
    from experiments.io import Samples, observation_mismatch

    cfg = load_config("quick")

    def drawn_with(other):
        return Samples(np.zeros((3, 2)), ("Omega_c", "sigma8"), "hmc", config_toml=other.to_toml())

    assert observation_mismatch(drawn_with(cfg), cfg) is None
    assert observation_mismatch(drawn_with(cfg.with_(**{"simulation.gradient": "adjoint"})),
                                cfg) is None
    assert observation_mismatch(drawn_with(cfg.with_(seed=3)), cfg) == "seed"
    assert observation_mismatch(drawn_with(cfg.with_(**{"scales.cut": False})), cfg) == "scales"
    assert observation_mismatch(drawn_with(cfg.with_(**{"maps.npix": 16})), cfg) == "maps"
    obs = tmp_path / "obs.h5"
    obs.write_bytes(b"")
    assert observation_mismatch(drawn_with(cfg), cfg.with_(**{"compare.observation": str(obs)})
                                ) == "compare.observation"
    assert observation_mismatch(Samples(np.zeros((3, 2)), ("Omega_c", "sigma8"), "hmc"),
                                cfg) == "config_toml"
