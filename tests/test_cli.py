"""The lensbench command line: run files, the P(k) plot, the demo, and one-line errors.

Everything runs on tiny meshes (16³, 2 steps) so the file takes well under a minute. Commands run
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
from typer.testing import CliRunner

from experiments import cli
from experiments.io import read_run, write_run
from experiments.progress import StepProgress, step_callback

REPO = Path(__file__).resolve().parents[1]
TINY = ["--mesh", "16", "--box", "64", "--steps", "2"]
runner = CliRunner()


def invoke(*args):
    return runner.invoke(cli.app, [str(a) for a in args])


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


def test_demo_writes_both_files(tmp_path, monkeypatch):
    # the real demo is 64³ x 10 steps (`make demo`); here the embedded configuration is shrunk
    monkeypatch.setitem(cli.DEMO, "mesh", "16")
    monkeypatch.setitem(cli.DEMO, "box", "64")
    monkeypatch.setitem(cli.DEMO, "steps", 2)
    result = invoke("demo", "--out-dir", tmp_path / "out", "--no-progress")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "run.h5").is_file() and (tmp_path / "out" / "pk.png").is_file()
    assert "demo done" in result.stdout


def test_demo_configuration_is_the_documented_one():
    assert cli.DEMO["mesh"] == "64" and cli.DEMO["box"] == "256"
    assert cli.DEMO["steps"] == 10 and cli.DEMO["seed"] == 0 and cli.DEMO["pdims"] == "1x1"


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

def run_cli_subprocess(*args, cwd):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return subprocess.run([sys.executable, "-m", "experiments.cli", *map(str, args)], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=300)


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
