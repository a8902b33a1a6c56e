"""The lensbench command line: run files, the P(k) plot, map files, the C_ell plot, the demo, and
one-line errors.

Everything runs on tiny meshes (16³, 2 steps; an LPT lightcone on 16x16x32 cells for the maps) so
the file takes about a minute. Commands run
in-process through typer's CliRunner, except those that need several CPU devices (--pdims): JAX
fixes its device count when its backend starts, so they run in a fresh interpreter.
"""

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pytest

from experiments import cli
from experiments.config import load_config_text
from experiments.io import MAP_ATTRS, MAP_DATASETS, read_maps, read_run, write_run
from experiments.progress import StepProgress, step_callback

from tests.procs import REPO, invoke, run_cli_subprocess

TINY = ["--mesh", "16", "--box", "64", "--steps", "2"]


def assert_one_line_error(result, code=None):
    """Non-zero exit, exactly one 'error:' line on stderr, no traceback anywhere."""
    assert result.exit_code != 0, result.output
    if code is not None:
        assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("lensbench") and "error:" in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def run_file(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "sub" / "run.h5"
    result = invoke("simulate", *TINY, "--seed", "3", "--omega-c", "0.25", "--sigma8", "0.8",
                    "--out", out)
    assert result.exit_code == 0, result.output
    assert "2/2" in result.stderr  # the progress bar reached the last step
    assert f"wrote {out}" in result.stdout
    return out


# ---- simulate ---------------------------------------------------------------------------------

def test_run_file_contents(run_file):
    with h5py.File(run_file, "r") as f:
        assert set(f) == {"density", "positions", "linear"}
        density, positions, linear = f["density"][()], f["positions"][()], f["linear"][()]
        attrs = dict(f.attrs)
    assert density.shape == (16, 16, 16) and density.dtype == np.float32
    assert positions.shape == (16**3, 3) and positions.dtype == np.float32
    assert linear.shape == (16, 16, 16) and linear.dtype == np.float32
    assert abs(float(density.mean(dtype=np.float64)) - 1.0) < 1e-5
    assert density.min() >= 0
    assert positions.min() >= 0 and positions.max() <= 64.0
    assert np.all(np.isfinite(linear)) and linear.std() > 0

    assert attrs["format"] == "lensbench.run" and attrs["format_version"] == 1
    assert attrs["Omega_c"] == 0.25 and attrs["sigma8"] == 0.8
    assert attrs["Omega_b"] == pytest.approx(0.0492)  # fiducial default
    assert attrs["w0"] == -1.0 and attrs["wa"] == 0.0
    assert list(attrs["mesh_shape"]) == [16, 16, 16]
    assert list(attrs["box_size"]) == [64.0, 64.0, 64.0]
    assert attrs["n_steps"] == 2 and attrs["a_init"] == 0.1 and attrs["a_final"] == 1.0
    assert attrs["lpt_order"] == 2 and attrs["mesh_factor"] == 1 and attrs["dtype"] == "float32"
    assert list(attrs["pdims"]) == [1, 1] and attrs["halo"] == 8
    assert attrs["seed"] == 3 and attrs["ic_file"] == ""
    for value in attrs.values():  # JSON-friendly: numbers, strings, short numeric arrays
        assert isinstance(value, (str, np.number, np.bool_, np.ndarray, int, float))

    run = read_run(run_file)
    assert run.config["mesh_shape"] == [16, 16, 16] and run.box_size == (64.0, 64.0, 64.0)
    assert run.cosmology().Omega_c == 0.25
    assert sorted(p.name for p in run_file.parent.iterdir()) == ["run.h5"]  # no temp file left


def test_ic_round_trip_non_cubic(tmp_path):
    """--ic with a .npy linear field: the run file's `linear` is that field; 'NxNxN' mesh/box."""
    rng = np.random.default_rng(0)
    field = (0.2 * rng.standard_normal((8, 8, 16))).astype(np.float32)
    np.save(tmp_path / "lin.npy", field)
    out = tmp_path / "run.h5"
    result = invoke("simulate", "--mesh", "8x8x16", "--box", "32x32x64", "--steps", "1",
                    "--ic", tmp_path / "lin.npy", "--no-progress", "--out", out)
    assert result.exit_code == 0, result.output
    run = read_run(out)
    np.testing.assert_array_equal(run.linear, field)
    assert run.density.shape == (8, 8, 16) and run.positions.shape == (8 * 8 * 16, 3)
    assert run.attrs["ic_file"] == str(tmp_path / "lin.npy") and run.attrs["seed"] == -1
    assert list(run.attrs["box_size"]) == [32.0, 32.0, 64.0]


def test_failed_write_leaves_no_file(tmp_path):
    from simulators import Cosmology, SimConfig

    cfg = SimConfig(mesh_shape=4, box_size=8.0)
    broken = SimpleNamespace(cfg=cfg, density=np.ones((4, 4, 4)), positions=np.zeros(7),
                             linear=np.zeros((4, 4, 4)), max_displacement=0.0)
    target = tmp_path / "run.h5"
    target.write_text("previous run")
    with pytest.raises(ValueError):  # positions cannot be reshaped to (N, 3)
        write_run(target, broken, Cosmology.fiducial(), seed=0)
    assert target.read_text() == "previous run"
    assert [p.name for p in tmp_path.iterdir()] == ["run.h5"]


# ---- maps and cl --------------------------------------------------------------------------------

TINY_TOML = """
name = "tiny"
seed = 0
[simulation]
kind = "lpt"                 # no N-body steps: fast
mesh_shape = [16, 16, 32]
box_size = [128.0, 128.0, 512.0]
n_steps = 4
[maps]
field_deg = 3.0
npix = 32
[sources]
n_bins = 2
[cl]
n_ell_bins = 6
"""


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory):
    path = tmp_path_factory.mktemp("config") / "tiny.toml"
    path.write_text(TINY_TOML)
    return path


