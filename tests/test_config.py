"""Experiment configurations: the shipped TOMLs, validation messages that name the key, round trips.

Nothing here runs a simulation; building the LSST-Y10 bins and the lightcone depth are the only
JAX computations.
"""

import copy
import os
import subprocess
import sys
import tomllib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from experiments.config import (ConfigError, ExperimentConfig, load_config, load_config_text,
                                parse_overrides, resolve_config_path, shipped_configs)
from experiments.io import read_maps, write_maps

REPO = Path(__file__).resolve().parents[1]


def test_shipped_configs_load():
    shipped = shipped_configs()
    assert {"quick", "lsst_y10"} <= set(shipped)
    assert all(p.parent.name == "configs" and p.parent.parent.name == "experiments"
               for p in shipped.values())

    quick = load_config("quick")
    assert quick.name == "quick" and quick.path == str(shipped["quick"])
    assert quick.simulation.kind == "pm" and quick.simulation.mesh_shape == (24, 24, 48)
    assert quick.maps.sky == "flat" and quick.maps.npix == 32 and quick.maps.nside is None
    assert quick.sources.n_bins == 3 and quick.sources.nz_files is None
    assert load_config("quick.toml") == quick == load_config(shipped["quick"])

    lsst = load_config("lsst_y10")
    assert (lsst.maps.field_deg, lsst.maps.npix) == (10.0, 256)
    assert lsst.simulation.mesh_shape == (64, 64, 256)
    assert lsst.simulation.box_size == (400.0, 400.0, 4000.0)
    assert lsst.sources.n_bins == 5 and lsst.lightcone.randomize
    edges = lsst.ell_edges()
    assert edges.shape == (15,) and edges[0] == 50.0 and edges[-1] == pytest.approx(3000.0)


def test_shipped_config_keys_are_documented():
    """Every key of every section is listed in the module docstring, and every key set in a shipped
    TOML carries a comment."""
    import re

    from experiments import config as module

    documented = set()
    for line in module.__doc__.splitlines():
        m = re.match(r"^  (\w+(?:, \w+)*)\s+:", line)
        if m:
            documented.update(m.group(1).split(", "))
    for section, cls in module.SECTIONS.items():
        assert f"[{section}]" in module.__doc__
        missing = set(module._keys(cls)) - documented
        assert not missing, (section, missing)
    assert set(module.TOP_LEVEL) <= documented
    for path in shipped_configs().values():
        for line in path.read_text().splitlines():
            if "=" in line and not line.lstrip().startswith("#") and not line.startswith("name"):
                assert "#" in line, f"{path.name}: {line}"


def test_default_lightcone_depth_reaches_the_farthest_sources():
    from simulators import Cosmology
    from simulators.cosmology import background

    cfg = load_config("lsst_y10")
    bg = background(Cosmology.fiducial())
    z_max = float(cfg.bins().z[-1])
    assert z_max == 4.0
    chi = float(bg.comoving_distance(1 / (1 + z_max)))
    assert cfg.chi_max() == pytest.approx(chi)  # a_init = 0.2 is exactly z = 4: not capped
    assert chi <= float(bg.comoving_distance(cfg.simulation.a_init)) * (1 + 1e-9)
    # a later start caps the depth at chi(a_init)
    late = cfg.with_(**{"simulation.a_init": 0.5})
    assert late.chi_max() == pytest.approx(float(bg.comoving_distance(0.5)))
    assert cfg.with_(**{"lightcone.chi_max": 1234.0}).chi_max() == 1234.0


def test_resolve_names_and_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_config_path("quick") == shipped_configs()["quick"]
    (tmp_path / "quick").write_text('name = "local"\n')  # a file of that name wins
    assert resolve_config_path("quick") == Path("quick")
    assert load_config("quick").name == "local"
    with pytest.raises(ConfigError, match=r"no such file.*lsst_y10.*did you mean 'quick'"):
        resolve_config_path("quik2")
    with pytest.raises(ConfigError, match="no such file"):
        resolve_config_path("sub/quick")


