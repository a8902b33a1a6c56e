"""Training-set generation (experiments.dataset): determinism, kill and resume, failed simulations,
data parallelism over devices, the PM path, the errors, and training sets made of parts
(generate --part I/N, merge).

Most cases use the Gaussian map model on 16² pixels, 2 bins and a 2-parameter prior (10
simulations): compiling the batched simulator (~5–10 s per batch size and model) dominates. Runs
that need a killed process or two CPU devices go through a fresh interpreter.
"""

import json
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pytest

from experiments.config import load_config, load_config_text
from experiments.dataset import (CHUNK_DELAY_ENV, FORMAT, PART_ATTRS, SIMS_ATTRS, generate,
                                 merge_parts, prior_from_file, read_sims)
from experiments.files import OutputError
from experiments.priors import lsst_y10

from tests.procs import HANG, cli_env, invoke, xla_flags
GAUSS = {"simulation.kind": "gaussian", "maps.npix": 16, "sources.n_bins": 2,
         "scales.ell_max": None}  # quick's validated range is for its own 3 bins
CFG = load_config("quick").with_(**GAUSS)
PRIOR = lsst_y10().select(["Omega_c", "sigma8"])
N = 10  # batch 2: 5 chunks; batch 4: 3 chunks, the last one padded


def data(path):
    with h5py.File(path, "r", locking=False) as f:
        return {k: f[k][()] for k in ("theta", "kappa", "status")}


def assert_same_data(a, b):
    """Bitwise: θ and latents come from per-index keys, and the per-simulation arithmetic does not
    depend on the batch it runs in."""
    da, db = data(a), data(b)
    for k in da:
        np.testing.assert_array_equal(da[k], db[k], err_msg=k)


def child_env(**extra):
    env = cli_env()
    env.update(extra)
    return env


CHILD = """
import json, sys
{prelude}
from experiments.config import load_config
from experiments.dataset import generate
from experiments.priors import lsst_y10
cfg = load_config("quick").with_(**{gauss!r})
r = generate(cfg, lsst_y10().select(["Omega_c", "sigma8"]), {n}, sys.argv[1], batch_size={batch},
             progress=False)
print(json.dumps({{"n_devices": r.n_devices, "n_ok": r.n_ok, "mode": r.mode}}))
"""


def child_script(batch, prelude=""):
    return CHILD.format(prelude=prelude, gauss=GAUSS, n=N, batch=batch)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    path = tmp_path_factory.mktemp("ref") / "sims.h5"
    report = generate(CFG, PRIOR, N, path, batch_size=2, progress=False)
    return path, report


# ---- contents and determinism -------------------------------------------------------------------

def test_file_contents_and_reader(reference):
    from simulators.lensing import noise_sigma

    path, report = reference
    assert (report.n_requested, report.n_ok, report.n_failed, report.n_resumed,
            report.n_simulated, report.n_pending) == (N, N, 0, 0, N, 0)
    assert report.batch_size == 2 and report.mode == "data-parallel" and report.sims_per_s > 0
    with h5py.File(path, "r") as f:
        attrs = dict(f.attrs)
        assert f["kappa"].dtype == np.float32 and f["kappa"].chunks == (1, 2, 16, 16)
        assert f["theta"].dtype == np.float64 and f["status"].dtype == np.int8
    assert set(SIMS_ATTRS) <= set(attrs)
    assert attrs["format"] == FORMAT and attrs["n"] == N and attrs["seed"] == CFG.seed == 0
    assert list(attrs["param_names"]) == ["Omega_c", "sigma8"] and attrs["batch_size"] == 2
    assert attrs["sky"] == "flat" and attrs["npix"] == 16 and attrs["kind"] == "gaussian"
    np.testing.assert_allclose(attrs["sigma_n"], noise_sigma(CFG.bins(), CFG.sky()))
    assert load_config_text(attrs["config_toml"]).maps.npix == 16
    assert prior_from_file(path) == PRIOR

    d = data(path)
    assert np.all(d["status"] == 1)
    sims = read_sims(path)
    assert len(sims) == N and sims.n_failed == 0 and sims.n_pending == 0
    np.testing.assert_array_equal(sims.indices, np.arange(N))
    np.testing.assert_array_equal(sims.theta, d["theta"])
    np.testing.assert_array_equal(sims.kappa, d["kappa"])
    assert sims.names == ("Omega_c", "sigma8") and sims.build_prior() == PRIOR
    assert sims.config().simulation.kind == "gaussian"
    np.testing.assert_array_equal(sims.sigma_n, attrs["sigma_n"])
    # draws from the prior (Omega_c > 0: truncated), all different; maps finite and varied
    assert np.all(sims.theta[:, 0] > 0) and len(np.unique(sims.theta[:, 1])) == N
    assert np.all(np.isfinite(sims.kappa)) and np.all(sims.kappa.std(axis=(1, 2, 3)) > 1e-4)
    assert not np.allclose(sims.kappa[0], sims.kappa[1])