@pytest.fixture(scope="module")
def maps_file(tiny_config, tmp_path_factory):
    out = tmp_path_factory.mktemp("maps") / "maps.h5"
    png = out.with_name("maps.png")
    result = invoke("maps", "--config", tiny_config, "--seed", "5", "--out", out, "--png", png)
    assert result.exit_code == 0, result.output
    assert f"wrote {out}" in result.stdout and f"wrote {png}" in result.stdout
    assert "2 tomographic bins" in result.stderr and "seed 5" in result.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return out


def test_map_file_contents(maps_file):
    with h5py.File(maps_file, "r") as f:
        assert set(f) == set(MAP_DATASETS)
        assert set(MAP_ATTRS) <= set(f.attrs)
        kappa, noisy = f["kappa"][()], f["kappa_noisy"][()]
        nz, z, sigma_n = f["nz"][()], f["z"][()], f["sigma_n"][()]
        attrs = dict(f.attrs)
    assert kappa.shape == noisy.shape == (2, 32, 32)
    assert nz.shape == (2, z.shape[0]) and sigma_n.shape == (2,)
    for a in (kappa, noisy, nz, z, sigma_n):
        assert np.all(np.isfinite(a))
    assert np.all(kappa.std(axis=(1, 2)) > 1e-4)
    assert kappa[1].std() > kappa[0].std()  # more lensing for the farther sources
    np.testing.assert_allclose((noisy - kappa).std(axis=(1, 2)), sigma_n, rtol=0.1)
    np.testing.assert_allclose(np.trapezoid(nz, z, axis=1), 1.0, atol=1e-6)

    assert attrs["format"] == "lensbench.maps" and attrs["seed"] == 5 and attrs["name"] == "tiny"
    assert attrs["sky"] == "flat" and attrs["field_deg"] == 3.0 and attrs["npix"] == 32
    assert attrs["kind"] == "lpt" and attrs["Omega_c"] == pytest.approx(0.2664)
    assert attrs["chi_max"] == pytest.approx(4939, rel=1e-3)  # z = 4, fiducial
    assert list(attrs["observer"]) == [64.0, 64.0, 0.0]
    cfg = load_config_text(attrs["config_toml"])
    assert cfg.seed == 5 and cfg.simulation.mesh_shape == (16, 16, 32)  # the seed used
    data = read_maps(maps_file)
    assert data.config() == cfg and data.bins().n_bins == 2
    assert sorted(p.name for p in maps_file.parent.iterdir()) == ["maps.h5", "maps.png"]