# ---- validation ---------------------------------------------------------------------------------

def base() -> dict:
    return tomllib.loads(shipped_configs()["quick"].read_text())


def changed(**sections) -> dict:
    """The quick config's dict with keys changed (a value None removes the key)."""
    data = base()
    for section, values in sections.items():
        if isinstance(values, dict) and isinstance(data.get(section), dict):
            for k, v in values.items():
                if v is None:
                    data[section].pop(k, None)
                else:
                    data[section][k] = v
        else:
            data[section] = values
    return data


def nz_file(path, z, n):
    np.savetxt(path, np.column_stack([z, n]))
    return str(path)


@pytest.fixture
def nz_files(tmp_path):
    z = np.linspace(0.0, 3.0, 61)
    return [nz_file(tmp_path / "bin0.txt", z, np.exp(-((z - 0.5) / 0.2) ** 2)),
            nz_file(tmp_path / "bin1.txt", z, np.exp(-((z - 1.0) / 0.3) ** 2))]


CASES = [
    # unknown names, with a suggestion
    (dict(maps={"feld_deg": 5.0}), "maps.feld_deg: unknown key (did you mean 'field_deg'?)"),
    (dict(cosmology={"omega_c": 0.3}), "cosmology.omega_c: unknown key (did you mean 'Omega_c'?)"),
    (dict(sed=3), "sed: unknown key (did you mean 'seed'?)"),
    (dict(simulaton={"kind": "pm"}), "[simulaton]: unknown section (did you mean 'simulation'?)"),
    (dict(prior={"Omega_c": [0.1, 0.5]}), "prior.Omega_c: must be a table"),
    (dict(priors={"Omega_c": {}}), "[priors]: unknown section (did you mean 'prior'?)"),
    # wrong types
    (dict(maps={"npix": "64"}), "maps.npix: must be an integer, got '64' (string)"),
    (dict(maps={"npix": 64.5}), "maps.npix: must be an integer, got 64.5 (float)"),
    (dict(maps={"field_deg": True}), "maps.field_deg: must be a number, got True (bool)"),
    (dict(simulation={"mesh_shape": [32, 32]}), "simulation.mesh_shape: must be one number or a list of 3"),
    (dict(simulation={"box_size": "big"}), "simulation.box_size: must be a number"),
    (dict(lightcone={"randomize": "yes"}), "lightcone.randomize: must be true or false"),
    (dict(lightcone={"observer": 3.0}), "lightcone.observer: must be a list of 3 numbers"),
    (dict(cosmology=3), "cosmology: must be a table [cosmology], got 3 (int)"),
    (dict(name=7), "name: must be a non-empty string"),
    (dict(seed=-1), "seed: must be in [0, 2^63)"),
    (dict(seed=1.5), "seed: must be an integer"),
    # impossible values
    (dict(maps={"field_deg": -1}), "maps.field_deg: must be > 0, got -1"),
    (dict(maps={"field_deg": 120.0}), "maps.field_deg: must be in (0, 90) degrees"),  # FlatSky's
    (dict(maps={"npix": 1}), "maps.npix: must be >= 2, got 1"),
    (dict(maps={"sky": "healpix", "nside": 12}), "maps.nside: must be a power of 2, got 12"),
    (dict(maps={"sky": "fullsky"}), "maps.sky: must be one of 'flat', 'healpix', got 'fullsky'"),
    (dict(maps={"nside": 16}), "maps.nside: only applies to sky = 'healpix'"),
    (dict(maps={"sky": "healpix", "nside": 16, "npix": 64}), "maps.field_deg: only applies to sky = 'flat'"),
    (dict(simulation={"kind": "nbody"}), "simulation.kind: must be one of 'pm', 'lpt', 'gaussian'"),
    (dict(simulation={"kind": "gaussian"}, maps={"sky": "healpix", "field_deg": None, "npix": None}),
     "simulation.kind: 'gaussian' maps need maps.sky = 'flat'"),
    (dict(simulation={"mesh_shape": 1}), "simulation.mesh_shape: must be >= 2"),
    (dict(simulation={"box_size": [200.0, -1.0, 1000.0]}), "simulation.box_size: must be > 0"),
    (dict(simulation={"mesh_factor": 5, "deconvolve": False}),
     "simulation.mesh_shape: (24, 24, 48) must be divisible by mesh_factor 5"),
    (dict(simulation={"a_init": 1.5}), "simulation.a_init: must be in (0, 1), got 1.5"),
    (dict(simulation={"n_steps": 0}), "simulation.n_steps: must be >= 1"),
    (dict(simulation={"lpt_order": 3}), "simulation.lpt_order: must be one of 1, 2, got 3"),
    (dict(simulation={"dtype": "float16"}), "simulation.dtype: must be one of 'float32', 'float64'"),
    (dict(simulation={"gradient": "magic"}), "simulation.gradient: must be one of 'checkpoint', 'adjoint'"),
    (dict(simulation={"pdims": "two"}), "simulation.pdims: must look like '2x2'"),
    (dict(simulation={"pdims": "0x2"}), "simulation.pdims: must look like '2x2'"),
    (dict(simulation={"pdims": "5x5"}),
     "simulation.pdims: mesh_shape [24, 24, 48] is not divisible by the device grid 5x5 along x"),
    (dict(simulation={"mesh_shape": [32, 32, 64], "mesh_factor": 2, "pdims": "1x32",
                     "deconvolve": False}),
     "simulation.pdims: particle grid [16, 16, 32] is not divisible by the device grid 1x32 along y"),
    (dict(simulation={"halo": 1}), "simulation.halo: must be >= 2"),
    (dict(lightcone={"chi_max": 0.0}), "lightcone.chi_max: must be > 0"),
    (dict(lightcone={"observer": [100.0, 100.0, -5.0]}), "lightcone.observer: [100, 100, -5] lies outside the box"),
    (dict(cosmology={"Omega_c": -0.1}), "cosmology.Omega_c: must be > 0, got -0.1"),
    (dict(cosmology={"Omega_c": 0.9, "Omega_b": 0.2}), "cosmology.Omega_c: Omega_m = Omega_c + Omega_b must be < 1"),
    (dict(cosmology={"h": 5.0}), "cosmology.h: must be in (0.2, 2), got 5.0"),
    (dict(sources={"n_gal_total": 0.0}), "sources.n_gal_total: must be > 0 (bins with no galaxies)"),
    (dict(sources={"n_bins": 0}), "sources.n_bins: must be >= 1"),
    (dict(sources={"preset": "des_y3"}), "sources.preset: must be one of 'lsst_y10'"),
    (dict(sources={"sigma_e": -0.26}), "sources.sigma_e: must be > 0"),
    (dict(sources={"n_gal_per_bin": 5.0}), "sources.n_gal_per_bin: only applies with nz_files"),
    (dict(cl={"ell_min": 500.0, "ell_max": 100.0}), "cl.ell_max: must be > ell_min = 500, got 100"),
    (dict(cl={"ell_min": 5000.0}), "cl.ell_min: the ell range [5000, 1152] is empty"),
    (dict(cl={"ell_edges": [100.0, 50.0]}), "cl.n_ell_bins: give either ell_edges or"),
    (dict(cl={"ell_edges": [100.0, 50.0, 200.0], "n_ell_bins": None, "spacing": None}),
     "cl.ell_edges: must be >= 2 increasing values"),
    (dict(cl={"spacing": "cubic"}), "cl.spacing: must be one of 'log', 'linear'"),
    (dict(cl_baseline={"covariance": "simulated", "likelihood": "wishart"}),
     "cl_baseline.likelihood: 'wishart' is the band powers' distribution for Gaussian maps"),
    (dict(cl_baseline={"covariance": "gaussian", "likelihood": "sellentin_heavens"}),
     "cl_baseline.likelihood: 'sellentin_heavens' marginalises"),
    (dict(compare={"ess_min": 0}), "compare.ess_min: must be >= 1, got 0"),
    (dict(compare={"ess_min": 400.5}), "compare.ess_min: must be an integer, got 400.5 (float)"),
    (dict(compare={"r_hat_max": 1.0}), "compare.r_hat_max: must be > 1, got 1"),
    (dict(compare={"r_hat_max": "1.01"}), "compare.r_hat_max: must be a number"),
]


