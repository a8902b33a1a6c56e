"""A lightcone served by several boxes (``lensing.ShellLensing``, config [shells]) and the
window-compensated read (``Lightcone.compensate``)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.config import ConfigError, load_config_text
from simulators import Cosmology, SimConfig, white_noise
from simulators.cosmology import comoving_distance_jit
from simulators.lensing import PMLensing, ShellLensing
from simulators.lightcone import BornLightcone, FlatSky, Lightcone
from simulators.sources import RedshiftBins

COSMO = Cosmology.fiducial()
BINS = RedshiftBins.lsst_y10(n_bins=2)
SKY = FlatSky(4.0, 12)
CFG = SimConfig(mesh_shape=(16, 16, 64), box_size=(128.0, 128.0, 1024.0), a_init=0.25, n_steps=4,
                deconvolve=True)
CHI_MAX = 2500.0


def test_shells_of_one_box_add_up_to_the_whole_lightcone():
    """The same run painted as two shells [0, 900] + [900, 2500] equals the one-shell lightcone:
    every radial sample belongs to exactly one shell (by its centre). The radial sample spacing
    follows the thickest step inside each lightcone, so the near shell's window_margin is scaled
    to give it the whole lightcone's spacing (otherwise the two differ by the radial
    discretisation, a few % of the maps' rms at these 16 Mpc/h cells). What differs is the linear
    interpolation of q_i(χ) on each shell's own 1024-node table (nodes 2.4 and 0.9 Mpc/h apart
    instead of 2.4): q is smooth on 100 Mpc/h scales, so the difference is ~1e-6 of the maps' rms;
    1e-4 leaves room for float32 round-off, while a sample counted twice or dropped at the seam
    moves the maps by ~1% of their rms (one 16 Mpc/h slice of a 2500 Mpc/h path)."""
    from simulators.lightcone import _fiducial_thickest_step

    whole_lc = Lightcone(SKY, CHI_MAX)
    whole = PMLensing(CFG, whole_lc, BINS)
    ratio = _fiducial_thickest_step(CFG, whole_lc) / _fiducial_thickest_step(CFG, Lightcone(SKY, 900.0))
    near = PMLensing(CFG, Lightcone(SKY, 900.0, window_margin=whole_lc.window_margin * ratio), BINS)
    far = PMLensing(CFG, Lightcone(SKY, CHI_MAX, chi_min=900.0), BINS)
    z = white_noise(CFG, 3)
    k_whole = np.asarray(jax.jit(whole.kappa)(COSMO, z))
    shells = ShellLensing((near, far))
    k_shells = np.asarray(jax.jit(shells.kappa)(COSMO, (z, z)))
    rms = k_whole.std()
    assert np.max(np.abs(k_shells - k_whole)) < 1e-4 * rms
    k_far = np.asarray(jax.jit(far.kappa)(COSMO, z))
    assert k_far.std() > 0.1 * rms  # each shell carries a real part of the signal


def test_shell_lensing_refuses_gaps_and_foreign_pieces():
    a = PMLensing(CFG, Lightcone(SKY, 900.0), BINS)
    gap = PMLensing(CFG, Lightcone(SKY, CHI_MAX, chi_min=1000.0), BINS)
    with pytest.raises(ValueError, match="gap or overlap"):
        ShellLensing((a, gap))
    late = PMLensing(CFG, Lightcone(SKY, CHI_MAX, chi_min=500.0), BINS)
    with pytest.raises(ValueError, match="shell 0 must start at chi = 0"):
        ShellLensing((late,))
    with pytest.raises(ValueError, match="latent must be a tuple of 1"):
        ShellLensing((a,)).kappa(COSMO, white_noise(CFG, 0))


def test_a_run_that_stops_before_its_near_edge_is_refused():
    """Shell [900, 2500] run only to a = 0.7 (χ ≈ 1500 Mpc/h): the light of [900, 1500] would be
    missing, and ``realise`` says which shell and what to change."""
    near = PMLensing(CFG, Lightcone(SKY, 900.0), BINS)
    short = PMLensing(CFG.with_(a_final=0.7), Lightcone(SKY, CHI_MAX, chi_min=900.0), BINS)
    model = ShellLensing((near, short))
    with pytest.raises(ValueError, match="shell 1: .*a_margin"):
        model.realise(COSMO, model.latent(0))


def test_latent_fields_are_independent_per_shell():
    near = PMLensing(CFG, Lightcone(SKY, 900.0), BINS)
    far = PMLensing(CFG, Lightcone(SKY, CHI_MAX, chi_min=900.0), BINS)
    z0, z1 = ShellLensing((near, far)).latent(5)
    assert z0.shape == z1.shape == CFG.particle_shape
    assert abs(np.corrcoef(np.ravel(z0), np.ravel(z1))[0, 1]) < 0.02  # 16k samples: rms 0.008


def test_compensated_read_divides_the_transverse_windows():
    """The compensated density equals the CIC-painted one with each Fourier mode divided by
    sinc⁴(k_x Δ_x / 2) sinc⁴(k_y Δ_y / 2) (numpy's FFT and sinc, independent of the grid code)."""
    cfg = SimConfig(mesh_shape=(8, 8, 16), box_size=(32.0, 32.0, 96.0), deconvolve=True)
    lc = Lightcone(SKY, 500.0, compensate=True)
    disp = jax.random.normal(jax.random.key(0), cfg.particle_shape + (3,), jnp.float32) * 1.5
    plain = np.asarray(BornLightcone(cfg, Lightcone(SKY, 500.0), 2, 4).density_contrast(disp),
                       np.float64)
    comp = np.asarray(BornLightcone(cfg, lc, 2, 4).density_contrast(disp), np.float64)
    kx = 2 * np.pi * np.fft.fftfreq(8, 4.0)
    w = (np.sinc(kx * 2.0 / np.pi)[:, None, None] * np.sinc(kx * 2.0 / np.pi)[None, :, None]) ** 4
    expect = np.fft.irfftn(np.fft.rfftn(plain) / w[..., :1], s=plain.shape, axes=(0, 1, 2))
    assert np.max(np.abs(comp - expect)) < 1e-5 * np.abs(plain).max()  # float32 FFTs


SHELL_TOML = """
[simulation]
kind = "pm"
a_init = 0.25
n_steps = 8
deconvolve = true
[shells]
chi_edges = [0.0, 800.0, 2000.0]
width = [64.0, 128.0]
cell = 8.0
[maps]
field_deg = 3.0
npix = 8
[sources]
preset = "lsst_y10"
n_bins = 2
"""


def test_shell_configs_follow_the_cone():
    """Box i: width in whole cells, as deep as the shell seen from the field's corner, a run to the
    fiducial a of its near edge plus a_margin, in steps of (1 - a_init) / n_steps."""
    cfg = load_config_text(SHELL_TOML)
    (c0, (n0, f0)), (c1, (n1, f1)) = cfg.shell_configs()
    assert (n0, f0, n1, f1) == (0.0, 800.0, 800.0, 2000.0)
    assert c0.mesh_shape == (8, 8, 100) and c0.box_size == (64.0, 64.0, 800.0)
    corner = math.cos(math.atan(math.sqrt(2) * math.tan(math.radians(1.5))))
    assert c1.box_size[2] == pytest.approx(2000.0 - 800.0 * corner, rel=1e-12)
    assert c1.mesh_shape[:2] == (16, 16) and c1.mesh_shape[2] == math.ceil(c1.box_size[2] / 8.0)
    assert c0.a_final == 1.0 and c0.n_steps == 8
    chi_end = float(np.asarray(comoving_distance_jit(COSMO, np.array([c1.a_final - 0.03])))[0])
    assert chi_end == pytest.approx(800.0, rel=1e-6)  # a_final - a_margin is a(800 Mpc/h)
    assert c1.n_steps == math.ceil((c1.a_final - 0.25) / (0.75 / 8) - 1e-9) < 8
    model = cfg.build_model()
    assert isinstance(model, ShellLensing) and model.chi_max == 2000.0
    assert cfg.chi_max() == 2000.0


@pytest.mark.parametrize("change, key", [
    ("chi_edges = [100.0, 800.0, 2000.0]", "shells.chi_edges"),
    ("chi_edges = [0.0, 800.0, 700.0]", "shells.chi_edges"),
    ("width = [64.0, 128.0, 10.0]", "shells.width"),
    ("width = [64.0, 90.0]", "shells.width"),  # the 3 deg field is 105 Mpc/h wide at 2000
    ("cell = -1.0", "shells.cell"),
])
def test_bad_shells_are_refused_naming_the_key(change, key):
    key_name = change.split(" =")[0]
    text = "\n".join(change if line.startswith(key_name + " =") else line
                     for line in SHELL_TOML.splitlines())
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config_text(text)


def test_shells_refuse_settings_they_cannot_honour():
    with pytest.raises(ConfigError, match=r"lightcone\.randomize"):
        load_config_text(SHELL_TOML + "[lightcone]\nrandomize = true\n")
    with pytest.raises(ConfigError, match=r"lightcone\.chi_max"):
        load_config_text(SHELL_TOML + "[lightcone]\nchi_max = 3000.0\n")
    with pytest.raises(ConfigError, match=r"shells\.chi_edges"):
        load_config_text(SHELL_TOML.replace('kind = "pm"', 'kind = "gaussian"'))
    narrow = SHELL_TOML.replace("width = [64.0, 128.0]", "width = [64.0, 90.0]")
    ok = load_config_text(narrow.replace("cell = 8.0", "cell = 8.0\nallow_replication = true"))
    assert ok.shells.n_shells == 2


def test_field_level_inference_refuses_shells():
    from explicit.model import field_model
    cfg = load_config_text(SHELL_TOML)
    model = cfg.build_model()
    with pytest.raises(ValueError, match="several boxes"):
        field_model(model, {}, COSMO, np.zeros((2, 8, 8)), np.ones(2))


def test_maps_record_the_validated_scales_and_cl_marks_them(tmp_path, capsys):
    """[scales] goes into the map file; ``cl`` stars the ratios outside each bin's range and
    shades them; ``maps`` warns when the cells are too coarse for ell_max (8 Mpc/h cells: the
    Nyquist is 0.39 h/Mpc, and ell_max = 400 at bin 2's median distance ~ 840 Mpc/h needs 0.48)."""
    from experiments.io import read_maps
    from experiments.maps import run_cl, run_maps

    text = SHELL_TOML + "[scales]\nell_max = [200.0, 400.0]\n"
    path = tmp_path / "shells.toml"
    path.write_text(text)
    out = run_maps(path, tmp_path / "m.h5", progress=False)
    err = capsys.readouterr().err
    assert "scales.ell_max of bin 2 (400)" in err and "cells too coarse" in err
    data = read_maps(out)
    np.testing.assert_array_equal(data.attrs["scales_ell_max"], [200.0, 400.0])
    np.testing.assert_array_equal(data.attrs["scales_ell_min"], [0.0, 0.0])
    run_cl(out, tmp_path / "cl.png")
    printed = capsys.readouterr().out
    assert "* outside the validated range of [scales] (bin 1: 0-200, bin 2: 0-400)" in printed
    rows = [r.split() for r in printed.splitlines() if r.strip() and r.split()[0][0].isdigit()]
    assert len(rows) >= 4
    for r in rows:  # ell, modes, (1,1), (2,2)
        ell = float(r[0])
        assert r[2].endswith("*") == (ell > 200) and r[3].endswith("*") == (ell > 400)
    npz = np.load(tmp_path / "cl.npz")
    np.testing.assert_array_equal(npz["valid_hi"], [200.0, 200.0, 400.0])


def test_training_sets_of_a_shells_model(tmp_path):
    """``generate`` runs a shells model as a 3-D model (its memory is the shells' sum), and each
    simulation's maps are the sum of its shells'."""
    from experiments.dataset import _is_3d, _model_bytes, _model_for, generate, read_sims
    from experiments.priors import lsst_y10
    from simulators.simulation import estimated_bytes

    cfg = load_config_text(SHELL_TOML)
    model = _model_for(cfg)
    assert _is_3d(model)
    assert _model_bytes(model) == sum(estimated_bytes(s.cfg) for s in model.shells)
    prior = lsst_y10().select(["Omega_c", "sigma8"])
    report = generate(cfg, prior, 2, tmp_path / "s.h5", batch_size=2, progress=False)
    assert report.n_ok == 2
    sims = read_sims(tmp_path / "s.h5")
    assert sims.kappa.shape == (2, 2, 8, 8) and np.all(np.isfinite(sims.kappa))
    assert not np.allclose(sims.kappa[0], sims.kappa[1])