def test_same_seed_same_file_for_any_batch_size(reference, tmp_path):
    ref, _ = reference
    report = generate(CFG, PRIOR, N, tmp_path / "b4.h5", batch_size=4, progress=False)
    assert report.n_ok == N and report.batch_size == 4
    assert_same_data(tmp_path / "b4.h5", ref)
    # another seed gives other simulations (the seed reaches both θ and the latent field)
    generate(CFG, PRIOR, N, tmp_path / "seed1.h5", batch_size=2, seed=1, progress=False)
    other, base = data(tmp_path / "seed1.h5"), data(ref)
    assert not np.any(other["theta"] == base["theta"])
    assert not np.any(other["kappa"] == base["kappa"])


def test_kill_and_resume(reference, tmp_path):
    """SIGKILL a run after 2 of its 5 chunks are on disk; the rerun finishes it into the file an
    uninterrupted run writes, bitwise."""
    ref, _ = reference
    out = tmp_path / "killed.h5"
    proc = subprocess.Popen([sys.executable, "-c", child_script(2), str(out)], cwd=tmp_path,
                            env=child_env(**{CHUNK_DELAY_ENV: "1.0"}), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        done = 0
        while time.monotonic() < deadline and proc.poll() is None:
            if out.exists():
                with h5py.File(out, "r", locking=False) as f:  # the child holds the write lock
                    done = int(np.count_nonzero(f["status"][()]))
                if done >= 4:
                    break
            time.sleep(0.05)
        assert proc.poll() is None, f"the run ended before it was killed: {proc.communicate()}"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL

    with pytest.warns(RuntimeWarning, match="not done yet"):
        partial = read_sims(out)
    assert 4 <= len(partial) < N and partial.n_pending == N - len(partial)
    np.testing.assert_array_equal(partial.kappa, data(ref)["kappa"][partial.indices])

    report = generate(CFG, PRIOR, N, out, progress=False)  # the file's batch size (2)
    assert report.n_resumed == len(partial) and report.n_simulated == N - len(partial)
    assert report.n_ok == N and report.n_pending == 0 and report.batch_size == 2
    assert_same_data(out, ref)
    again = generate(CFG, PRIOR, N, out, progress=False)  # complete: nothing to do
    assert again.n_resumed == N and again.n_simulated == 0


def test_data_parallel_two_devices(reference, tmp_path):
    """Two CPU devices (batch split 1 + 1) write the single-device file. θ is exactly equal (same
    keys, same sampling code); κ is allowed float32 rounding (1e-6 relative to the maps' range)
    because XLA may vectorise a per-device batch of 1 differently from a batch of 2 — in practice
    the files are bitwise equal too."""
    ref, _ = reference
    out = tmp_path / "dp.h5"
    proc = subprocess.run([sys.executable, "-c", child_script(2), str(out)], cwd=tmp_path,
                          env=child_env(XLA_FLAGS=xla_flags(2)),
                          capture_output=True, text=True, timeout=HANG)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info == {"n_devices": 2, "n_ok": N, "mode": "data-parallel"}
    got, want = data(out), data(ref)
    np.testing.assert_array_equal(got["theta"], want["theta"])
    np.testing.assert_array_equal(got["status"], want["status"])
    scale = np.abs(want["kappa"]).max()
    np.testing.assert_allclose(got["kappa"], want["kappa"], rtol=0, atol=1e-6 * scale)


# ---- failed simulations -------------------------------------------------------------------------

def test_failed_simulations_are_marked_counted_and_excluded(reference, tmp_path):
    """A model whose maps are NaN above an Omega_c cut and which raises (in a host callback) for
    the smallest Omega_c: those rows get status 2, the report and a warning count them, read_sims
    leaves them out. The chunk with the raising simulation is redone one simulation at a time."""
    import jax
    import jax.numpy as jnp

    from simulators.lensing import GaussianLensing

    ref, _ = reference
    want = data(ref)
    omega_c = want["theta"][:, 0]
    cut, lowest = float(np.median(omega_c)), float(omega_c.min())
    bad = (omega_c > cut) | (omega_c == lowest)
    assert 1 < bad.sum() < N

    def check(x):
        if np.any(np.asarray(x) == lowest):
            raise ValueError("simulated failure")
        return np.zeros_like(x)

    @dataclass(frozen=True, eq=False)
    class Faulty(GaussianLensing):
        def kappa(self, cosmo, latent):
            zero = jax.pure_callback(check, jax.ShapeDtypeStruct((), jnp.float64), cosmo.Omega_c,
                                     vmap_method="sequential")
            kappa = super().kappa(cosmo, latent) + zero
            return jnp.where(cosmo.Omega_c > cut, jnp.nan, kappa)

    base = CFG.build_model()
    out = tmp_path / "failed.h5"
    with pytest.warns(RuntimeWarning, match=f"{bad.sum()} of {N} simulations failed.*"
                                            f"simulated failure"):
        report = generate(CFG, PRIOR, N, out, batch_size=2, model=Faulty(base.sky, base.bins),
                          progress=False)
    assert report.n_failed == bad.sum() and report.n_ok == N - bad.sum()
    assert report.failed_indices == tuple(np.flatnonzero(bad))
    got = data(out)
    np.testing.assert_array_equal(got["status"], np.where(bad, 2, 1))
    np.testing.assert_array_equal(got["theta"][omega_c != lowest], want["theta"][omega_c != lowest])

    sims = read_sims(out)
    assert sims.n_failed == bad.sum() and sims.n_pending == 0 and len(sims) == N - bad.sum()
    np.testing.assert_array_equal(sims.indices, np.flatnonzero(~bad))
    assert np.all(np.isfinite(sims.kappa))
    np.testing.assert_allclose(sims.kappa, want["kappa"][~bad], rtol=1e-6,
                               atol=1e-6 * np.abs(want["kappa"]).max())
    everything = read_sims(out, include_failed=True)
    assert len(everything) == N and np.all(np.isnan(everything.kappa[bad]))
    np.testing.assert_array_equal(everything.status, np.where(bad, 2, 1))


# ---- the PM path --------------------------------------------------------------------------------

def test_pm_batch_through_lightcone(tmp_path):
    """vmap of the PM + lightcone simulator (native CIC painting, sequential under vmap): a batch
    of 2 gives finite, different maps, and simulation 1 equals the unbatched simulator's."""
    import jax

    from experiments.dataset import _model_for

    cfg = load_config("quick").with_(**{
        "simulation.mesh_shape": [16, 16, 32], "simulation.box_size": [128.0, 128.0, 512.0],
        "simulation.n_steps": 2, "maps.field_deg": 3.0, "maps.npix": 16, "sources.n_bins": 2,
        "scales.ell_max": None})
    report = generate(cfg, PRIOR, 2, tmp_path / "pm.h5", batch_size=2, progress=False)
    assert report.n_ok == 2 and report.mode == "data-parallel"
    sims = read_sims(tmp_path / "pm.h5")
    assert sims.kappa.shape == (2, 2, 16, 16) and np.all(np.isfinite(sims.kappa))
    assert np.all(sims.kappa.std(axis=(1, 2, 3)) > 1e-5)
    assert not np.allclose(sims.kappa[0], sims.kappa[1])

    model = _model_for(cfg)  # the model generate used
    theta_key, latent_key = jax.random.split(jax.random.fold_in(jax.random.key(cfg.seed), 1))
    np.testing.assert_array_equal(sims.theta[1], PRIOR.sample(theta_key))
    kappa = jax.jit(model.kappa)(PRIOR.cosmology(sims.theta[1], cfg.cosmology()),
                                 model.latent(latent_key))
    np.testing.assert_allclose(sims.kappa[1], np.asarray(kappa, np.float32), rtol=1e-5,
                               atol=1e-5 * np.abs(sims.kappa[1]).max())


def test_cosmologies_beyond_the_radial_window_are_reported():
    """generate warns (naming the count and the window_margin that would cover them) when drawn
    cosmologies have a PM step thicker than the lightcone's radial window: on quick's lightcone
    Omega_c = 0.001 gives 1.27x the fiducial thickest step against the default 1.25 window."""
    import warnings

    from experiments.dataset import _model_for, _warn_step_window

    cfg = load_config("quick")
    model, base = _model_for(cfg), cfg.cosmology()
    with pytest.warns(RuntimeWarning, match=r"1 of 2 simulations .*window_margin >= 1\.2[7-9]"):
        _warn_step_window(model, PRIOR, base, np.array([[0.2664, 0.8], [0.001, 0.8]]), Path("s.h5"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _warn_step_window(model, PRIOR, base, np.array([[0.05, 0.8], [0.5, 1.0]]), Path("s.h5"))


# ---- errors -------------------------------------------------------------------------------------

@pytest.mark.parametrize("change, message", [
    (dict(seed=1), "seed = 0 in the file, 1 now"),
    (dict(n=N + 1), f"n = {N} in the file, {N + 1} now"),
    (dict(prior=lsst_y10().select(["Omega_c", "h"])), "prior"),
    (dict(cfg=CFG.with_(**{"maps.field_deg": 4.0})), "config maps.field_deg = 5.0 in the file"),
    (dict(batch_size=4), "batch_size = 2 in the file, 4 now"),
])
def test_mismatched_rerun_is_refused(reference, change, message):
    ref, _ = reference
    before = ref.read_bytes()
    args = dict(cfg=CFG, prior=PRIOR, n=N) | {k: v for k, v in change.items() if k != "seed" and
                                             k != "batch_size"}
    kwargs = {k: v for k, v in change.items() if k in ("seed", "batch_size")}
    with pytest.raises(ValueError, match="choose another output file") as err:
        generate(args["cfg"], args["prior"], args["n"], ref, progress=False, **kwargs)
    assert message in str(err.value) and str(ref) in str(err.value)
    assert ref.read_bytes() == before


def test_not_a_sims_file(tmp_path):
    text = tmp_path / "notes.h5"
    text.write_text("not HDF5")
    maps = tmp_path / "maps.h5"
    with h5py.File(maps, "w") as f:
        f.attrs["format"] = "lensbench.maps"
    for path, what in ((text, "not HDF5"), (maps, "a map file")):
        before = path.read_bytes()
        with pytest.raises(ValueError, match=f"is not a lensbench sims file|is {what}") as err:
            read_sims(path)
        assert str(path) in str(err.value) and what in str(err.value)
        with pytest.raises(ValueError, match=what):
            generate(CFG, PRIOR, N, path, progress=False)
        with pytest.raises(ValueError, match=what):
            prior_from_file(path)
        assert path.read_bytes() == before  # never overwritten


def test_missing_file_and_bad_arguments(tmp_path):
    missing = tmp_path / "nowhere" / "sims.h5"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        read_sims(missing)
    for bad in (dict(n=0), dict(n=2.5), dict(batch_size=0), dict(seed=-1)):
        args = dict(n=N) | bad
        with pytest.raises(ValueError, match=next(iter(bad))):
            generate(CFG, PRIOR, args.pop("n"), tmp_path / "x.h5", progress=False, **args)
    assert not (tmp_path / "x.h5").exists()


# ---- parts (generate --part I/N) and merge ------------------------------------------------------

# N = 10 in 3 parts of 4, 3, 3 simulations (rows [0, 4), [4, 7), [7, 10)): batch 2 splits part 1
# evenly but not parts 2 and 3, whose chunks then start at odd indices (7 runs first in its batch
# here, second in the reference's); part 3's single chunk of batch 4 is padded with simulations
# beyond n. Batches 2 and 4 are the compilations the tests above use.
PART_BATCH = {1: 2, 2: 2, 3: 4}
PART_ROWS = {1: (0, 4), 2: (4, 7), 3: (7, 10)}


def attrs_of(path):
    """Root attributes with their HDF5 types: {name: (value, dtype, shape)}."""
    with h5py.File(path, "r", locking=False) as f:
        return {k: (f.attrs[k], f.attrs.get_id(k).dtype, f.attrs.get_id(k).shape) for k in f.attrs}


def assert_same_attrs(a, b):
    """The same attribute names, values, HDF5 types and shapes (bitwise for numbers)."""
    got, want = attrs_of(a), attrs_of(b)
    assert sorted(got) == sorted(want)
    for k, (value, dtype, shape) in want.items():
        assert (got[k][1], got[k][2]) == (dtype, shape), k
        np.testing.assert_array_equal(np.asarray(got[k][0]), np.asarray(value), err_msg=k)


def listing(directory):
    return sorted(p.name for p in directory.iterdir())


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """The 3 part files of the reference run (seed 0, n = N), made in this process."""
    d = tmp_path_factory.mktemp("parts")
    paths = []
    for i, batch in PART_BATCH.items():
        paths.append(d / f"sims_{i}.h5")
        report = generate(CFG, PRIOR, N, paths[-1], batch_size=batch, part=(i, 3), progress=False)
        assert (report.n_requested, report.n_ok, report.part.label) == (
            PART_ROWS[i][1] - PART_ROWS[i][0], PART_ROWS[i][1] - PART_ROWS[i][0], f"{i}/3")
    return paths


def test_parts_merge_into_the_whole_run(reference, parts, tmp_path):
    """Each part file holds its rows of the whole run, bitwise, and the whole run's identity;
    merged (given in any order) they are the whole run's file: θ, κ, status and every attribute,
    bit for bit and with the same HDF5 types."""
    ref, _ = reference
    want, want_attrs = data(ref), attrs_of(ref)
    for i, path in enumerate(parts, 1):
        start, stop = PART_ROWS[i]
        got = data(path)
        for k in got:
            np.testing.assert_array_equal(got[k], want[k][start:stop], err_msg=f"part {i} {k}")
        a = attrs_of(path)
        assert {k: a[k][0] for k in PART_ATTRS} == dict(part_index=i, part_count=3,
                                                         part_start=start, part_stop=stop)
        for k in ("n", "seed", "prior", "config_toml", "model"):
            assert a[k][0] == want_attrs[k][0], k
    with pytest.raises(ValueError, match=r"sims_2.h5 is part 2/3 \(simulations 4-6 of 10\) of a "
                                         r"training set, not a whole one: .*lensbench merge"):
        read_sims(parts[1])

    out = tmp_path / "sims.h5"
    report = merge_parts([parts[2], parts[0], parts[1]], out)
    assert (report.path, report.n, report.n_ok, report.n_failed) == (out, N, N, 0)
    assert report.n_parts == 3
    assert report.summary() == f"wrote {out}: {N} simulations ({N} ok, 0 failed) from 3 parts"
    assert_same_data(out, ref)
    assert_same_attrs(out, ref)
    with h5py.File(out, "r") as f, h5py.File(ref, "r") as g:
        for k in ("theta", "kappa", "status"):  # the same layout (chunks, fill, descriptions)
            assert (f[k].dtype, f[k].chunks, dict(f[k].attrs)) == (g[k].dtype, g[k].chunks,
                                                                   dict(g[k].attrs)), k
    merged, whole = read_sims(out), read_sims(ref)
    for k in ("theta", "kappa", "indices", "status"):
        np.testing.assert_array_equal(getattr(merged, k), getattr(whole, k), err_msg=k)
    assert merged.attrs == whole.attrs and merged.n_pending == 0
    # a finished merged file is a finished whole run: generate finds nothing to do
    again = generate(CFG, PRIOR, N, out, progress=False)
    assert (again.n_resumed, again.n_simulated) == (N, 0)
    assert listing(tmp_path) == ["sims.h5"]  # no temporary file left


def test_an_interrupted_part_resumes_and_merges_the_same(reference, parts, tmp_path, monkeypatch):
    """Part 2 interrupted after its first chunk (of 2) is on disk: merge refuses it (naming the
    file and its pending count), a rerun of its generate finishes it, and the merge is then the
    whole run's file."""
    from experiments import dataset

    ref, _ = reference
    out = tmp_path / "sims_2.h5"
    real_run = dataset._DataParallel.run
    calls = []

    def run_then_die(self, key, start, stop):
        if calls:
            raise KeyboardInterrupt  # as a Ctrl-C, after the first chunk is written
        calls.append(start)
        return real_run(self, key, start, stop)

    monkeypatch.setattr(dataset._DataParallel, "run", run_then_die)
    with pytest.raises(KeyboardInterrupt):
        generate(CFG, PRIOR, N, out, batch_size=2, part=(2, 3), progress=False)
    monkeypatch.undo()
    assert calls == [4] and np.count_nonzero(data(out)["status"]) == 2

    merged = tmp_path / "sims.h5"
    with pytest.raises(ValueError, match=rf"unfinished parts: {out} \(1 of its 3 simulations not "
                                         rf"done\); rerun their `lensbench generate --part`"):
        merge_parts([parts[0], out, parts[2]], merged)
    assert listing(tmp_path) == ["sims_2.h5"]

    report = generate(CFG, PRIOR, N, out, part=(2, 3), progress=False)  # the file's batch size
    assert (report.n_resumed, report.n_simulated, report.n_ok, report.batch_size) == (2, 1, 3, 2)
    merge_parts([parts[0], out, parts[2]], merged)
    assert_same_data(merged, ref)
    assert_same_attrs(merged, ref)


def test_merge_refuses_parts_that_are_not_one_whole_run(reference, parts, tmp_path):
    """Parts of another run, of another split, missing, given twice, or a whole file: one line
    naming the files or parts, and nothing written."""
    ref, _ = reference
    p1, p2, p3 = parts
    out = tmp_path / "sims.h5"

    def copy_with(name, **changes):
        path = tmp_path / name
        shutil.copy(p2, path)
        with h5py.File(path, "r+") as f:
            for k, v in changes.items():
                f.attrs[k] = v
        return path

    other_seed = copy_with("seed1.h5", seed=1)
    cfg = load_config_text(attrs_of(p2)["config_toml"][0]).with_(**{"maps.field_deg": 4.0})
    other_config = copy_with("field4.h5", config_toml=cfg.to_toml())
    damaged = copy_with("damaged.h5", part_index=3, part_start=7, part_stop=9)
    half = tmp_path / "half_1.h5"
    generate(CFG, PRIOR, N, half, batch_size=2, part=(1, 2), progress=False)

    cases = [
        ([p1, other_seed, p3], rf"cannot merge parts of different runs: {other_seed} and {p1} hold "
                               rf"other simulations \(seed = 0 in {p1}, 1 in {other_seed}\)"),
        ([p1, other_config, p3], r"different runs: .*config maps.field_deg = 5.0 in .*sims_1.h5, "
                                 r"4.0 in .*field4.h5"),
        ([half, p2, p3], rf"different splits: {half} is part 1/2, {p2} part 2/3"),
        ([p1, p3], r"missing part 2 of 3 \(of 10 simulations, .*\): generate it with --part I/3"),
        ([p3], r"missing parts 1, 2 of 3"),
        ([p1, p2, p3, p2], rf"overlapping parts: part 2/3 given 2 times \({p2}, {p2}\)"),
        ([p1, p2, damaged], rf"{damaged} is an inconsistent part file: part_index = 3, "
                            rf"part_count = 3, part_start = 7, part_stop = 9 for n = 10"),
        ([ref, p2], rf"{ref} is a whole training set, not a part"),
    ]
    before = listing(tmp_path)
    for given, message in cases:
        with pytest.raises(ValueError, match=message):
            merge_parts(given, out)
        assert listing(tmp_path) == before, message
    with pytest.raises(FileNotFoundError, match="nowhere.h5"):
        merge_parts([p1, p2, tmp_path / "nowhere.h5"], out)
    assert listing(tmp_path) == before


def test_merge_never_overwrites_a_part_or_an_existing_file(reference, parts, tmp_path):
    """An existing --out is refused unless overwrite=True; --out may never be one of the parts
    (by any name); nothing is changed by a refusal."""
    ref, _ = reference
    out = tmp_path / "sims.h5"
    out.write_text("keep")
    with pytest.raises(OutputError, match=rf"--out {out} exists; pass --overwrite"):
        merge_parts(parts, out)
    assert out.read_text() == "keep"
    merge_parts(parts, out, overwrite=True)
    assert_same_data(out, ref)

    link = tmp_path / "link.h5"
    link.symlink_to(parts[1])
    before = parts[1].read_bytes()
    for target in (parts[1], link):
        for overwrite in (False, True):
            with pytest.raises(OutputError, match=r"is the input PART .*sims_2.h5: writing it "
                                                  r"would replace the input"):
                merge_parts(parts, target, overwrite=overwrite)
    assert parts[1].read_bytes() == before
    assert listing(tmp_path) == ["link.h5", "sims.h5"]


def test_a_part_file_resumes_only_as_the_same_part(parts, tmp_path):
    """generate on a part file with another part, or the whole run, is refused (it would write
    other rows into it)."""
    path = tmp_path / "sims_2.h5"
    shutil.copy(parts[1], path)
    before = path.read_bytes()
    for part, message in (((3, 3), "part 2/3 in the file, part 3/3 now"),
                          (None, "part 2/3 in the file, the whole run now"),
                          ((2, 4), "part 2/3 in the file, part 2/4 now")):
        with pytest.raises(ValueError, match=f"holds other simulations.*{message}"):
            generate(CFG, PRIOR, N, path, part=part, progress=False)
    assert path.read_bytes() == before
    report = generate(CFG, PRIOR, N, path, part=(2, 3), progress=False)  # the same part: done
    assert (report.n_resumed, report.n_simulated) == (3, 0)
    with pytest.raises(ValueError, match="part 4/3: the part number must be between 1 and 3"):
        generate(CFG, PRIOR, N, tmp_path / "x.h5", part=(4, 3), progress=False)
    with pytest.raises(ValueError, match="part 1/11: 11 parts of 10 simulations would leave"):
        generate(CFG, PRIOR, N, tmp_path / "x.h5", part=(1, 11), progress=False)
    assert not (tmp_path / "x.h5").exists()


@pytest.mark.parametrize("value, code, message", [
    ("0/4", 2, "Invalid value for '--part': '0/4': the part number I of I/N must be between 1 "
               "and N = 4"),
    ("5/4", 2, "'--part': '5/4': the part number I of I/N must be between 1 and N = 4"),
    ("x", 2, "'--part': must look like I/N, e.g. 3/8 for part 3 of 8, got 'x'"),
    ("11/11", 1, "--part 11/11: 11 parts of 10 simulations would leave parts empty; split into "
                 "at most 10 parts"),
])
def test_bad_part_options(tmp_path, value, code, message):
    from tests.test_cli import assert_one_line_error

    line = assert_one_line_error(invoke("generate", "--n", "10", "--part", value, "--out",
                                        tmp_path / "p.h5", "--no-progress"), code)
    assert message in line
    assert listing(tmp_path) == []


def test_parts_as_separate_processes_merge_into_the_whole_run(reference, tmp_path):
    """The cluster recipe on one machine: the 3 parts run as concurrent `lensbench generate --part
    I/3` processes, then `lensbench merge` (one line) writes the whole run's file, bitwise."""
    from tests.test_cli import assert_one_line_error

    ref, _ = reference
    config = tmp_path / "g.toml"
    config.write_text(CFG.to_toml())
    (tmp_path / "parts").mkdir()
    paths = [tmp_path / "parts" / f"sims_{i}.h5" for i in (1, 2, 3)]
    procs = [subprocess.Popen([sys.executable, "-m", "experiments.cli", "generate", "--config",
                               str(config), "--n", str(N), "--seed", "0", "--batch-size", "2",
                               "--part", f"{i}/3", "--out", str(path), "--no-progress"],
                              cwd=tmp_path, env=cli_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
             for i, path in enumerate(paths, 1)]
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=HANG)
        assert proc.returncode == 0, stderr
        assert "part" in stdout and "0 failed" in stdout
    out = tmp_path / "sims.h5"
    result = invoke("merge", *paths, "--out", out)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == f"wrote {out}: {N} simulations ({N} ok, 0 failed) from 3 parts"
    assert_same_data(out, ref)
    assert_same_attrs(out, ref)
    line = assert_one_line_error(invoke("merge", *paths[:2], "--out", tmp_path / "x.h5"), 1)
    assert "missing part 3 of 3" in line
