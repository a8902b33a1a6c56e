"""``lensbench compare`` end to end on a reduced gaussian_check (the validation experiment):
a killed run resumes from its finished stages, a finished run is skipped, ``--force`` redoes a
stage, metrics.json agrees with independent computations on the saved samples, and the methods
agree with the exact posterior within stated tolerances. Plus bad input.

The reduction (16² maps, 2 bins, Limber on 32 nodes, a few hundred HMC samples) keeps the test
short; the shipped gaussian_check is the full-size run. The NPE stage is there for the stage cache
(killed after it, reused, counted in the budget): it trains on 36 simulations for a few epochs,
too few for a posterior worth comparing, so its accuracy is not checked here
(test_npe.test_npe_matches_analytic_gaussian_posterior checks NPE against a closed form; the
compressor path is covered by test_pipeline).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from experiments import cli
from experiments.config import ConfigError, load_config
from experiments.io import read_samples

from tests.procs import HANG

runner = CliRunner()

REDUCED = {
    "maps.npix": 16, "simulation.n_chi": 32, "cl.n_ell_bins": 4,
    "cl.ell_max": 820.0,  # past the corner mode of the 16² grid (815)
    # the smallest NPE stage (as in test_pipeline): it only has to exist for the cache
    "training_set.n_sims": 48, "training_set.n_calibration": 12,
    "npe.max_epochs": 8, "npe.noise_copies": 2, "npe.n_samples": 500,
    "npe.calibration_samples": 20,
    "cl_baseline.num_warmup": 100, "cl_baseline.num_samples": 250,
    "cl_baseline.num_chains": 1, "cl_baseline.n_chi": 32,
    "hmc.num_warmup": 80, "hmc.num_samples": 150, "hmc.num_chains": 1,
    "hmc.max_tree_depth": 4, "hmc.segment": 40,
    "compare.methods": ["exact", "hmc", "cl_analytic", "npe_cl"],
    "compare.c2st_samples": 300,
}
KILL_AFTER = "npe_cl"
FIRST_STAGES = ["observation", "sims", "npe_cl"]  # done before the kill


def _config_file(d: Path) -> Path:
    cfg = load_config("gaussian_check").with_(**REDUCED)
    path = d / "check.toml"
    path.write_text(cfg.to_toml())
    return path


def invoke(*args):
    return runner.invoke(cli.app, [str(a) for a in args])


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """A compare run killed (like SIGKILL) after a stage, then resumed in-process."""
    d = tmp_path_factory.mktemp("compare")
    config = _config_file(d)
    out = d / "results"
    env = {**os.environ, "LENSBENCH_COMPARE_KILL_AFTER": KILL_AFTER}
    killed = subprocess.run([sys.executable, "-m", "experiments.cli", "compare", "--config",
                             str(config), "--out", str(out)], env=env, capture_output=True,
                            text=True, timeout=HANG)
    assert killed.returncode == 137, killed.stderr[-3000:]
    done = sorted(p.stem for p in (out / "stages").glob("*.json"))
    assert done == sorted(FIRST_STAGES)
    resumed = invoke("compare", "--config", config, "--out", out)
    assert resumed.exit_code == 0, resumed.output + repr(resumed.exception)
    return d, config, out, resumed.output


def test_killed_compare_resumes_from_finished_stages(results):
    _, _, out, log = results
    for stage in FIRST_STAGES:
        assert f"{stage}: done before" in log
    for stage in ("cl_analytic", "hmc", "exact", "metrics", "report"):
        assert f"{stage}: running (first run)" in log
    if len(os.sched_getaffinity(0)) >= 2:  # the C_ell NUTS ran beside the stages after it
        assert "cl_analytic: running (first run) in a background process" in log
        assert "cl_analytic: C_ell likelihood:" in log  # its log, echoed when it was waited for
        marker = json.loads((out / "stages" / "cl_analytic.json").read_text())
        assert 0 < marker["wall_s"] and marker["n_samples"] == REDUCED["cl_baseline.num_samples"]
    report = (out / "report.md").read_text()
    for method in REDUCED["compare.methods"]:
        assert f"`{method}`" in report
    for fig in ("contours.png", "maps.png", "cl_data.png"):
        assert (out / "figures" / fig).stat().st_size > 1000


def test_finished_compare_is_skipped_and_force_redoes_a_stage(results):
    _, config, out, _ = results
    runs = {p.stem: json.loads(p.read_text())["run_id"] for p in (out / "stages").glob("*.json")}
    again = invoke("compare", "--config", config, "--out", out)
    assert again.exit_code == 0, again.output
    assert "running" not in again.output
    forced = invoke("compare", "--config", config, "--out", out, "--force", "exact")
    assert forced.exit_code == 0, forced.output
    rerun = {s for s in runs if f"{s}: running" in forced.output}
    assert rerun == {"exact", "metrics", "report"}  # the stage and what depends on it
    after = {p.stem: json.loads(p.read_text())["run_id"] for p in (out / "stages").glob("*.json")}
    assert all((after[s] != runs[s]) == (s in rerun) for s in runs)


def test_more_hmc_samples_continue_the_finished_chains(results, tmp_path):
    """A larger hmc.num_samples reruns the hmc stage as a continuation: the finished draws are
    kept bit for bit and only the new ones are sampled (a long chain is not thrown away); any
    other change to what the stage reads, or fewer samples, still starts it clean."""
    import shutil

    from explicit import checkpoint as ckpt
    from experiments.compare import _grows, _read_marker, plan

    _, config, out, _ = results
    more = tmp_path / "results"
    shutil.copytree(out, more)
    before = ckpt.load_chain(more / "hmc", 0, state=False)
    n = REDUCED["hmc.num_warmup"] + REDUCED["hmc.num_samples"]
    assert before.n_rows == n
    cfg = load_config(config)
    bigger = tmp_path / "more.toml"
    bigger.write_text(cfg.with_(**{"hmc.num_samples": REDUCED["hmc.num_samples"] + 40}).to_toml())
    log = invoke("compare", "--config", bigger, "--out", more)
    assert log.exit_code == 0, log.output + repr(log.exception)
    assert f"hmc: running (continuing: hmc.num_samples {REDUCED['hmc.num_samples']} → " \
           f"{REDUCED['hmc.num_samples'] + 40})" in log.output
    for stage in ("observation", "sims", "npe_cl", "cl_analytic", "exact"):
        assert f"{stage}: done before" in log.output
    after = ckpt.load_chain(more / "hmc", 0, state=False)
    assert after.n_rows == n + 40
    np.testing.assert_array_equal(after.records["theta"][:n], before.records["theta"])
    assert len(read_samples(more / "samples" / "hmc.h5").samples) == REDUCED["hmc.num_samples"] + 40

    stage = next(s for s in plan(cfg) if s.name == "hmc")
    marker = _read_marker(more, "hmc")
    upstream = {"observation": _read_marker(more, "observation")["run_id"]}
    assert _grows(cfg.with_(**{"hmc.num_samples": 500}), stage, upstream, marker) is not None
    for change in ({"hmc.num_samples": 100}, {"hmc.num_samples": 500, "hmc.max_tree_depth": 5},
                   {"hmc.num_warmup": 500}):
        assert _grows(cfg.with_(**change), stage, upstream, marker) is None, change


def test_metrics_match_independent_computations(results):
    _, _, out, _ = results
    metrics = json.loads((out / "metrics.json").read_text())
    cfg = load_config(out / "config.toml")
    omega_b = cfg.cosmology.Omega_b
    for method in REDUCED["compare.methods"]:
        s = read_samples(out / "samples" / f"{method}.h5")
        oc, s8 = s.column("Omega_c"), s.column("sigma8")
        m = metrics["methods"][method]
        fom = 1 / np.sqrt(np.linalg.det(np.cov(np.stack([oc, s8]))))
        fom_m = 1 / np.sqrt(np.linalg.det(np.cov(np.stack([oc + omega_b, s8]))))
        assert m["fom"]["Omega_c,sigma8"] == pytest.approx(fom, rel=1e-9)
        assert m["fom"]["Omega_m,sigma8"] == pytest.approx(fom_m, rel=1e-9)
        S8 = s8 * np.sqrt((oc + omega_b) / 0.3)
        assert m["S8"]["std"] == pytest.approx(S8.std(ddof=1), rel=1e-9)
        truth = s.truth[s.names.index("sigma8")]
        assert m["params"]["sigma8"]["bias_sigma"] == pytest.approx(
            (s8.mean() - truth) / s8.std(ddof=1), rel=1e-9)
    assert metrics["methods"]["hmc"]["budget"]["n_gradients"] > 0
    assert metrics["methods"]["npe_cl"]["budget"]["n_simulations"] == REDUCED["training_set.n_sims"]
    ref = metrics["fom_ratio"]["reference"]
    assert ref == "cl_analytic"
    ratio = metrics["fom_ratio"]["values"]["hmc"]["Omega_c,sigma8"]
    assert ratio == pytest.approx(metrics["methods"]["hmc"]["fom"]["Omega_c,sigma8"]
                                  / metrics["methods"][ref]["fom"]["Omega_c,sigma8"], rel=1e-9)


def test_the_cl_likelihood_is_calibrated_on_the_held_out_simulations(results):
    """With training simulations in the run, the C_ℓ likelihood gets NPE's certificate: SBC and
    TARP on the same 12 held-out simulations (the ``cl_calibration`` stage), carried into
    metrics.json and the report's calibration table."""
    _, _, out, _ = results
    cal = json.loads((out / "posteriors/cl_analytic/calibration/calibration.json").read_text())
    assert cal["n_test"] == 12 and cal["likelihood"]["kind"] == "wishart"
    got = json.loads((out / "metrics.json").read_text())["methods"]["cl_analytic"]["calibration"]
    assert got["n_test"] == 12 and set(got["sbc_ks_pvals"]) == {"Omega_c", "sigma8"}
    assert got["tarp_atc"] == pytest.approx(cal["tarp"]["atc"], abs=1e-12)
    table = (out / "report.md").read_text().split("## Calibration")[1].split("\n## ")[0]
    assert "C_ℓ" in table or "cl_analytic" in table, table