@pytest.mark.parametrize("change, message", CASES, ids=[c[1].split(":")[0] + f"-{i}" for i, c in enumerate(CASES)])
def test_validation_names_the_key(change, message):
    with pytest.raises(ConfigError) as info:
        load_config(changed(**change))
    assert str(info.value).startswith(message), str(info.value)
    assert "\n" not in str(info.value)


def test_models_built_in_python_raise_the_same_config_errors():
    """A section or configuration built directly (not loaded) fails with loading's one-line
    ConfigError, not pydantic's ValidationError."""
    from experiments.config import ClSection, CompressorSection
    cases = [
        (lambda: CompressorSection(width=-1), "compressor.width: must be >= 1, got -1"),
        (lambda: CompressorSection(widht=3), "compressor.widht: unknown key (did you mean 'width'?)"),
        (lambda: CompressorSection.model_validate({"loss": "l2"}), "compressor.loss: must be one of"),
        (lambda: ClSection(ell_min=500.0, ell_max=100.0), "cl.ell_max: must be > ell_min = 500, got 100"),
        (lambda: ExperimentConfig(compressor={"width": -1}), "compressor.width: must be >= 1, got -1"),
        (lambda: ExperimentConfig(sed=3), "sed: unknown key (did you mean 'seed'?)"),
    ]
    for build, message in cases:
        with pytest.raises(ConfigError) as info:
            build()
        assert str(info.value).startswith(message), str(info.value)
        assert "\n" not in str(info.value)
    with pytest.raises(ConfigError) as info:
        load_config(changed(compressor={"width": -1}))
    assert str(info.value) == "compressor.width: must be >= 1, got -1"
    assert ExperimentConfig(compressor=CompressorSection(width=8)).compressor.width == 8