@pytest.mark.parametrize("noisy", [False, True])
def test_cl_writes_png_and_numbers(maps_file, tmp_path, noisy):
    png = tmp_path / "cl.png"
    result = invoke("cl", maps_file, "--out", png, "--noisy" if noisy else "--no-noisy")
    assert result.exit_code == 0, result.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"wrote {png} and {png.with_suffix('.npz')}" in result.stdout
    out = np.load(png.with_suffix(".npz"))
    assert {"ell", "cl", "theory", "n_modes", "pairs", "ell_edges", "noise"} <= set(out.files)
    assert out["pairs"].tolist() == [[0, 0], [0, 1], [1, 1]]
    assert out["cl"].shape == out["theory"].shape == (3, 6) and out["ell"].shape == (6,)
    assert out["ell_edges"].shape == (7,) and out["n_modes"].shape == (6,)
    filled = out["n_modes"] > 0
    assert filled.sum() >= 5
    for name in ("cl", "theory"):
        assert np.all(np.isfinite(out[name][:, filled]))
    assert np.all(out["theory"][[0, 2]][:, filled] > 0)  # auto-spectra
    a_pix = np.radians(3.0 / 32) ** 2
    sigma_n = read_maps(maps_file).sigma_n
    if noisy:  # theory includes the white noise power on the auto-spectra, and the maps show it
        np.testing.assert_allclose(out["noise"], [sigma_n[0] ** 2 * a_pix, 0, sigma_n[1] ** 2 * a_pix])
        np.testing.assert_allclose((out["theory"] - out["theory_signal"])[:, filled],
                                   np.broadcast_to(out["noise"][:, None], (3, filled.sum())))
        last = np.flatnonzero(filled)[-1]  # many modes, noise dominated in bin 1
        assert 0.7 < out["cl"][0, last] / out["theory"][0, last] < 1.3
    else:
        np.testing.assert_array_equal(out["noise"], 0)
        # on the scales the tiny mesh resolves (the mesh-window theory vanishes beyond them)
        assert np.all(out["cl"][0, filled][:2] < out["theory"][0, filled][:2] * 3)


def test_cl_healpix(tmp_path, tiny_config):
    """HEALPix map files go through the full-sky estimator; theory binned with 2l+1 weights."""
    import healpy

    from experiments.config import load_config
    from experiments.io import write_maps

    cfg = load_config(tiny_config).with_(**{"maps.sky": "healpix", "maps.nside": 16,
                                            "maps.field_deg": None, "maps.npix": None})
    bins = cfg.bins()
    ell = np.arange(3 * 16)
    inputs = 1e-9 * (ell + 1.0) ** -1.0
    rng_seed = 3
    np.random.seed(rng_seed)
    kappa = np.stack([healpy.synfast(inputs * (b + 1), 16) for b in range(2)])
    sigma_n = np.full(2, 1e-3)
    maps = SimpleNamespace(kappa=kappa, kappa_noisy=kappa, sigma_n=sigma_n)
    path = write_maps(tmp_path / "hp.h5", maps, cfg, bins)
    result = invoke("cl", path, "--out", tmp_path / "hp.png")
    assert result.exit_code == 0, result.output
    out = np.load(tmp_path / "hp.npz")
    edges = out["ell_edges"]
    assert edges[0] == 2.0 and edges[-1] == 32.0 and out["cl"].shape == (3, 6)
    assert out["n_modes"].sum() == sum(2 * l + 1 for l in range(2, 32))
    expected = [np.sum((2 * ell[(ell >= lo) & (ell < hi)] + 1) * inputs[(ell >= lo) & (ell < hi)])
                / np.sum(2 * ell[(ell >= lo) & (ell < hi)] + 1) for lo, hi in zip(edges[:-1], edges[1:])]
    np.testing.assert_allclose(out["cl"][0], expected, rtol=0.6)  # few modes per bin
    assert np.all(out["cl"][2] > out["cl"][0])
    assert np.all(np.isfinite(out["theory"])) and np.all(out["theory"][[0, 2]] > 0)