def test_a_stage_resumed_after_a_kill_counts_its_earlier_time(tmp_path):
    """A stage's marker times only the invocation that finished it; HMC chains keep their own
    sampling clock across resumes (wall_time_s), and the budget takes the larger: an HMC stage
    killed after 3000 s of sampling and finished in 500 s more cost at least 3500 s, not 500 s."""
    from experiments.compare import _write_marker, budgets

    cfg = load_config("gaussian_check").with_(**{"compare.methods": ["hmc", "cl_analytic"]})
    _write_marker(tmp_path, "hmc", {"wall_s": 500.0, "wall_time_s": 3500.0})
    # cl_analytic's own clock (NUTS) misses its covariance simulations: the stage time wins
    _write_marker(tmp_path, "cl_analytic", {"wall_s": 400.0, "wall_time_s": 30.0})
    b = budgets(cfg, tmp_path)
    assert b["hmc"]["wall_s"] == 3500.0 and b["hmc"]["stages"] == {"hmc": 3500.0}
    assert b["cl_analytic"]["wall_s"] == 400.0


def test_a_report_rerun_keeps_the_observed_maps(tmp_path, monkeypatch, capsys):
    """Each stage owns only the files it writes: the report's figures are among its outputs (a
    missing one reruns it), and rerunning it leaves figures/maps.png, the observation stage's,
    in place. The exact posterior is replaced by Gaussian draws: its grid would cost more than
    the rest of this test, and the report only reads the samples."""
    from experiments import compare as C, pipeline
    from experiments.io import Samples, write_samples

    def fake_exact(cfg, maps_path, out):
        rng = np.random.default_rng(0)
        s = Samples(rng.normal([0.27, 0.83], [0.02, 0.03], (500, 2)), ("Omega_c", "sigma8"),
                    "exact", info={"wall_time_s": 1.0})
        write_samples(out, s)
        return s

    monkeypatch.setattr(pipeline, "run_exact", fake_exact)
    cfg = load_config("gaussian_check").with_(**{**REDUCED, "compare.methods": ["exact"]})
    out = tmp_path / "results"
    C.compare(cfg, out)
    maps, contours = out / "figures" / "maps.png", out / "figures" / "contours.png"
    drawn = maps.read_bytes()
    assert drawn[:8] == b"\x89PNG\r\n\x1a\n"

    contours.unlink()
    capsys.readouterr()
    C.compare(cfg, out)
    assert "report: running (outputs missing)" in capsys.readouterr().err
    assert contours.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    C.compare(cfg, out, force=("report",))
    assert "report: running (forced)" in capsys.readouterr().err
    assert maps.read_bytes() == drawn
    assert "*(file missing)*" not in (out / "report.md").read_text()


