"""experiments.benchmarks.implicit's reference posterior from a file: refused, with one line
naming the section, when it belongs to another observation; accepted for the same maps run with
other execution settings; and its convergence certificate shown with it in RESULTS."""

import json

import numpy as np
import pytest

from experiments.benchmarks import implicit, render
from experiments.config import load_config
from experiments.io import Samples, read_samples, write_samples


def _reference(path, cfg):
    rng = np.random.default_rng(0)
    draws = rng.normal([0.3, 0.8], 0.05, (100, 2))
    write_samples(path, Samples(draws, ("Omega_c", "sigma8"), "hmc", config_toml=cfg.to_toml()))
    return path


@pytest.mark.parametrize("change, section", [({"seed": 1}, "seed"),
                                             ({"simulation.n_steps": 4}, "simulation"),
                                             ({"maps.npix": 16}, "maps")])
def test_a_reference_of_another_observation_is_refused(tmp_path, capsys, change, section):
    ref = _reference(tmp_path / "ref.h5", load_config("quick").with_(**change))
    with pytest.raises(SystemExit):
        implicit.main(["--config", "quick", "--work", str(tmp_path / "w"),
                       "--reference-samples", str(ref)])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"--reference-samples: its configuration's [{section}] differs" in err
    assert not (tmp_path / "w").exists()  # refused before any stage ran


def test_execution_settings_do_not_make_another_observation(tmp_path):
    cfg = load_config("quick")
    other = cfg.with_(**{"simulation.gradient": "adjoint" if cfg.simulation.gradient != "adjoint"
                         else "checkpoint", "compressor.width": 32})
    ref = _reference(tmp_path / "ref.h5", other)

    def fail(message):
        raise AssertionError(message)

    implicit._check_same_observation(read_samples(ref), cfg, fail)  # no error


def test_reference_and_reference_samples_together_are_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        implicit.main(["--config", "quick", "--reference", "exact",
                       "--reference-samples", str(tmp_path / "x.h5")])
    assert "give --reference or --reference-samples, not both" in capsys.readouterr().err


def test_an_unconverged_field_level_reference_is_flagged(tmp_path):
    entry = {"method": "hmc", "n_samples": 4000, "fom_omega_c_sigma8": 150.0, "sigma_S8": 0.09,
             "mean": {"Omega_c": 0.36, "sigma8": 0.78},
             "bias_sigma": {"Omega_c": 0.9, "sigma8": -0.7},
             "ess": {"Omega_c": 120.0, "sigma8": 300.0}, "r_hat": {"Omega_c": 1.02, "sigma8": 1.0}}
    (tmp_path / "results_implicit_ref.json").write_text(json.dumps({
        "config": "quick", "reference": "field_level", "methods": {"field_level": entry}}))
    page = render.render_page(tmp_path)
    row = next(line for line in page.splitlines() if line.startswith("| field-level reference"))
    assert row.endswith("| unconverged (ESS 120/300, R̂ 1.02) |")