def test_nz_file_errors_name_the_key(nz_files, tmp_path):
    preset_off = dict(preset=None, n_bins=None, n_gal_total=None, sigma_z0=None)
    sources = {**preset_off, "nz_files": nz_files, "n_gal_per_bin": [10.0, 12.0], "sigma_e": 0.3}
    cfg = load_config(changed(sources=sources, scales={"ell_max": None}))  # quick's has 3 bins
    assert cfg.sources.preset is None and cfg.sources.n_bins is None
    assert cfg.bins().n_bins == 2 and list(cfg.bins().n_gal) == [10.0, 12.0]

    def error(**extra):
        with pytest.raises(ConfigError) as info:
            load_config(changed(sources={**sources, **extra}, scales={"ell_max": None}))
        return str(info.value)

    missing = str(tmp_path / "nope.txt")
    assert error(nz_files=[nz_files[0], missing]).startswith(
        f"sources.nz_files[1]: n(z) file not found: {missing}")
    (tmp_path / "bad.txt").write_text("0 1 2\n1 2 3\n")
    assert error(nz_files=[str(tmp_path / "bad.txt")], n_gal_per_bin=1.0).startswith(
        "sources.nz_files[0]:")
    assert error(n_gal_per_bin=[10.0, 0.0]).startswith(
        "sources.n_gal_per_bin: bin 1 has no galaxies (n_gal must be > 0)")
    assert error(n_gal_per_bin=-2.0).startswith("sources.n_gal_per_bin: bin 0 has no galaxies")
    assert error(n_gal_per_bin=[1.0, 2.0, 3.0]).startswith(
        "sources.n_gal_per_bin: needs one number or 2 (one per n(z) file), got 3")
    assert error(n_bins=2).startswith("sources.n_bins: only applies to the preset")
    assert error(n_gal_per_bin=None).startswith("sources.n_gal_per_bin: required with nz_files")