def test_online_compressor_draws_count_in_its_npe_budget(tmp_path):
    """A compressor trained online drew simulations of its own: they are part of the cost of
    the NPE on its summaries (training set + draws), not of the NPE on C_ell."""
    import json

    from experiments.compare import budgets

    cfg = load_config("gaussian_check").with_(**{"compare.methods": ["npe_vmim", "npe_cl"]})
    (tmp_path / "compressors" / "vmim").mkdir(parents=True)
    (tmp_path / "compressors" / "vmim" / "compressor.json").write_text(
        json.dumps({"config": {"online": True}, "online_simulations": 7680}))
    b = budgets(cfg, tmp_path)
    assert b["npe_vmim"]["n_simulations"] == cfg.training_set.n_sims + 7680
    assert b["npe_cl"]["n_simulations"] == cfg.training_set.n_sims


def _moments(out, method):
    s = read_samples(out / "samples" / f"{method}.h5")
    return s.samples.mean(0), s.samples.std(0), s


def test_methods_agree_with_the_exact_posterior(results):
    """Tolerances (in units of the exact posterior σ, per parameter):
    HMC targets the same posterior, so it must agree within its Monte Carlo error, taken from the
    run's own ESS (150 NUTS draws: ESS 50-62 measured, not a fixed guess: the draws change with
    the CPU's XLA thread count) and the 500 independent exact draws: mean within 4 standard errors
    σ·sqrt(1/ESS + 1/500) (0.6σ at ESS 50; measured 0.38σ and 0.28σ), std within 4 standard
    errors sqrt(1/(2 ESS) + 1/1000) (±42%; measured ratios 0.93 and 1.00), the errors of a
    Gaussian posterior's sample mean and std.
    Analytic C_ℓ: for a Gaussian field the binned C_ℓ carry all the information, but their
    likelihood is approximated as Gaussian (with the analytic covariance at the fiducial) and
    4 bins lose some of it: mean within 0.5σ, std within [0.7, 1.5] (measured 0.1σ and 0.88
    with the former 120-simulation covariance).
    NPE (npe_cl) is trained only for the stage cache here: see the module docstring."""
    _, _, out, _ = results
    mean_x, std_x, exact = _moments(out, "exact")
    n_x = len(exact.samples)
    mean, std, hmc = _moments(out, "hmc")
    ess = np.array([hmc.info["parameters"][name]["ess"] for name in hmc.names])
    assert np.all(ess > 20), ess  # else the tolerances below are meaningless
    dmean = 4 * np.sqrt(1 / ess + 1 / n_x)
    dstd = 4 * np.sqrt(1 / (2 * ess) + 1 / (2 * n_x))
    assert np.all(np.abs(mean - mean_x) / std_x < dmean), (mean, mean_x, std_x, dmean)
    assert np.all(np.abs(std / std_x - 1) < dstd), (std, std_x, dstd)
    mean, std, _ = _moments(out, "cl_analytic")
    assert np.all(np.abs(mean - mean_x) / std_x < 0.5), (mean, mean_x, std_x)
    assert np.all((std / std_x > 0.7) & (std / std_x < 1.5)), (std, std_x)
    c2st = json.loads((out / "metrics.json").read_text())["c2st"]
    # HMC draws are the same posterior: the classifier cannot do much better than chance
    pair = next(p for p in c2st["pairs"] if {p["a"], p["b"]} == {"exact", "hmc"})
    assert pair["accuracy"] < 0.62