def test_cl_of_gaussian_maps_matches_theory(tmp_path, tiny_config):
    """Gaussian maps drawn from the Limber C_ell come back at the theory, through maps and cl."""
    cfg = tiny_config.parent / "gaussian.toml"
    cfg.write_text(TINY_TOML.replace('kind = "lpt"', 'kind = "gaussian"'))
    assert invoke("maps", "--config", cfg, "--out", tmp_path / "g.h5").exit_code == 0
    for noisy in ("--no-noisy", "--noisy"):
        result = invoke("cl", tmp_path / "g.h5", "--out", tmp_path / "g.png", noisy)
        assert result.exit_code == 0, result.output
        out = np.load(tmp_path / "g.npz")
        many = out["n_modes"] >= 20
        ratio = out["cl"][:, many] / out["theory"][:, many]
        assert np.all(np.abs(ratio[[0, 2]].mean(axis=1) - 1) < 0.2), ratio  # auto-spectra


def test_cl_default_output_name(maps_file):
    result = invoke("cl", maps_file)
    assert result.exit_code == 0, result.output
    for suffix in (".png", ".npz"):
        path = maps_file.parent / f"maps_cl{suffix}"
        assert path.is_file()
        path.unlink()


def test_maps_and_cl_errors(tiny_config, maps_file, tmp_path, run_file):
    bad = tmp_path / "bad.toml"
    bad.write_text(TINY_TOML.replace("field_deg = 3.0", "field_deg = -1"))
    out = tmp_path / "m.h5"
    line = assert_one_line_error(invoke("maps", "--config", bad, "--out", out), 1)
    assert f"{bad}: maps.field_deg: must be > 0, got -1" in line
    line = assert_one_line_error(invoke("maps", "--config", "quik", "--out", out), 1)
    assert "not a shipped config" in line and "did you mean 'quick'" in line
    bad.write_text(TINY_TOML + "frobnicate = 1\n")  # lands in [cl]
    line = assert_one_line_error(invoke("maps", "--config", bad, "--out", out), 1)
    assert "cl.frobnicate: unknown key" in line
    line = assert_one_line_error(invoke("maps", "--config", tiny_config, "--pdims", "3x3",
                                        "--out", out), 1)  # caught before any device is made
    assert "simulation.pdims: mesh_shape [16, 16, 32] is not divisible by the device grid 3x3" in line
    line = assert_one_line_error(invoke("maps", "--config", tiny_config, "--pdims", "two",
                                        "--out", out), 2)
    assert "device grid must look like 2x2" in line
    assert not out.exists()
    line = assert_one_line_error(invoke("cl", run_file, "--out", tmp_path / "c.png"), 1)
    assert "is a run file (lensbench simulate), not a map file" in line
    line = assert_one_line_error(invoke("cl", tmp_path / "missing.h5"), 2)
    assert "does not exist" in line
    line = assert_one_line_error(invoke("maps", "--config", tiny_config), 2)
    assert "Missing option '--out'" in line


