"""Output paths, resource bounds, overwrite policy and file errors (the defects of an adversarial
run): every refusal is one line naming the path or option, comes before any work, and leaves no
file behind.

Most cases are refused before anything is simulated, so the file runs in well under a minute;
the two that write a real file use the tiny 16³ simulation of test_cli.
"""

import errno
import os
import stat
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pytest

from experiments import files
from experiments.config import ConfigError, load_config_text

from tests.procs import invoke
from tests.test_cli import TINY, assert_one_line_error


def _listing(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


# ---- 1. outputs that are not regular files ------------------------------------------------------

def test_a_fifo_output_is_refused_and_kept(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    line = assert_one_line_error(invoke("simulate", *TINY, "--out", fifo, "--overwrite"), 1)
    assert str(fifo) in line and "FIFO, not a regular file" in line
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert _listing(tmp_path) == ["pipe"]  # no temporary file either


@pytest.mark.skipif(os.geteuid() != 0, reason="creating a device node needs root")
def test_a_device_output_is_refused_and_kept(tmp_path):
    """A character device made here (the numbers of /dev/null), never a system device."""
    dev = tmp_path / "null"
    os.mknod(dev, 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    with pytest.raises(files.OutputError, match="character device, not a regular file"):
        files.write_text(dev, "x")
    line = assert_one_line_error(invoke("simulate", *TINY, "--out", dev, "--overwrite"), 1)
    assert "character device" in line
    assert stat.S_ISCHR(os.lstat(dev).st_mode)


def test_a_directory_or_socket_output_is_refused(tmp_path):
    import socket

    sock_path = tmp_path / "s"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(sock_path))
        with pytest.raises(files.OutputError, match="socket"):
            files.write_text(sock_path, "x")
    (tmp_path / "d").mkdir()
    with pytest.raises(files.OutputError, match="directory, not a regular file"):
        files.write_text(tmp_path / "d", "x")
    (tmp_path / "f").write_text("keep")
    with pytest.raises(files.OutputError, match="not a directory"):
        files.check_output_dir(tmp_path / "f", option="--out")


def test_a_symlink_is_followed_to_its_regular_file(tmp_path):
    """The policy README states: the link stays, its target is replaced."""
    target = tmp_path / "real.txt"
    target.write_text("old")
    link = tmp_path / "link.txt"
    link.symlink_to(target)
    assert files.write_text(link, "new") == target
    assert link.is_symlink() and target.read_text() == "new"
    # a link to a FIFO is refused like the FIFO
    os.mkfifo(tmp_path / "pipe")
    (tmp_path / "to_pipe").symlink_to(tmp_path / "pipe")
    with pytest.raises(files.OutputError, match="a link to .*pipe.* is a FIFO"):
        files.write_text(tmp_path / "to_pipe", "x")


def test_simulate_through_a_symlink_writes_the_target(tmp_path):
    target = tmp_path / "runs" / "run.h5"
    target.parent.mkdir()
    target.write_text("an old file")
    link = tmp_path / "run.h5"
    link.symlink_to(target)
    result = invoke("simulate", *TINY, "--out", link, "--overwrite", "--no-progress")
    assert result.exit_code == 0, result.output
    assert link.is_symlink()
    with h5py.File(target, "r") as f:
        assert f.attrs["format"] == "lensbench.run"
    assert _listing(target.parent) == ["run.h5"]


# ---- 2. resource bounds --------------------------------------------------------------------------

def test_too_many_steps_is_refused_at_once(tmp_path):
    start = time.perf_counter()
    line = assert_one_line_error(invoke("simulate", *TINY, "--steps", "100000000", "--out",
                                        tmp_path / "x.h5"), 1)
    # in-process (JAX already imported): the refusal itself must be immediate
    assert time.perf_counter() - start < 2.0
    assert "--steps must be <= 10000" in line
    assert not (tmp_path / "x.h5").exists()


@pytest.mark.parametrize("args, option", [
    (["sample", "--posterior", "{d}", "--maps", "{d}/obs.h5", "--out", "{d}/s.h5",
      "--n", "100000000000"], "--n"),
    (["generate", "--n", "1000000000000", "--out", "{d}/sims.h5"], "--n"),
])
def test_counts_beyond_the_limits_are_usage_errors(tmp_path, args, option):
    (tmp_path / "obs.h5").write_text("")
    line = assert_one_line_error(invoke(*[a.format(d=tmp_path) for a in args]), 2)
    assert option in line and "less than or equal to" in line
    assert _listing(tmp_path) == ["obs.h5"]


def test_generate_refuses_a_training_set_larger_than_the_free_space(tmp_path):
    """1e8 simulations of 2 x 64² float32 maps is 3.3 TB: refused with the numbers before the
    file is allocated."""
    cfg = tmp_path / "g.toml"
    cfg.write_text('[simulation]\nkind = "gaussian"\n[maps]\nnpix = 64\n[sources]\nn_bins = 2\n')
    line = assert_one_line_error(invoke("generate", "--config", cfg, "--n", "100000000",
                                        "--out", tmp_path / "sims.h5", "--no-progress"), 1)
    assert "sims.h5 needs about 3.3 TB but its file system" in line and "free" in line
    assert _listing(tmp_path) == ["g.toml"]


def test_ensure_space_names_sizes(tmp_path, monkeypatch):
    monkeypatch.setattr(files.shutil, "disk_usage", lambda p: SimpleNamespace(free=5_000_000))
    with pytest.raises(files.OutputError, match=r"needs about 10.3 MB .* has 5.0 MB free") as e:
        files.ensure_space(tmp_path / "x", 10_000_000)
    assert e.value.errno == errno.ENOSPC
    files.ensure_space(tmp_path / "x", 1000)  # fits


@pytest.mark.parametrize("key, value", [
    ("hmc.num_samples", 10**9), ("npe.n_samples", 10**9), ("npe.noise_copies", 10**6),
    ("training_set.n_sims", 10**12), ("simulation.n_steps", 10**8),
    ("cl_baseline.num_chains", 10**6),
])
def test_configuration_counts_have_limits(key, value):
    section, name = key.split(".")
    with pytest.raises(ConfigError, match=rf"{key}: must be <= \d+ \(lensbench's limit"):
        load_config_text(f"[{section}]\n{name} = {value}\n")


def test_noise_copies_that_cannot_fit_in_memory_are_refused():
    from experiments.pipeline import _check_ram

    with pytest.raises(ValueError, match="npe.noise_copies .* more than this machine's"):
        _check_ram(10**18, "npe.noise_copies = 1000 noisy copies of 10 training maps")
    _check_ram(1000, "a little")


# ---- 3. a full disk --------------------------------------------------------------------------------

@pytest.mark.parametrize("error", [
    OSError(errno.ENOSPC, "No space left on device"),
    OSError(errno.EDQUOT, "Disk quota exceeded"),
    OSError(errno.EROFS, "Read-only file system"),
    OSError(errno.EACCES, "Permission denied"),
    # what h5py raises from a failed flush (the errno only in its text)
    RuntimeError("Can't write data (file write failed: time = ..., errno = 28, error message = "
                 "'No space left on device', buf = 0x1, total write size = 2112)"),
])
def test_write_failures_end_in_one_line_naming_the_file(tmp_path, error):
    old = tmp_path / "x.h5"
    old.write_text("previous")

    def fail(tmp):
        tmp.write_text("partial")
        raise error

    with pytest.raises(files.OutputError) as e:
        files.atomic_write(old, fail)
    message = str(e.value)
    assert message.startswith(f"cannot write {old}: ") and "\n" not in message
    assert old.read_text() == "previous" and _listing(tmp_path) == ["x.h5"]


def test_simulate_on_a_full_disk(tmp_path, monkeypatch):
    """ENOSPC from the write itself (the space check passes, as when another process fills the
    disk meanwhile): one line, exit 1, no temporary file, the old file kept."""
    out = tmp_path / "x.h5"
    out.write_text("previous")

    def no_space(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))

    monkeypatch.setattr(Path, "write_bytes", no_space)
    result = invoke("simulate", *TINY, "--out", out, "--overwrite", "--no-progress")
    assert result.exit_code == 1 and "Traceback" not in result.output
    # the line before it says what is being simulated
    assert result.stderr.splitlines()[-1] == (f"lensbench: error: cannot write {out}: no space "
                                              f"left on device")
    assert out.read_text() == "previous" and _listing(tmp_path) == ["x.h5"]


def test_hdf5_is_written_without_touching_the_disk_until_complete(tmp_path):
    with files.atomic_h5(tmp_path / "a.h5") as f:
        f["x"] = np.arange(5)
        assert _listing(tmp_path) == []
    with h5py.File(tmp_path / "a.h5", "r") as f:
        np.testing.assert_array_equal(f["x"][()], np.arange(5))


# ---- 4. overwrite policy and outputs that are inputs ---------------------------------------------

def test_compress_refuses_to_write_over_its_input(tmp_path):
    obs = tmp_path / "o.h5"
    with h5py.File(obs, "w") as f:
        f.attrs["format"] = "lensbench.maps"
    before = obs.read_bytes()
    (tmp_path / "comp").mkdir()
    for out in (obs, tmp_path / "alias.h5"):
        if out != obs:
            out.symlink_to(obs)  # the same file under another name
        line = assert_one_line_error(invoke("compress", "--compressor", tmp_path / "comp",
                                            "--in", obs, "--out", out, "--overwrite"), 1)
        assert f"is the input --in {obs}" in line
    assert obs.read_bytes() == before


@pytest.mark.parametrize("command", [
    ["simulate", *TINY], ["maps", "--config", "quick"],
    ["compress", "--compressor", "{d}/comp", "--in", "{d}/in.h5"],
    ["sample", "--posterior", "{d}/comp", "--maps", "{d}/in.h5"],
])
def test_an_existing_output_needs_overwrite(tmp_path, command):
    (tmp_path / "comp").mkdir()
    (tmp_path / "in.h5").write_text("")
    out = tmp_path / "out.h5"
    out.write_text("keep me")
    args = [a.format(d=tmp_path) for a in command] + ["--out", out]
    line = assert_one_line_error(invoke(*args), 1)
    assert f"--out {out} exists; pass --overwrite" in line
    assert out.read_text() == "keep me"
    help_text = invoke(command[0], "--help").output
    assert "--overwrite" in help_text and "refused" in help_text


def test_maps_refuses_an_existing_png_before_simulating(tmp_path):
    png = tmp_path / "m.png"
    png.write_bytes(b"")
    line = assert_one_line_error(invoke("maps", "--out", tmp_path / "m.h5", "--png", png), 1)
    assert f"--png {png} exists" in line
    assert _listing(tmp_path) == ["m.png"]


# ---- 5. contradictory options --------------------------------------------------------------------

def test_fit_posterior_refuses_summary_cl_with_a_compressor(tmp_path):
    (tmp_path / "comp").mkdir()
    line = assert_one_line_error(invoke("fit-posterior", "--sims", tmp_path / "s.h5", "--summary",
                                        "cl", "--compressor", tmp_path / "comp", "--out",
                                        tmp_path / "post"), 1)
    assert "--summary cl and --compressor contradict each other" in line
    assert not (tmp_path / "post").exists()


# ---- 6. errors about a file name the file and its kind -------------------------------------------

def test_a_truncated_input_names_the_file_and_its_kind(tmp_path):
    whole = tmp_path / "whole.h5"
    with h5py.File(whole, "w") as f:
        f["kappa"] = np.zeros((3, 64, 64))
    cut = tmp_path / "cut.h5"
    cut.write_bytes(whole.read_bytes()[:4000])
    (tmp_path / "comp").mkdir()
    line = assert_one_line_error(invoke("compress", "--compressor", tmp_path / "comp", "--in", cut,
                                        "--out", tmp_path / "t.h5"), 1)
    assert f"cannot read {cut} as a map file or sims file (HDF5): the file is truncated" in line


def test_a_damaged_compressor_names_the_file(tmp_path):
    import flax.serialization

    from compressors import load_compressor
    from compressors.train import MODEL_JSON, MODEL_PARAMS

    comp = tmp_path / "comp"
    comp.mkdir()
    (comp / MODEL_JSON).write_text('{"config": {"loss": ')
    (comp / MODEL_PARAMS).write_bytes(b"")
    with pytest.raises(ValueError, match=rf"{MODEL_JSON} is not a readable compressor description"):
        load_compressor(comp)
    (comp / MODEL_JSON).write_text('{"config": {}}')
    weights = flax.serialization.msgpack_serialize({"w": np.zeros(100, np.float32)})
    (comp / MODEL_PARAMS).write_bytes(weights[:len(weights) // 2])
    with pytest.raises(ValueError, match=rf"{MODEL_PARAMS} is not readable compressor weights"):
        load_compressor(comp)


def test_a_damaged_posterior_description_names_the_file(tmp_path):
    (tmp_path / "lensbench.json").write_text("{")
    (tmp_path / "in.h5").write_text("")
    line = assert_one_line_error(invoke("sample", "--posterior", tmp_path, "--maps",
                                        tmp_path / "in.h5", "--out", tmp_path / "s.h5"), 1)
    assert "lensbench.json is not a readable posterior description" in line


# ---- 7. validation before any work ---------------------------------------------------------------

def test_hmc_chain_out_of_range_is_refused_before_the_start_field(tmp_path):
    (tmp_path / "obs.h5").write_text("")
    start = time.perf_counter()
    line = assert_one_line_error(invoke("hmc", "--maps", tmp_path / "obs.h5", "--out",
                                        tmp_path / "c", "--chain", "5"), 1)
    assert time.perf_counter() - start < 10  # the start field alone takes ~18 s
    from experiments.config import load_config

    n = load_config("quick").hmc.num_chains  # the command's default config
    assert f"--chain 5: this run has hmc.num_chains = {n}" in line
    assert not (tmp_path / "c").exists()
    line = assert_one_line_error(invoke("hmc", "--maps", tmp_path / "obs.h5", "--out",
                                        tmp_path / "c", "--chain", "0", "--restart"), 1)
    assert "--restart with --chain" in line and "resume=False" not in line


def test_pk_rejects_an_unknown_image_format_before_reading(tmp_path):
    (tmp_path / "run.h5").write_text("not even a run file")
    line = assert_one_line_error(invoke("pk", tmp_path / "run.h5", "--out", tmp_path / "x.xyz"), 1)
    assert "unknown image format '.xyz'" in line
    assert _listing(tmp_path) == ["run.h5"]


def test_warnings_are_one_line(monkeypatch, capsys):
    from experiments import cli

    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)  # restored afterwards
    invoke("--help")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = cli._show_warning
        warnings.warn("3 of 10 simulations\n failed", RuntimeWarning)
    err = capsys.readouterr().err
    assert err == "lensbench: warning: 3 of 10 simulations failed\n"


def test_the_cli_routes_warnings_through_its_format(monkeypatch):
    from experiments import cli

    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)
    invoke("--help")
    assert warnings.showwarning is cli._show_warning


# ---- 8. priors outside the physical range --------------------------------------------------------

@pytest.mark.parametrize("table, words", [
    ('Omega_c = {dist = "uniform", low = -0.5, high = 0.9}', "uniform support [-0.5, 0.9]"),
    ('sigma8 = {dist = "normal", loc = 0.8, scale = 0.5}', "normal(0.8, 0.5) spans"),
    ('h = {dist = "truncated_normal", loc = 0.7, scale = 0.1, low = 0.1}', "[0.1, 1]"),
])
def test_priors_must_lie_in_the_physical_range(table, words):
    with pytest.raises(ConfigError, match=r": prior\.\w+: .*outside the physical range") as e:
        load_config_text(f"[prior]\n{table}\n")
    assert words in str(e.value)


# ---- 9. creating a training set is atomic --------------------------------------------------------

def test_exclusive_creation_is_one_step(tmp_path):
    path = tmp_path / "sims.h5"
    files.atomic_write(path, lambda tmp: tmp.write_text("first"), exclusive=True)
    with pytest.raises(FileExistsError):
        files.atomic_write(path, lambda tmp: tmp.write_text("second"), exclusive=True)
    assert path.read_text() == "first" and _listing(tmp_path) == ["sims.h5"]


def test_generate_resumes_a_file_created_by_a_concurrent_run(tmp_path, monkeypatch):
    """The race: another generate creates the file between this run's check and its creation.
    The loser must resume that file, never replace it."""
    from experiments import dataset
    from experiments.config import load_config
    from experiments.priors import lsst_y10

    cfg = load_config("quick").with_(**{"simulation.kind": "gaussian", "maps.npix": 8,
                                        "sources.n_bins": 1, "scales.ell_max": None})
    prior = lsst_y10().select(["Omega_c", "sigma8"])
    out = tmp_path / "sims.h5"
    real_create = dataset._create

    def racing_create(path, *args):
        real_create(path, *args)  # the other run wins the race...
        with h5py.File(path, "r+") as f:
            f.attrs["winner"] = "other"
        real_create(path, *args)  # ...and this run's own creation must then fail

    monkeypatch.setattr(dataset, "_create", racing_create)
    report = dataset.generate(cfg, prior, 4, out, batch_size=2, progress=False)
    assert report.n_ok == 4
    with h5py.File(out, "r") as f:
        assert f.attrs["winner"] == "other"


def test_maps_refuses_fits_for_flat_maps_before_simulating(tmp_path):
    line = assert_one_line_error(invoke("maps", "--config", "quick", "--out", tmp_path / "m.h5",
                                        "--fits", tmp_path / "m.fits"), 1)
    assert "--fits needs HEALPix maps" in line
    assert _listing(tmp_path) == []


def test_healpix_fits_goes_through_the_atomic_writer(tmp_path):
    """healpy writes the temporary file (no .fits suffix), which then replaces the output."""
    import healpy

    from experiments.io import write_healpix_fits

    rng = np.random.default_rng(0)
    kappa = rng.normal(size=(2, 12 * 4**2))
    maps = SimpleNamespace(kappa=kappa, kappa_noisy=kappa + 1.0)
    out = tmp_path / "m.fits"
    out.write_text("old")
    assert write_healpix_fits(out, maps, SimpleNamespace(n_bins=2)) == out
    back = healpy.read_map(out, field=(0, 1, 2, 3))
    np.testing.assert_array_equal(back[:2], kappa)
    np.testing.assert_array_equal(back[2:], kappa + 1.0)
    assert _listing(tmp_path) == ["m.fits"]
