"""`lensbench hmc` from the command line: chains in separate processes and one run over two
jax.distributed processes equal the sequential one-process run.

Apart from test_cli.py (same helpers) because these two tests are most of the command line's test
time. Both are marked slow (`make test-slow`, not `make test`; tests/conftest.py says what
`make test` keeps): what they test is the child processes themselves (hmc.processes,
--distributed); the sampler's own resume and per-chain equalities are proven in-process (or with
its own lighter workers) in test_explicit.py. The two-process run's equality with the one-process
run of the same device grid is proven here only (test_explicit's two-process workers check their
resume).
"""

import subprocess
import sys

import numpy as np
import pytest

from experiments.io import read_samples
from tests.procs import HANG, cli_env, free_port, invoke, run_cli_subprocess

# one 8² bin over 3 degrees, the two-parameter prior: the maps and posterior of the tiny HMC runs
TINY_SKY = """
[maps]
field_deg = 3.0
npix = 8
[sources]
n_bins = 1
[prior]
params = ["Omega_c", "sigma8"]
"""
HMC_TOML = """
name = "tiny_hmc"
seed = 0
[simulation]
kind = "lpt"
mesh_shape = [16, 16, 32]
box_size = [128.0, 128.0, 512.0]
pdims = "2x1"
halo = 4
""" + TINY_SKY + """
[hmc]
num_warmup = 4
num_samples = 4
max_tree_depth = 3
segment = 4
thin_field = 2
start_steps = 10
"""


GAUSS_HMC_TOML = """
name = "tiny_gauss_hmc"
seed = 0
[simulation]
kind = "gaussian"
n_chi = 16
""" + TINY_SKY + """
[hmc]
num_warmup = 10
num_samples = 10
num_chains = 2
max_tree_depth = 3
segment = 10
start_steps = 10
"""


@pytest.mark.slow
def test_hmc_chains_run_separately_equal_one_run(tmp_path):
    """`lensbench hmc --chain 1` alone finishes its chain and writes no samples.h5; then
    hmc.processes = 2 on the same directory (two child `--chain` processes: chain 1 found
    finished, chain 0 run) gives the draws of the sequential two-chain run exactly (each chain has
    its own key). Off a terminal, the child processes log a progress line per segment. Other
    maps in the same directory are refused."""
    config = tmp_path / "gauss_hmc.toml"
    config.write_text(GAUSS_HMC_TOML)
    maps = tmp_path / "obs.h5"
    assert invoke("maps", "--config", config, "--out", maps, "--no-progress").exit_code == 0
    seq = invoke("hmc", "--config", config, "--maps", maps, "--out", tmp_path / "seq",
                 "--no-progress")
    assert seq.exit_code == 0, seq.output
    part = tmp_path / "par"
    first = invoke("hmc", "--config", config, "--maps", maps, "--out", part, "--no-progress",
                   "--chain", 1)
    assert first.exit_code == 0, first.output
    assert "chain(s) 1 finished" in first.output and not (part / "samples.h5").exists()
    two = tmp_path / "gauss_hmc_2proc.toml"
    two.write_text(GAUSS_HMC_TOML + "processes = 2\n")
    par = invoke("hmc", "--config", two, "--maps", maps, "--out", part)  # progress, not a tty
    assert par.exit_code == 0, par.output
    assert "2 chains in 2 processes" in par.output and "it/s" not in par.output  # no bar
    # the child that ran chain 0 logged a line per segment (20 iterations, segments of 10)
    log = (part / "logs" / "process_0.log").read_text()
    assert "hmc chain 0 warmup" in log and "20/20 iterations" in log, log[-2000:]
    a, b = read_samples(tmp_path / "seq" / "samples.h5"), read_samples(part / "samples.h5")
    np.testing.assert_array_equal(a.samples, b.samples)
    np.testing.assert_array_equal(a.chain, b.chain)
    assert sorted(set(b.chain.tolist())) == [0, 1]
    # the same run directory on another observation is refused, not continued
    other = tmp_path / "obs_seed1.h5"
    assert invoke("maps", "--config", config, "--out", other, "--seed", 1,
                  "--no-progress").exit_code == 0
    wrong = invoke("hmc", "--config", config, "--maps", other, "--out", part, "--no-progress")
    assert wrong.exit_code == 1 and "different observation_sha256" in wrong.output, wrong.output