def test_maps_pdims_matches_one_device(tmp_path, tiny_config, maps_file, monkeypatch):
    """maps --pdims 2x1 makes two CPU devices in a fresh interpreter; same seed, same maps."""
    monkeypatch.delenv("TF_CPP_MIN_LOG_LEVEL", raising=False)  # set by importing jax here
    out = tmp_path / "sharded.h5"
    proc = run_cli_subprocess("maps", "--config", tiny_config, "--seed", "5", "--pdims", "2x1",
                              "--out", out, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and "GSPMD" not in proc.stderr
    sharded, single = read_maps(out), read_maps(maps_file)
    assert sharded.config().simulation.pdims == "2x1"
    np.testing.assert_allclose(sharded.kappa, single.kappa, atol=1e-6)
    np.testing.assert_allclose(sharded.kappa_noisy, single.kappa_noisy, atol=1e-6)


# ---- pk and demo ------------------------------------------------------------------------------

def test_pk_writes_png(run_file, tmp_path):
    png = tmp_path / "plots" / "pk.png"
    result = invoke("pk", run_file, "--out", png, "--n-bins", "6")
    assert result.exit_code == 0, result.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "P_lin" in result.stdout
    rows = [line.split() for line in result.stdout.splitlines()[1:] if line[:1] == " "]
    assert 2 <= len(rows) <= 6
    ratios = np.array([float(r[3]) for r in rows])
    assert np.all((ratios > 0.2) & (ratios < 5))  # P(k) is near linear theory, not garbage


def test_pk_default_output_name(run_file):
    result = invoke("pk", run_file)
    assert result.exit_code == 0, result.output
    assert (run_file.parent / "run_pk.png").is_file()
    (run_file.parent / "run_pk.png").unlink()


def test_demo_runs_compare_and_says_where_the_report_is(tmp_path, monkeypatch):
    """`lensbench demo` is `compare` on DEMO_MAPS_CONFIG; here a tiny Gaussian-field config with
    the exact method only (test_compare runs every method)."""
    from experiments.config import load_config

    cfg = load_config("gaussian_check").with_(**{
        "maps.npix": 8, "simulation.n_chi": 16, "cl.n_ell_bins": 2, "cl.ell_max": 410.0,
        "compare.methods": ["exact"],
        "npe.n_samples": 500})
    (tmp_path / "tiny.toml").write_text(cfg.to_toml())
    monkeypatch.setattr(cli, "DEMO_MAPS_CONFIG", str(tmp_path / "tiny.toml"))
    result = invoke("demo", "--out-dir", tmp_path / "out")
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    for name in ("observation.h5", "samples/exact.h5", "metrics.json", "report.md",
                 "figures/contours.png", "figures/maps.png"):
        assert (out / name).is_file(), name
    assert "demo done" in result.stdout and str(out / "report.md") in result.stdout
    assert "exact" in result.stdout and "FoM" in result.stdout


def test_demo_configuration_is_the_documented_one():
    assert cli.DEMO["mesh"] == "64" and cli.DEMO["box"] == "256"
    assert cli.DEMO["steps"] == 10 and cli.DEMO["seed"] == 0 and cli.DEMO["pdims"] == "1x1"
    assert cli.DEMO_MAPS_CONFIG == "quick"


# ---- bad input ----------------------------------------------------------------------------------

@pytest.fixture
def bad_files(tmp_path):
    np.save(tmp_path / "wrong_shape.npy", np.zeros((4, 4, 4), np.float32))
    nan = np.zeros((16, 16, 16), np.float32)
    nan[1, 2, 3] = np.nan
    np.save(tmp_path / "nan.npy", nan)
    (tmp_path / "garbage.npy").write_text("not an array")
    (tmp_path / "notes.h5").write_text("not hdf5")
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["x"] = np.zeros(3)
    return tmp_path


@pytest.mark.parametrize("args, code, message", [
    (["simulate", *TINY, "--box", "-64"], 1, "box_size must be positive"),
    (["simulate", *TINY, "--box", "big"], 2, "--box must be one number or three"),
    (["simulate", *TINY, "--mesh", "16x16"], 2, "--mesh must be one number or three"),
    (["simulate", *TINY, "--frobnicate"], 2, "No such option"),
    (["simulate", *TINY, "--omega-c", "-0.1"], 1, "Omega_c must be > 0"),
    (["simulate", *TINY, "--omega-c", "0.9", "--omega-b", "0.2"], 1, "Omega_m"),
    (["simulate", *TINY, "--steps", "0"], 1, "n_steps must be >= 1"),
    (["simulate", *TINY, "--lpt-order", "3"], 1, "lpt_order"),
    (["simulate", *TINY, "--mesh-factor", "3"], 1, "divisible by mesh_factor"),
    (["simulate", *TINY, "--dtype", "float16"], 1, "dtype"),
    (["simulate", *TINY, "--a-init", "0"], 1, "a_init"),
    (["simulate", *TINY, "--pdims", "two"], 2, "device grid must look like 2x2"),
    (["simulate", *TINY, "--seed", str(2**64)], 2, "--seed"),
    (["simulate", *TINY, "--ic", "{d}/missing.npy"], 1, "does not exist"),
    (["simulate", *TINY, "--ic", "{d}/garbage.npy"], 1, "is not a .npy file"),
    (["simulate", *TINY, "--ic", "{d}/wrong_shape.npy"], 1, "linear field has shape (4, 4, 4)"),
    (["simulate", *TINY, "--ic", "{d}/nan.npy"], 1, "NaN"),
    (["simulate", *TINY, "--ic", "{d}/notes.h5"], 1, "cannot read"),
    (["simulate", *TINY], 2, "Missing option '--out'"),
    (["pk", "{d}/missing.h5"], 2, "does not exist"),
    (["pk", "{d}/notes.h5"], 1, "cannot read"),
    (["pk", "{d}/other.h5"], 1, "not a lensbench run file"),
    (["pk", "{d}/other.h5", "--n-bins", "0"], 2, "--n-bins"),
    (["bogus"], 2, "No such command"),
    # --set reaches the configuration, and a malformed one is named
    (["compare", "--out", "{d}/r", "--set", "compare.methods=['hcm']"], 1, "unknown method 'hcm'"),
    (["compare", "--out", "{d}/r", "--set", "hmc"], 1, "--set 'hmc': expected KEY=VALUE"),
    (["hmc", "--maps", "{d}/notes.h5", "--out", "{d}/c", "--set", "hmc.num_chains=0"], 1,
     "hmc.num_chains"),
])
def test_bad_input_one_line_error(bad_files, args, code, message):
    args = [a.format(d=bad_files) for a in args]
    if args[0] == "simulate" and "--out" not in args and "Missing" not in message:
        args += ["--out", str(bad_files / "out.h5")]
    result = invoke(*args)
    line = assert_one_line_error(result, code)
    assert message in line
    assert not (bad_files / "out.h5").exists()


# ---- several devices (fresh interpreter) --------------------------------------------------------

def test_pdims_creates_cpu_devices(tmp_path, run_file):
    """--pdims 2x2 on CPU makes 4 host devices; same seed gives the same run as one device."""
    out = tmp_path / "sharded.h5"
    proc = run_cli_subprocess("simulate", *TINY, "--seed", "3", "--omega-c", "0.25",
                              "--sigma8", "0.8", "--pdims", "2x2", "--halo", "6", "--no-progress",
                              "--out", out, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    sharded, single = read_run(out), read_run(run_file)
    assert list(sharded.attrs["pdims"]) == [2, 2]
    assert 0 < sharded.attrs["max_displacement_cells"] <= 5
    np.testing.assert_allclose(sharded.linear, single.linear, atol=1e-5)
    np.testing.assert_allclose(sharded.density, single.density, atol=1e-3)


def test_pdims_not_dividing_the_mesh_is_one_line(tmp_path):
    proc = run_cli_subprocess("simulate", *TINY, "--pdims", "3x3", "--out", tmp_path / "x.h5",
                              cwd=tmp_path)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "not divisible by the device grid 3x3" in lines[0], proc.stderr
    assert not (tmp_path / "x.h5").exists()


# ---- progress helper ----------------------------------------------------------------------------

def test_step_progress_tracks_callback(tmp_path):
    step_callback(np.int64(3))  # no bar open: ignored
    with open(tmp_path / "bar.txt", "w") as f, StepProgress(4, file=f) as bar:
        for i in (1, 2, 2, 4, 9):  # repeats and overshoots are tolerated
            step_callback(np.int64(i))
        assert bar.done == 4
    assert "4/4" in (tmp_path / "bar.txt").read_text()
    with StepProgress(2, enabled=False) as quiet:
        step_callback(1)
        assert quiet.done == 1


def test_healpix_fits_round_trip(tmp_path):
    """HEALPix maps written with healpy read back equal, noise-free columns first; flat maps are
    refused with a message naming the problem."""
    import healpy

    from experiments.io import write_healpix_fits

    rng = np.random.default_rng(0)
    kappa = rng.normal(size=(2, 12 * 8**2))
    maps = SimpleNamespace(kappa=kappa, kappa_noisy=kappa + 0.1)
    path = write_healpix_fits(tmp_path / "k.fits", maps, SimpleNamespace(n_bins=2))
    back = healpy.read_map(str(path), field=None, dtype=np.float64)
    np.testing.assert_array_equal(back[:2], kappa)
    np.testing.assert_array_equal(back[2:], kappa + 0.1)
    with pytest.raises(ValueError, match="needs HEALPix maps"):
        write_healpix_fits(tmp_path / "f.fits", SimpleNamespace(kappa=np.zeros((2, 4, 4)),
                                                                 kappa_noisy=np.zeros((2, 4, 4))),
                           SimpleNamespace(n_bins=2))


@pytest.mark.parametrize("kind", ["gaussian", "lognormal"])
def test_maps_from_random_field_models(tmp_path, kind):
    """The field-only map models (no simulation box) go through `maps` and `cl` too."""
    config = tmp_path / f"{kind}.toml"
    config.write_text(f'name = "{kind}"\n[simulation]\nkind = "{kind}"\n[maps]\nsky = "flat"\n'
                      'field_deg = 5.0\nnpix = 32\n[sources]\npreset = "lsst_y10"\nn_bins = 2\n')
    out = tmp_path / "m.h5"
    result = invoke("maps", "--config", config, "--out", out)
    assert result.exit_code == 0, result.output
    data = read_maps(out)
    assert data.kappa.shape == (2, 32, 32) and data.attrs["kind"] == kind
    assert np.all(np.isfinite(data.kappa)) and np.std(data.kappa) > 0
    result = invoke("cl", out, "--out", tmp_path / "c.png")
    assert result.exit_code == 0, result.output


def _cache_probe(tmp_path, code: str, **env_extra) -> str:
    """stdout of ``code`` run in a fresh interpreter after the CLI's cache set-up, with no
    JAX_COMPILATION_CACHE_* of this session and XDG_CACHE_HOME under tmp_path."""
    probe = ("import os, sys; from experiments.cli import _use_compilation_cache as u; u(); "
             + code)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("JAX_COMPILATION_CACHE", "JAX_PERSISTENT_CACHE"))}
    env.update(XDG_CACHE_HOME=str(tmp_path / "xdg"), PYTHONPATH=str(REPO), **env_extra)
    return subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True,
                          check=True).stdout