def test_file_errors_carry_the_file_name(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[maps]\nfield_deg = -1\n")
    with pytest.raises(ConfigError, match=rf"^{bad}: maps.field_deg: must be > 0, got -1$"):
        load_config(bad)
    broken = tmp_path / "broken.toml"
    broken.write_text("[maps\nnpix = 3\n")
    with pytest.raises(ConfigError, match=rf"^{broken}: invalid TOML"):
        load_config(broken)


# ---- round trips --------------------------------------------------------------------------------

def test_relative_nz_files_resolve_against_the_config_file(nz_files, tmp_path, monkeypatch):
    sub = tmp_path / "configs"
    sub.mkdir()
    (sub / "files.toml").write_text(
        '[sources]\nnz_files = ["../bin0.txt", "../bin1.txt"]\nn_gal_per_bin = 4.5\n')
    monkeypatch.chdir(sub.parent.parent)
    cfg = load_config(sub / "files.toml")
    assert cfg.sources.nz_files == tuple(nz_files) and cfg.name == "files"
    assert load_config_text(cfg.to_toml()) == cfg


def test_set_overrides_are_toml_values():
    got = parse_overrides(["hmc.num_samples=2000", "compare.methods=['hmc', 'npe_cl']",
                           "simulation.pdims=2x2", "cosmology.sigma8=0.8", "hmc.sampler=mclmc",
                           " lightcone.randomize = false"])
    assert got == {"hmc.num_samples": 2000, "compare.methods": ["hmc", "npe_cl"],
                   "simulation.pdims": "2x2", "cosmology.sigma8": 0.8, "hmc.sampler": "mclmc",
                   "lightcone.randomize": False}
    cfg = load_config("quick").with_(**got)
    assert (cfg.hmc.num_samples, cfg.hmc.sampler, cfg.simulation.pdim_tuple) == (2000, "mclmc", (2, 2))
    for bad in ("hmc", "=3", ""):
        with pytest.raises(ConfigError, match="expected KEY=VALUE"):
            parse_overrides([bad])


def test_convergence_thresholds_default_to_the_metrics_ones_and_can_be_set():
    """[compare] ess_min / r_hat_max: unset, the thresholds experiments.metrics certifies with
    (ESS >= 400, split R-hat <= 1.01); set, they survive a TOML round trip."""
    from experiments import metrics

    cfg = load_config(changed(compare={"ess_min": None, "r_hat_max": None}))
    assert (cfg.compare.ess_min, cfg.compare.r_hat_max) == (metrics.ESS_MIN, metrics.R_HAT_MAX)
    assert (metrics.ESS_MIN, metrics.R_HAT_MAX) == (400, 1.01)
    cfg = load_config(changed(compare={"ess_min": 1000, "r_hat_max": 1.05}))
    assert (cfg.compare.ess_min, cfg.compare.r_hat_max) == (1000, 1.05)
    assert load_config_text(cfg.to_toml()) == cfg


@pytest.mark.parametrize("change", [
    {},
    dict(maps={"sky": "healpix", "nside": 16, "field_deg": None, "npix": None},
         scales={"ell_max": None},
         lightcone={"observer": [1.0, 2.0, 3.5]},
         cl={"ell_edges": [2, 10.5, 30], "n_ell_bins": None, "spacing": None},
         simulation={"box_size": 300, "mesh_shape": 32, "kind": "lpt", "pdims": "2 x 4"}),
    dict(simulation={"kind": "gaussian"}, cosmology={"w0": -0.9, "wa": 0.1}, seed=12345,
         name='odd "name"\\ é\t', lightcone={"chi_max": 2000}),
])
def test_toml_round_trip(change):
    cfg = load_config(changed(**change))
    text = cfg.to_toml()
    again = load_config_text(text)
    assert again == cfg and again.to_toml() == text
    assert load_config(cfg.to_dict()) == cfg
    if change.get("simulation", {}).get("pdims"):
        assert again.simulation.pdims == "2x4"  # normalised
        assert again.maps.nside == 16 and again.cl.ell_edges == (2.0, 10.5, 30.0)
    if "name" in change:
        assert again.name == change["name"] and again.seed == 12345


def test_config_round_trips_through_a_map_file(tmp_path):
    """config -> TOML text in the map file's attributes -> load gives an equal config."""
    cfg = load_config("quick").with_(seed=7, **{"simulation.pdims": "2x2"})
    assert cfg.seed == 7 and cfg.simulation.pdims == "2x2" and cfg.name == "quick"
    bins = cfg.bins()
    shape = (bins.n_bins, cfg.maps.npix, cfg.maps.npix)
    rng = np.random.default_rng(0)
    maps = SimpleNamespace(kappa=rng.normal(size=shape), kappa_noisy=rng.normal(size=shape),
                           sigma_n=np.full(bins.n_bins, 0.02))
    path = write_maps(tmp_path / "maps.h5", maps, cfg, bins, chi_max=4939.0, observer=(100, 100, 0))
    data = read_maps(path)
    assert data.config() == cfg
    assert data.attrs["seed"] == 7 and data.attrs["Omega_c"] == cfg.cosmology.Omega_c
    assert data.attrs["sky"] == "flat" and data.attrs["npix"] == 32 and data.attrs["field_deg"] == 5.0
    np.testing.assert_array_equal(data.kappa, maps.kappa)
    np.testing.assert_array_equal(data.nz, bins.nz)
    np.testing.assert_array_equal(data.ell_edges, cfg.ell_edges())
    assert data.bins().n_bins == bins.n_bins
    assert data.cosmology() == cfg.cosmology()
    # wrong shapes never reach the disk
    bad = SimpleNamespace(kappa=np.zeros((2, 8, 8)), kappa_noisy=np.zeros((2, 8, 8)), sigma_n=np.ones(2))
    with pytest.raises(ValueError, match="expected"):
        write_maps(tmp_path / "bad.h5", bad, cfg, bins)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["maps.h5"]


def test_build_model_kinds():
    from simulators import lensing

    quick = load_config("quick")
    model = quick.build_model()
    assert type(model) is lensing.PMLensing and model.cfg.mesh_shape == (24, 24, 48)
    assert model.lightcone.chi_max == pytest.approx(quick.chi_max())
    assert model.lightcone.randomize and model.sky.npix == 32
    assert quick.cosmology() == quick.cosmology.build()
    assert type(quick.with_(**{"simulation.kind": "lpt"}).build_model()) is lensing.LPTLensing
    gauss = quick.with_(**{"simulation.kind": "gaussian"}).build_model()
    assert type(gauss) is lensing.GaussianLensing and gauss.bins.n_bins == 3


def test_configs_are_frozen_and_comparable():
    a, b = load_config("quick"), load_config(copy.deepcopy(base()), name="quick")
    assert a == b and hash(a) == hash(b)
    with pytest.raises(AttributeError):
        a.seed = 3
    assert a.with_(seed=3) != a
    assert ExperimentConfig() == load_config({})


def test_loading_does_not_start_jax():
    """The CLI picks the number of CPU devices after loading the config: loading must not start
    a JAX backend (the LSST preset's n(z) and the default depth are computed on demand)."""
    code = ("from experiments.config import load_config; from jax._src import xla_bridge as xb; "
            "c = load_config('lsst_y10').with_(**{'simulation.pdims': '2x2'}); "
            "assert not xb.backends_are_initialized(); print('ok')")
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=120)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr


def test_summary_dim_is_vmim_only():
    """compressor.summary_dim sizes the VMIM summary; the other losses (one output per
    parameter) are trained from the same section without it."""
    cfg = load_config("gaussian_check").with_(**{"compressor.summary_dim": 6})
    assert cfg.compressor.train_config("vmim").summary_dim == 6
    assert cfg.compressor.train_config("mse").summary_dim is None
    with pytest.raises(ConfigError, match="compressor.summary_dim: must be >= 1"):
        load_config("gaussian_check").with_(**{"compressor.summary_dim": 0})