@pytest.mark.slow
def test_hmc_over_two_processes_equals_one_process(tmp_path):
    """`lensbench hmc --distributed` as two jax.distributed processes (one CPU device each, the
    2x1 grid split over them): the start field, the sampler state and the kept fields are written
    as each process's pieces (never joined), process 0 writes samples.h5, and the draws equal the
    one-process run of the same 2x1 grid. 1e-6: the partitioned programs are the same (bitwise in
    explicit's own two-process test); the margin is for a reordered collective sum in float32.
    Rerun, the processes find the finished run from their own pieces (same start-field hash)."""
    config = tmp_path / "tiny_hmc.toml"
    config.write_text(HMC_TOML)
    maps = tmp_path / "obs.h5"  # in this process: the maps need no device grid of their own
    made = invoke("maps", "--config", config, "--out", maps, "--pdims", "1x1", "--no-progress")
    assert made.exit_code == 0, made.output
    one = run_cli_subprocess("hmc", "--config", config, "--maps", maps, "--out", tmp_path / "one",
                             "--no-progress", cwd=tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]

    def two_processes():
        port = free_port()
        procs = [subprocess.Popen(
            [sys.executable, "-m", "experiments.cli", "hmc", "--config", str(config), "--maps",
             str(maps), "--out", str(tmp_path / "two"), "--no-progress", "--distributed",
             "--coordinator", f"localhost:{port}", "--num-processes", "2", "--process-id", str(i)],
            cwd=tmp_path, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for i in range(2)]
        logs = []
        for p in procs:
            try:
                logs.append(p.communicate(timeout=HANG)[0])
            finally:
                if p.poll() is None:
                    p.kill()
        for p, log in zip(procs, logs):
            assert p.returncode == 0, log[-3000:]
        return logs

    logs = two_processes()
    assert "start field:" in logs[0] and "start field" not in logs[1]  # progress from process 0
    assert "(10 Adam steps" in logs[0]  # hmc.start_steps
    two = tmp_path / "two"
    assert sorted(p.name for p in two.glob("field_start*")) == ["field_start.p0.h5",
                                                                "field_start.p1.h5"]
    assert sorted(p.name for p in (two / "fields").iterdir()) == [
        f"c0_{s:07d}.p{r}.h5" for s in (1, 3) for r in (0, 1)]
    a, b = read_samples(tmp_path / "one" / "samples.h5"), read_samples(two / "samples.h5")
    assert a.samples.shape == (4, 2) and np.ptp(a.samples[:, 0]) > 0  # it moved
    np.testing.assert_allclose(b.samples, a.samples, rtol=0, atol=1e-6)
    first = (two / "samples.h5").stat().st_mtime_ns
    two_processes()  # finished: nothing resampled, samples.h5 rewritten from the chain files
    np.testing.assert_array_equal(read_samples(two / "samples.h5").samples, b.samples)
    assert (two / "samples.h5").stat().st_mtime_ns > first


def test_hmc_provenance_tracks_the_model_not_the_layout():
    """The configuration digest that a resumed HMC run must match changes with the map model
    (PM steps, sources, prior-independent model keys) but not with the device layout, the
    gradient mode, the sampler settings (checked, or allowed, separately) or the true value of an
    inferred parameter."""
    from types import SimpleNamespace

    from experiments.config import load_config
    from experiments.pipeline import _hmc_provenance

    cfg = load_config("quick")
    obs = SimpleNamespace(kappa_noisy=np.zeros((3, 32, 32)))
    base = _hmc_provenance(cfg, obs)
    same = [{"simulation.pdims": "2x1"}, {"simulation.gradient": "adjoint"}, {"hmc.num_samples": 7},
            {"cosmology.sigma8": 0.9}]  # an inferred parameter: its value here is the truth
    for change in same:
        assert _hmc_provenance(cfg.with_(**change), obs) == base, change
    for change in [{"simulation.n_steps": 6}, {"sources.n_bins": 2, "scales.ell_max": None},
                   {"cosmology.Omega_b": 0.05}]:
        other = _hmc_provenance(cfg.with_(**change), obs)
        assert other["model_config_sha256"] != base["model_config_sha256"], change
    moved = _hmc_provenance(cfg, SimpleNamespace(kappa_noisy=np.ones((3, 32, 32))))
    assert moved["observation_sha256"] != base["observation_sha256"]