def test_commands_use_a_persistent_compilation_cache(tmp_path):
    """Without JAX_COMPILATION_CACHE_DIR, a command points JAX's cache at
    $XDG_CACHE_HOME/lensbench/xla/<machine>-<hash> (created, 4 GiB limit); a directory the user
    chose is kept. Every program is kept (minimum compile time 0) unless the user set a minimum.
    Run in a fresh interpreter: this session already set its own cache."""
    probe = ("print(os.environ.get('JAX_COMPILATION_CACHE_DIR')); "
             "print(os.environ.get('JAX_COMPILATION_CACHE_MAX_SIZE')); "
             "print(os.environ.get('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'))")
    out = _cache_probe(tmp_path, probe).split()
    path = Path(out[0])
    assert path.parent == tmp_path / "xdg" / "lensbench" / "xla" and path.is_dir()
    assert int(out[1]) == 4 << 30 and out[2] == "0"
    out = _cache_probe(tmp_path, probe, JAX_COMPILATION_CACHE_DIR=str(tmp_path / "mine")).split()
    assert out == [str(tmp_path / "mine"), "None", "0"]
    out = _cache_probe(tmp_path, probe, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="2").split()
    assert out[2] == "2"


def test_commands_compile_with_the_legacy_cpu_emitters(tmp_path):
    """Every command adds jaxsetup.CPU_EMITTER_FLAG to XLA_FLAGS, after the flags already there;
    flags that choose the emitters themselves are left as they are (fresh interpreters: this
    session set its own flags)."""
    from experiments.jaxsetup import CPU_EMITTER_FLAG

    def flags(**env_extra):
        code = ("import os; from experiments.cli import _use_legacy_cpu_emitters as u; u(); "
                "print(os.environ['XLA_FLAGS'])")
        env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
        env.update(PYTHONPATH=str(REPO), **env_extra)
        return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                              text=True, check=True).stdout.strip()

    assert flags() == CPU_EMITTER_FLAG == "--xla_cpu_use_fusion_emitters=false"
    devices = "--xla_force_host_platform_device_count=4"
    assert flags(XLA_FLAGS=devices) == f"{devices} {CPU_EMITTER_FLAG}"
    mine = "--xla_cpu_use_fusion_emitters=true"
    assert flags(XLA_FLAGS=mine) == mine


def test_compilation_cache_is_named_by_the_simulators_cpu_signature(tmp_path):
    """The cache directory is named by simulators.cpu.cpu_signature (the signature the compiled
    CIC kernels are keyed by too), found without importing JAX or simulators."""
    from simulators.cpu import cpu_signature

    probe = ("print(os.environ['JAX_COMPILATION_CACHE_DIR']); "
             "print(sorted(m for m in ('jax', 'simulators') if m in sys.modules))")
    out = _cache_probe(tmp_path, probe).splitlines()
    assert Path(out[0]).name == cpu_signature() and out[1] == "[]"