# ---- bad input -----------------------------------------------------------------------------------

def test_observation_of_the_wrong_shape_is_rejected(results, tmp_path):
    d, config, out, _ = results
    other = load_config(config).with_(**{"maps.npix": 8})
    wrong = tmp_path / "wrong.toml"
    wrong.write_text(other.to_toml())
    assert invoke("maps", "--config", wrong, "--out", tmp_path / "obs8.h5",
                  "--no-progress").exit_code == 0
    cfg = load_config(config).with_(**{"compare.observation": str(tmp_path / "obs8.h5")})
    (tmp_path / "c.toml").write_text(cfg.to_toml())
    result = invoke("compare", "--config", tmp_path / "c.toml", "--out", tmp_path / "r")
    assert result.exit_code == 1
    assert "observed maps of shape (2, 8, 8)" in result.output and "(2, 16, 16)" in result.output


def test_unknown_stage_and_method_are_rejected(results, tmp_path):
    _, config, out, _ = results
    result = invoke("compare", "--config", config, "--out", out, "--force", "npe_foo")
    assert result.exit_code == 1 and "unknown stage(s) npe_foo" in result.output
    with pytest.raises(ConfigError, match="compare.methods: unknown method 'hcm'.*did you mean 'hmc'"):
        load_config(config).with_(**{"compare.methods": ["hcm"]})
    with pytest.raises(ConfigError, match="'exact' needs Gaussian-field maps"):
        load_config("quick").with_(**{"compare.methods": ["exact"]})


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="Linux only")
def test_a_failed_background_stage_shows_its_log(tmp_path, capsys):
    """A stage run as a child process that fails raises one error naming the stage, its exit
    status and its log file, and the end of the log is shown (here: the CLI's own line for a
    missing input file)."""
    from experiments.compare import Stage, _Background

    stage = Stage("cl_analytic", (), (), lambda out: None,
                  command=lambda out: ["cl-baseline", "--maps", str(out / "missing.h5"),
                                       "--out", str(out / "x.h5")],
                  collect=lambda out: {})
    job = _Background(tmp_path, stage, lambda wall, extra: "run")
    with pytest.raises(ChildProcessError, match=r"^stage cl_analytic failed in its background "
                                                r"process \(exit 2\); its log: .*cl_analytic\.log$"):
        job.finish()
    err = capsys.readouterr().err
    assert "cl_analytic | " in err and "missing.h5" in err
