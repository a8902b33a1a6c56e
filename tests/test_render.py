"""``experiments.benchmarks.render``: the committed RESULTS.md is what the script writes from the
committed results files, ``--check`` notices a stale page, uncertified results carry their flag,
and a results file of an unknown layout renders as a key/value table instead of failing."""

import json
import shutil

import pytest

from experiments.benchmarks import render


def write(directory, name, data):
    (directory / name).write_text(json.dumps(data))


def section_of(page, name):
    """The text of the section rendered from results file ``name``."""
    start = page.index(f"Data: `{name}`.")
    end = page.find("\n## ", start)
    return page[start:] if end < 0 else page[start:end]


def test_committed_page_is_current():
    committed = (render.HERE / render.PAGE_NAME).read_text()
    assert render.render_page(render.HERE) == committed, (
        "RESULTS.md is out of date: run python -m experiments.benchmarks.render")


def test_every_committed_results_file_has_a_section():
    page = render.render_page(render.HERE)
    for path in render.HERE.glob(render.PATTERN):
        assert f"Data: `{path.name}`." in page
    assert f"]({render.NOTEBOOK_NAME})" in page


def test_check_exit_status(tmp_path):
    shutil.copy(render.HERE / "results_hmc.json", tmp_path)
    (tmp_path / render.PAGE_NAME).write_text("stale\n")
    assert render.main(["--check", "--dir", str(tmp_path)]) == 1
    assert render.main(["--dir", str(tmp_path)]) == 0
    assert render.main(["--check", "--dir", str(tmp_path)]) == 0
    (tmp_path / render.PAGE_NAME).unlink()
    assert render.main(["--check", "--dir", str(tmp_path)]) == 1


def chain(ess, r_hat, run):
    return {"sampler": "nuts", "config": "quick", "run": run, "gradients": 1000,
            "ess": dict(zip(("Omega_c", "sigma8"), ess)),
            "r_hat": dict(zip(("Omega_c", "sigma8"), r_hat)),
            "min_ess_per_1000_gradients": 1.0, "min_ess_per_hour": 10.0}


def row_of(text, marker):
    return next(line for line in text.splitlines() if marker in line)


def test_unconverged_chain_is_flagged(tmp_path):
    write(tmp_path, "results_hmc.json", [
        chain((8.7, 9.2), (1.07, 1.02), "short run"),
        chain((500.0, 399.9), (1.001, 1.002), "ess just short"),
        chain((900.0, 800.0), (1.0, 1.012), "r-hat just over"),
        chain((900.0, None), (1.003, float("nan")), "undefined diagnostics"),
        chain((900.0, 800.0), (1.003, 1.004), "long run")])
    page = section_of(render.render_page(tmp_path), "results_hmc.json")
    assert row_of(page, "short run").endswith("| unconverged (ESS 8/9, R̂ 1.07) |")
    assert row_of(page, "ess just short").endswith("| unconverged (ESS 500/399, R̂ 1.00) |")
    assert row_of(page, "r-hat just over").endswith("| unconverged (ESS 900/800, R̂ 1.012) |")
    assert row_of(page, "undefined diagnostics").endswith("| unconverged (ESS 900/—, R̂ —) |")
    assert row_of(page, "long run").endswith("| converged |")


def sampler_row(variant, ess, r_hat, reference=True):
    row = {"variant": variant, "config": "quick", "chains": 4,
           "ess": dict(zip(("Omega_c", "sigma8"), ess)),
           "r_hat": dict(zip(("Omega_c", "sigma8"), r_hat)),
           "draws_per_chain": 1000,
           "gradients_per_min_ess": 150.0, "sampling_gradients_per_min_ess": 140.0,
           "tuned": [{"L": 500.0, "step_size": 35.0}, {"L": 890.0, "step_size": 31.5}]}
    if reference:
        row.update(c2st=0.573, mean_offset_sigma=[-0.16, 0.1], std_ratio=[0.94, 0.98],
                   fom_ratio=1.09, reference="ref.h5")
    return row


def test_sampler_rows_are_flagged_and_compared(tmp_path):
    write(tmp_path, "results_samplers_quick.json", {"config": "quick", "rows": [
        sampler_row("mclmc short", (57.0, 90.0), (1.02, 1.01)),
        {**sampler_row("mclmc long", (577.0, 1066.0), (1.003, 1.001), reference=False),
         "observation_seed": 1}]})
    page = section_of(render.render_page(tmp_path), "results_samplers_quick.json")
    short = row_of(page, "mclmc short")
    assert short.endswith("| unconverged (ESS 57/90, R̂ 1.02) |")
    assert "| mclmc short | – | 4 × 1000 |" in short and "| 140 (150) |" in short
    assert "| 57, 90 | 1.02, 1.01 |" in short
    assert "| 500–890, 31.5–35.0 |" in short
    assert "| `ref.h5` | 0.573 | −0.16, +0.10 | 0.940, 0.980 | 1.09 |" in short
    assert row_of(page, "mclmc long").endswith("| – | – | – | – | – | converged |")
    assert "| mclmc long | 1 | 4 × 1000 |" in row_of(page, "mclmc long")  # observation seed


def metrics_file(converged):
    method = {"method": "hmc", "label": "Field-level HMC", "n_samples": 100, "n_chains": 2,
              "names": ["Omega_c", "sigma8"],
              "params": {"Omega_c": {"mean": 0.3, "std": 0.05},
                         "sigma8": {"mean": 0.8, "std": 0.06}},
              "fom": {"Omega_c,sigma8": 1739.0}, "S8": {"mean": 0.8, "std": 0.02},
              "draws": {"ess": {"Omega_c": 8.0, "sigma8": 9.5}, "r_hat": {"Omega_c": 1.07,
                                                                         "sigma8": 1.3}},
              "converged": converged, "calibration": None}
    npe = {"method": "npe_vmim", "label": "NPE (VMIM)", "n_samples": 1000, "n_chains": 1,
           "names": ["Omega_c", "sigma8"],
           "params": {"Omega_c": {"mean": 0.3, "std": 0.1}, "sigma8": {"mean": 0.8, "std": 0.1}},
           "fom": {"Omega_c,sigma8": 100.0}, "S8": {"mean": 0.8, "std": 0.03},
           "converged": True, "calibration": None}
    return {"format": "lensbench.metrics", "format_version": 1,
            "methods_order": ["hmc", "npe_vmim"], "truth": {"Omega_c": 0.2664, "sigma8": 0.831},
            "methods": {"hmc": method, "npe_vmim": npe},
            "convergence": {"ess_min": 400, "r_hat_max": 1.01}, "c2st": None, "warnings": []}


def test_compare_metrics_flags(tmp_path):
    write(tmp_path, "results_demo.json", metrics_file(converged=False))
    page = section_of(render.render_page(tmp_path), "results_demo.json")
    assert row_of(page, "Field-level HMC").endswith("| unconverged (ESS 8/9, R̂ 1.30) |")
    assert "| 1739 |" in row_of(page, "Field-level HMC")  # the number, next to its flag
    assert row_of(page, "NPE (VMIM)").endswith("| uncalibrated (no held-out calibration) |")

    unconverged_ref = metrics_file(converged=False)
    unconverged_ref["fom_ratio"] = {"reference": "hmc", "values": {
        "hmc": {"Omega_c,sigma8": 1.0}, "npe_vmim": {"Omega_c,sigma8": 0.06}}}
    write(tmp_path, "results_demo.json", unconverged_ref)
    page = section_of(render.render_page(tmp_path), "results_demo.json")
    assert "| / hmc (unconverged) |" in page

    write(tmp_path, "results_demo.json", metrics_file(converged=True))
    page = section_of(render.render_page(tmp_path), "results_demo.json")
    assert "unconverged" not in row_of(page, "Field-level HMC")


def test_implicit_layout_flags_uncalibrated_npe_and_short_cl_chain(tmp_path):
    npe = {"method": "npe_mse", "n_train": 500, "fom_omega_c_sigma8": 70.0, "sigma_S8": 0.15,
           "mean": {"Omega_c": 0.3, "sigma8": 0.8}, "bias_sigma": {"Omega_c": 0.5, "sigma8": -0.1},
           "c2st_vs_reference": 0.6}
    cal = {"tarp_atc": -0.02, "tarp_ks_pval": 1.0, "n_test": 100,
           "sbc_ks_pvals": {"Omega_c": 0.3, "sigma8": 0.004}}
    cl = {"method": "cl_analytic", "n_samples": 400, "fom_omega_c_sigma8": 90.0, "sigma_S8": 0.1,
          "mean": {"Omega_c": 0.3, "sigma8": 0.8}, "bias_sigma": {"Omega_c": 0.1, "sigma8": 0.0},
          "ess": {"Omega_c": 46.2, "sigma8": 89.0}, "r_hat": {"Omega_c": 1.027, "sigma8": 1.01},
          "c2st_vs_reference": 0.76}
    write(tmp_path, "results_implicit_new.json", {
        "config": "quick", "reference": "npe_cl_n500",
        "methods": {"npe_mse_n500": npe,
                    "npe_cl_n500": {**npe, "method": "npe_cl", "calibration": cal},
                    "cl_analytic": cl}})
    page = section_of(render.render_page(tmp_path), "results_implicit_new.json")
    uncalibrated = "| uncalibrated (no held-out calibration) |"
    assert row_of(page, "NPE on MSE summaries").endswith(uncalibrated)
    assert row_of(page, "NPE on C_ℓ").endswith("| miscalibrated σ_8 (SBC KS p 0.004) |")
    assert "(reference)" in row_of(page, "NPE on C_ℓ")
    assert row_of(page, "analytic C_ℓ").endswith("| unconverged (ESS 46/89, R̂ 1.03) |")
    # FoM over the reference's (70), or over a row's own exact posterior where it records one
    assert "| FoM / npe_cl_n500 |" in page
    assert "| 90.0 | 1.29 |" in row_of(page, "analytic C_ℓ")
    write(tmp_path, "results_implicit_new.json", {
        "config": "gaussian_check", "reference": "exact",
        "methods": {"exact": {**npe, "method": "exact", "fom_omega_c_sigma8": 400.0},
                    "npe_mse_n500": npe,
                    "npe_mse_s1": {**npe, "method": "seed 1", "exact_fom_omega_c_sigma8": 80.0}}})
    page = section_of(render.render_page(tmp_path), "results_implicit_new.json")
    assert "| 70.0 | 0.17 |" in row_of(page, "NPE on MSE summaries")
    assert "| 70.0 | 0.88 |" in row_of(page, "seed 1")


def test_unknown_layout_renders_a_key_value_table(tmp_path):
    write(tmp_path, "results_new_benchmark.json", {
        "alpha": 1.23456, "label": "x", "nested": {"beta": [1, 2, 3], "gamma": None},
        "long": list(range(20)),
        "chain": {"ess": {"Omega_c": 12.0}, "r_hat": {"Omega_c": 1.2}}})
    page = render.render_page(tmp_path)
    assert "## 1. new benchmark" in page
    text = section_of(page, "results_new_benchmark.json")
    assert "| key | value |" in text
    assert "| `alpha` | 1.23 |" in text
    assert "| `label` | x |" in text
    assert "| `nested.beta` | [1, 2, 3] |" in text
    assert "| `nested.gamma` | null |" in text
    assert "| `long` | 20 numbers, 0 to 19 |" in text
    assert "| `chain` | unconverged (ESS 12, R̂ 1.20) |" in text


def test_known_name_with_another_layout_falls_back_to_the_generic_table(tmp_path):
    write(tmp_path, "results_pm.json", {"something": "else"})
    text = section_of(render.render_page(tmp_path), "results_pm.json")
    assert "did not fit this file" in text
    assert "| `something` | else |" in text


@pytest.mark.parametrize("value, text", [(0.023997, "0.0240"), (5.0, "5.00"), (656.79, "657"),
                                         (14977.2, "14977"), (None, "–"), (float("nan"), "–"),
                                         (3, "3")])
def test_number_format(value, text):
    assert render.num(value) == text


def test_superseded_file_points_at_its_replacement_without_a_table(tmp_path):
    for name in ("results_implicit.json", "results_implicit_losses.json"):
        shutil.copy(render.HERE / name, tmp_path)
    page = render.render_page(tmp_path)
    old = section_of(page, "results_implicit.json")
    assert "**Superseded** by `results_implicit_losses.json` (section 1)." in old
    assert "| method |" not in old and "NOTEBOOK.md section 6" in old
    assert "| method |" in section_of(page, "results_implicit_losses.json")


def test_scaling_shows_the_baseline_commit_beside_ours():
    def cell(temp):
        return {"n": 32, "xla_temp_mb": temp, "peak_rss_mb": 100.0, "median_s": 1.0,
                "all_s": [1.0]}

    memory = [{"steps": 5, "forward": cell(10.0), "adjoint": cell(20.0), "checkpoint": cell(30.0)}]
    data = {"memory": memory,
            "baseline": {"commit": "abc1234", "memory": [{"steps": 5, "adjoint": cell(31.0)}]}}
    text = "\n".join(render.render_scaling(data, None))
    assert "grad, reverse adjoint at abc1234" in text
    row = next(line for line in text.splitlines() if line.startswith("| 5 |"))
    assert row.rstrip(" |").endswith("3.10")  # the baseline's adjoint / our forward
    assert "| 2.00 |" in row  # ours
    without = "\n".join(render.render_scaling({"memory": memory}, None))
    assert "reverse adjoint at" not in without


def test_cl_likelihood_rows_against_exact_are_flagged(tmp_path):
    def row(variant, seed, ess, r_hat):
        return {"seed": seed, "variant": variant, "fom": 600.0, "fom_exact": 650.0,
                "fom_ratio": 600.0 / 650.0, "mean_offset_sigma": [0.02, -0.1],
                "std_ratio": [1.04, 1.03], "c2st": 0.51, "names": ["Omega_c", "sigma8"],
                "ess": {"Omega_c": ess, "sigma8": 700.0}, "r_hat": {"Omega_c": r_hat,
                                                                    "sigma8": 1.001}}
    write(tmp_path, "results_cl_gaussian_check_likelihoods.json", {
        "config": "gaussian_check",
        "rows": [row("wishart", 0, 650.0, 1.002), row("wishart", 1, 150.0, 1.03)],
        "summary": {"wishart": {"fom_ratio_mean": 0.923, "c2st_mean": 0.51, "seeds": [0, 1]}}})
    page = section_of(render.render_page(tmp_path), "results_cl_gaussian_check_likelihoods.json")
    assert ("| wishart | 0 | 600 | 650 | 0.923 | +0.02, −0.10 | 1.04, 1.03 | 0.510 | 650, 700 "
            "| 1.00, 1.00 | converged |") in page
    assert "| wishart | 1 | 600 |" in page and "unconverged (ESS 150/700, R̂ 1.03) |" in page
    assert "| wishart | 0, 1 | 0.923 | 0.510 |" in page
