"""Write ``experiments/benchmarks/RESULTS.md`` from the committed ``results_*.json`` files.

    python -m experiments.benchmarks.render           # rewrite RESULTS.md
    python -m experiments.benchmarks.render --check   # exit 1 when RESULTS.md is out of date

The page holds the current measurements only, each table computed from its data file, so that a
number on the page is the number in the file and a rerun of a benchmark updates the page by
rerunning this script. ``NOTEBOOK.md`` keeps the chronological record (investigations, negative
results, superseded tables) in prose; this page links to it for the reasoning.

A result that is not certified is flagged where it is shown, never printed bare: an MCMC method
whose file records ESS and split R̂ fails below ``ESS_MIN`` or above ``R_HAT_MAX`` (the thresholds
of ``lensbench compare``), and an NPE without a calibration on held-out simulations is marked
uncalibrated. A data file this script does not know is rendered as a key/value table instead of
failing, so adding a benchmark never breaks the page.

What the files do not record (the command, date, commit and machine of most of them, and the
caveats a later change put on them) lives in ``SOURCES``, taken from the notebook section that
first reported each file.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

from experiments.config import ESS_MIN, R_HAT_MAX
from experiments.metrics import unconverged_note, unconverged_reference

HERE = Path(__file__).resolve().parent
PAGE_NAME = "RESULTS.md"
NOTEBOOK_NAME = "NOTEBOOK.md"
PATTERN = "results_*.json"

# An SBC rank KS p-value below this marks a marginal as miscalibrated: with 100 held-out
# simulations, p < 0.01 is what the notebook (6b, 6c) read as a real miscalibration rather than
# noise.
SBC_P_MIN = 0.01

PARAM_NAMES = {"Omega_c": "Ω_c", "sigma8": "σ_8", "S8": "S_8", "Omega_m": "Ω_m", "Omega_b": "Ω_b",
               "h": "h", "n_s": "n_s", "w0": "w_0", "wa": "w_a"}

MCMC_METHODS = ("hmc", "cl_analytic")


@dataclass(frozen=True)
class Source:
    """What a results file does not say about itself: the section title, what was measured, the
    command, when/where it ran, the notebook section with the discussion, and any caveat a later
    change put on it. ``superseded_by`` names the file that replaced it (then no table is shown)."""

    title: str
    what: str
    command: str
    recorded: str
    notebook: str
    caveat: str = ""
    superseded_by: str = ""


VM = "the project's 2-core x86-64 VM, no GPU"

SOURCES: dict[str, Source] = {
    "results_pm.json": Source(
        title="Particle mesh: lensbench against JaxPM 0.1.6",
        what="Median time of the compiled call (after compilation and one warm-up call) and the "
             "process's peak RSS (compilation included), each measurement in a fresh process, the "
             "two codes alternating. `forward` = white noise → CIC density (2LPT at a = 0.1, 10 PM "
             "steps to a = 1); `gradient` = ∂Σρ²/∂(Ω_c, white noise) in one reverse pass "
             "(lensbench: "
             "reverse adjoint; JaxPM: diffrax with `max_steps=10`); `pm_forces` = one force "
             "evaluation; FFT floor = 1 rfftn + 3 irfftn in each code's own JAX.",
        command="bash experiments/benchmarks/setup_peer.sh\n"
                ".venv/bin/python experiments/benchmarks/run_pm.py --sizes 32,64,128 "
                "--repeats 5 \\\n"
                "    --peer-args '--max-steps 10' --wait-quiet 60 --retry-busy 1",
        recorded=VM + "; lensbench on jax 0.10.2, JaxPM 0.1.6 on jax 0.6.2 in its own `.venv-peer`",
        notebook="1"),
    "results_scaling.json": Source(
        title="Gradient memory against the number of steps, and weak scaling on fake devices",
        what="At 128³: the XLA temporary-buffer size of the compiled program (its working set, "
             "`compiled.memory_analysis()`), the process's peak RSS and the time, for the forward "
             "and for the gradient by reverse adjoint and by autodiff with a checkpoint per step. "
             "Then 64³ cells per device on D fake CPU devices "
             "(`--xla_force_host_platform_device_count`), which share the machine's 2 cores: this "
             "tests the distributed path's overhead, not real scaling (ideal time grows like D/2).",
        command=(".venv/bin/python experiments/benchmarks/run_scaling.py --n 128 --repeats 1\n"
                 "    # the baseline column: the same script in a worktree of ae415ab, --devices 1"),
        recorded="memory: 2026-12-07, git 08477eb and its parent ae415ab (the baseline columns), "
                 + VM + ", one core (`taskset -c 0`) each, a compressor training on the other "
                 "(and, for the baseline's 40-step row, two chains on both cores: its times are "
                 "not comparable); weak scaling: 2026-11-25, git ef03a97, both cores",
        notebook="2, 3 and 31"),
    "results_lensing.json": Source(
        title="Lensing maps: time and memory of one κ map",
        what="`forward` = white noise → noise-free tomographic κ maps (linear field, 2LPT, PM "
             "steps with the lightcone projected on the fly); `grad` = ∂Σκ²/∂(all cosmological "
             "parameters, white noise) in one reverse pass. Median of 3 calls after a warm-up (1 "
             "for lsst_y10), compile time separately; XLA's temporary-buffer size and the "
             "process's peak RSS; each case in a fresh process. Shells = radial slices in total.",
        command=".venv/bin/python -m experiments.benchmarks.lensing_maps",
        recorded="2026-11-26, code of git 426e7d6",
        notebook="4",
        caveat="These timings predate the fixed radial sample positions of the lightcone "
               "(NOTEBOOK 7b: the same number of samples per step) and have not been re-measured."),
    "results_cl_validation.json": Source(
        title="Lensing maps: PM κ C_ℓ against Limber + halofit",
        what="Noise-free tomographic κ maps from PM lightcones (randomised box replicas), their "
             "auto- and cross-spectra averaged over seeds, against Limber with halofit P(k), both "
             "binned over the same FFT modes: with the mesh window Π sinc⁸(k_iΔ/2) of CIC "
             "painting + trilinear reading (the comparison that validates the maps), and "
             "without it (the range of ℓ this cell size resolves). The sampling error is the "
             "Gaussian relative error of the seed mean from the number of modes.",
        command=".venv/bin/python -m experiments.validation.cl_pm_vs_theory --mesh 64 64 256 "
                "--bins 5 \\\n"
                "    --seeds 4 --deconvolve \\\n"
                "    --out experiments/benchmarks/results_cl_validation.json",
        recorded="2026-11-26, git 426e7d6",
        notebook="5",
        caveat="These spectra predate the fixed radial sample positions of the lightcone "
               "(NOTEBOOK 7b: the same number of samples per step) and have not been re-measured; "
               "the test suite checks a smaller version of the same comparison "
               "(tests/test_lensing_maps.py)."),
    "results_cl_lsst_y10.json": Source(
        title="Lensing maps: lsst_y10's κ C_ℓ against the raw Limber + halofit theory",
        what="The shipped `lsst_y10` setting (one 400×400×4000 Mpc/h box of 64×64×256 cells, "
             "randomised replicas, 20 PM steps): noise-free maps of three seeds, their spectra "
             "divided by Limber + halofit from the maps' own n(z) without any mesh window, i.e. "
             "the fraction of the true lensing power the maps hold.",
        command=".venv/bin/python -m experiments.validation.cl_maps --config lsst_y10 --seeds 3 "
                "\\\n    --maps-dir runs/cl_lsst_y10 --ell-range 300 1000 "
                "--out experiments/benchmarks/results_cl_lsst_y10.json",
        recorded="2026-12-06, " + VM,
        notebook="13"),
    "results_cl_lsst_y10_window.json": Source(
        title="Lensing maps: lsst_y10 against the mesh-windowed theory (its [scales])",
        what="The same three lsst_y10 maps against Limber + halofit times the window of CIC "
             "painting and trilinear reading on 6.25 Mpc/h cells, the theory `lensbench cl` and "
             "the C_ℓ likelihood use for these maps. The configuration's [scales] ell_max per "
             "bin is where this ratio stays within 10% + 2 standard errors (above it the maps "
             "carry aliased power).",
        command=".venv/bin/python -m experiments.validation.cl_maps runs/cl_lsst_y10/*.h5 "
                "--window \\\n    --out experiments/benchmarks/results_cl_lsst_y10_window.json",
        recorded="2026-12-06, " + VM,
        notebook="13"),
    "results_cl_quick_window.json": Source(
        title="Lensing maps: quick against the mesh-windowed theory (its [scales])",
        what="Four quick maps (8.3 Mpc/h cells, 5° field, three bins) against Limber + halofit "
             "times the mesh window; quick's [scales] ell_max per bin is where the ratio stays "
             "within 10% + 2 standard errors.",
        command=".venv/bin/python -m experiments.validation.cl_maps --config quick --seeds 4 "
                "--window \\\n    --maps-dir runs/cl_quick "
                "--out experiments/benchmarks/results_cl_quick_window.json",
        recorded="2026-12-06, " + VM,
        notebook="13"),
    "results_cl_hires_patch.json": Source(
        title="Lensing maps: the resolved lightcone (hires_patch) against Limber + halofit",
        what="`hires_patch`: five shell boxes (cells 0.5–2.6 Mpc/h, 25.3M cells, 109 PM steps in "
             "all, compensated reads) on a 2.03° field at 2.34′ pixels, sources to χ = 3600 "
             "Mpc/h. Fixed-amplitude white noise (random phases) in every shell, meant to remove "
             "the scatter of the 3-D mode amplitudes, barely narrows the errors on this 2° field "
             "(NOTEBOOK 13); the theory is the raw Limber + halofit (no mesh window). The resolution target of issue 27: within 10% for ℓ ∈ [300, "
             "1000] in bins 2–5 and [300, 600] in bin 1.",
        command=".venv/bin/python -m experiments.validation.cl_maps --config hires_patch "
                "--seeds 4 --fixed \\\n    --maps-dir runs/cl_hires_fixed "
                "--out experiments/benchmarks/results_cl_hires_patch.json",
        recorded="2026-12-06, " + VM + "; about 2 minutes per map",
        notebook="13"),
    "results_cl_hires_patch_random.json": Source(
        title="Lensing maps: hires_patch with random white noise",
        what="The same four seeds as `lensbench maps --config hires_patch --seed s` makes them "
             "(random amplitudes): the scatter of a 2° field between realisations.",
        command="for s in 0 1 2 3; do lensbench maps --config hires_patch --seed $s --out "
                "s$s.h5; done\n"
                ".venv/bin/python -m experiments.validation.cl_maps s0.h5 s1.h5 s2.h5 s3.h5 "
                "\\\n    --out experiments/benchmarks/results_cl_hires_patch_random.json",
        recorded="2026-12-06, " + VM,
        notebook="13"),
    "results_pk_box.json": Source(
        title="PM matter power against halofit: box size and cell size",
        what="What a shell box of the resolved lightcone loses: cubic boxes of 64–256 Mpc/h with "
             "1 and 0.5 Mpc/h cells (as many particles as cells, CIC-compensated force), run "
             "from a = 0.2 to a = 0.8 (z = 0.25, where bins 1–3 take most of their lensing "
             "weight) with the hires configurations' step size; the CIC-deconvolved density "
             "spectrum over halofit, averaged over the seeds.",
        command=".venv/bin/python -m experiments.validation.pk_box "
                "--out experiments/benchmarks/results_pk_box.json",
        recorded="2026-12-06, " + VM,
        notebook="13"),
    "results_hmc.json": Source(
        title="Field-level HMC: gradient cost and short chains on quick",
        what="Gradient rows: time per gradient of the field-level log density (each mode in its "
             "own process), compile + first call, peak RSS. Chain rows: ESS, split R̂ and ESS per "
             "gradient of NUTS and MCLMC on the quick observation.",
        command="python -m experiments.benchmarks.hmc grads --config quick --evals 10\n"
                "python -m experiments.benchmarks.hmc grads --config lsst_y10 --mesh 32,32,128 "
                "--evals 2\n"
                "python -m experiments.benchmarks.hmc chains --config quick --maps obs.h5 "
                "--samplers nuts,mclmc --mclmc 500,2500 \\\n"
                "    --out experiments/benchmarks/results_hmc.json   "
                "# the 200 + 700 row: the hmc stage of `lensbench compare`",
        recorded="2026-11-26/27, " + VM + ", shared with the test suite or `compare` during "
                 "each run (wall times high by up to about 2×)",
        notebook="7b",
        caveat="The gradient timings are superseded by the side-by-side measurements against "
               "the parent commit and the FFT floor in NOTEBOOK 7l, 10, 19 and 25 (latest, "
               "2026-12-07, one core: quick 64 → 46 ms per adjoint gradient, 0.94 FFT floors; "
               "reduced lsst_y10 3.9 → 3.7 s; not in a results file); the peak memory here is the "
               "latest. "
               "None of the chains is converged; NOTEBOOK 7k has longer MCLMC chains on the same "
               "observation (not in a results file)."),
    "results_hmc_coverage.json": Source(
        title="Calibration of field-level HMC against the exact posterior (Gaussian-field maps)",
        what="θ drawn from the LSST-Y10 prior (Ω_c, σ_8), maps simulated at θ, then `lensbench "
             "hmc` and the exact grid posterior (`lensbench exact`, the field marginalised "
             "analytically) on each: SBC ranks of the truth (HMC draws thinned to about one per "
             "effective sample), coverage of the central 68 % and 95 % intervals, and per "
             "observation z = (HMC mean − exact mean) / (HMC std / √ESS).",
        command="",  # built from the file's own config and overrides
        recorded="2026-11-27, " + VM + ", both cores shared with the test suite; exact posteriors "
                 "recomputed after the grid fix of 38e733a",
        notebook="7f"),
    "results_samplers_gaussian_check.json": Source(
        title="Field-level samplers on `gaussian_check` against the exact posterior: MCLMC at "
              "energy variance 2×10⁻⁵ (velocity Verlet, McLachlan), NUTS and MAMS",
        what="MCLMC with the Fourier field preconditioner at energy variance 2×10⁻⁵ (the setting "
             "of the quick posteriors in the next section), 4 chains, on `gaussian_check` "
             "(Gaussian-field maps), with blackjax's isokinetic velocity Verlet (1 gradient per "
             "step) and McLachlan (`hmc.integrator = \"mclachlan\"`, 2 per step), against the "
             "exact grid posterior of each observation: ESS and split R̂, sampling gradients per "
             "effective sample of the slowest parameter (with the warm-up in brackets), the tuned "
             "L and step, C2ST (2000 draws each), mean offsets in exact σ, std ratios and FoM "
             "ratio; NUTS (tree depth ≤ 6) with the same preconditioner, the unbiased "
             "baseline; and MAMS (`hmc.sampler = \"mams\"`, Metropolis-adjusted, with its L "
             "stage) with the same preconditioner. The issue's rule for an adopted sampler: "
             "C2ST ≤ 0.55 and offsets ≤ 0.1 σ.",
        command="python -m experiments.benchmarks.samplers --config gaussian_check --reference "
                "exact --chains 4 --work runs/gc42 \\\n"
                "    --variant mclmc+fourier:energy_variance=2e-5,num_warmup=2000,"
                "num_samples=16000,segment=2000,processes=2 \\\n"
                "    --variant mclmc+fourier:integrator=mclachlan,energy_variance=2e-5,"
                "num_warmup=2000,num_samples=8000,segment=2000,processes=2 \\\n"
                "    --out experiments/benchmarks/results_samplers_gaussian_check.json\n"
                "lensbench maps --config gaussian_check --seed 1 --out runs/gc43_s1/obs.h5\n"
                "python -m experiments.benchmarks.samplers --config gaussian_check --reference "
                "exact --chains 4 --work runs/gc43_s1 \\\n"
                "    --maps runs/gc43_s1/obs.h5 --variant mclmc+fourier:integrator=mclachlan,"
                "energy_variance=2e-5,num_warmup=2000,num_samples=8000,segment=2000,processes=2 "
                "\\\n    --out gc_s1.json   # its row appended to this file\n"
                "python -m experiments.benchmarks.samplers --config gaussian_check --reference "
                "exact --chains 4 --work runs/gc42 \\\n"
                "    --variant nuts+fourier:num_warmup=300,num_samples=400,segment=100,"
                "processes=2 --out gc_nuts.json   # appended\n"
                "python -m experiments.benchmarks.samplers --config gaussian_check --reference "
                "exact --chains 4 --work runs/gcmams \\\n"
                "    --variant mams+fourier:num_warmup=1000,num_samples=600,segment=200,"
                "processes=2 --out gc_mams.json   # appended",
        recorded="2026-12-07, " + VM + ", both cores (two chains per process): velocity Verlet "
                 "1490 s, McLachlan 1714 s (seed 0) and 1498 s (seed 1), each with a few "
                 "minutes of tests on one core beside it, NUTS 1337 s with nothing beside it; "
                 "the first row's `wall_s` is the "
                 "benchmark's resume of the finished run; MAMS in two sittings (chains 0–1 "
                 "beside tests and CI, chains 2–3 with both processes on one core beside "
                 "benchmarks and test runs), so its wall time says nothing",
        caveat="Velocity Verlet is converged but not unbiased by the issue's rule: σ_8's mean "
               "0.13 σ low (Monte Carlo error 0.034 σ). McLachlan at the same energy variance "
               "meets it on both observation seeds (C2ST 0.512 and 0.523, offsets ≤ 0.09 σ), "
               "but σ_8 comes out low on both (−0.06 and −0.09 σ, ± 0.035 each): a residual "
               "bias of ~0.07 σ, inside the rule's 0.1 σ. NUTS (unbiased, offsets ≤ 0.01 σ) is "
               "the cheapest here, 47 sampling gradients per ESS; on quick it needed ~1300 "
               "(NOTEBOOK 20). MAMS meets the rule (C2ST 0.505, offsets ≤ 0.06 σ) at 73 "
               "sampling gradients per ESS, but its warm-up took 12.8k–40k gradients per chain "
               "(the L stage), and on quick it barely moved Ω_c (NOTEBOOK 34).",
        notebook="28 (velocity Verlet), 29 (McLachlan), 33 and 39 (MAMS)"),
    "results_samplers_quick.json": Source(
        title="A converged quick field-level posterior: MCLMC (McLachlan) at energy variance "
              "2×10⁻⁵",
        what="MCLMC with the Fourier field preconditioner at energy variance 2×10⁻⁵ with the L "
             "stage of NOTEBOOK 28 (2000 warm-up steps, half of them measuring L) on the quick "
             "observation (seed 0), 4 chains: velocity Verlet × 20,000 draws "
             "(`reference_quick_field_level_ev2e-5.h5`, compared with the 10⁻⁴ reference "
             "`reference_quick_field_level.h5`) and McLachlan × 8,000 "
             "(`reference_quick_field_level_mclachlan.h5`, the project's quick reference "
             "posterior, compared with the velocity-Verlet one). C2ST, offsets in the reference's "
             "σ, std ratios, FoM ratio. The issue's target: an unbiased sampler at ≤ 150 "
             "gradients per effective sample, 4 chains at ESS ≥ 400 and split R̂ ≤ 1.01 within "
             "an hour on the 2 cores.",
        command="lensbench maps --config quick --out obs.h5\n"
                "lensbench hmc --config quick --maps obs.h5 --out runs/sq42/mclmc_fourier_"
                "energy_variance2e-5_num_warmup2000_num_samples20000_segment500_processes2 \\\n"
                "    --set hmc.sampler=mclmc --set hmc.precondition=fourier "
                "--set hmc.energy_variance=2e-5 --set hmc.num_warmup=2000 \\\n"
                "    --set hmc.num_samples=20000 --set hmc.num_chains=4 --set hmc.processes=2 "
                "--set hmc.segment=500\n"
                "python -m experiments.benchmarks.samplers --config quick --maps obs.h5 --chains 4 "
                "--work runs/sq42 \\\n"
                "    --reference experiments/benchmarks/reference_quick_field_level.h5 \\\n"
                "    --variant mclmc+fourier:energy_variance=2e-5,num_warmup=2000,"
                "num_samples=20000,segment=500,processes=2 --out quick_vv.json\n"
                "python -m experiments.benchmarks.samplers --config quick --maps obs.h5 --chains 4 "
                "--work runs/sq43 \\\n"
                "    --reference experiments/benchmarks/reference_quick_field_level_ev2e-5.h5 "
                "\\\n"
                "    --variant mclmc+fourier:integrator=mclachlan,energy_variance=2e-5,"
                "num_warmup=2000,num_samples=8000,segment=500,processes=2 --out quick_mcl.json\n"
                "cp runs/sq43/mclmc_fourier_integratormclachlan_energy_variance2e-5_num_warmup2000_"
                "num_samples8000_segment500_processes2/samples.h5 \\\n"
                "    experiments/benchmarks/reference_quick_field_level_mclachlan.h5\n"
                "python -m experiments.benchmarks.samplers --config quick --chains 4 "
                "--work runs/s46/qnuts \\\n"
                "    --reference experiments/benchmarks/reference_quick_field_level_mclachlan.h5 "
                "\\\n"
                "    --variant nuts+fourier:num_warmup=150,num_samples=150,max_tree_depth=6,"
                "segment=25,processes=1 --out quick_nuts.json\n"
                "# the three files' rows, in this order, are results_samplers_quick.json",
        recorded="2026-12-07/08, " + VM + ". NUTS (2026-12-08): one core (`taskset -c 1`), 3750 s "
                 "for the four chains one after another, beside C_ℓ calibration runs and tests "
                 "on the other core. MCLMC: both cores (two chains per process). Velocity Verlet: "
                 "47 min 23 s from the start field to the samples file, run as 10,000 draws per "
                 "chain and then extended to 20,000 (the same draws), beside a niced test run "
                 "and a `make venv` for a few minutes; its `wall_s` is the benchmark's resume of "
                 "the finished run. McLachlan: 2101 s (35 min) for the whole benchmark run, start "
                 "field and compilation included, with a few compile-only memory probes on one "
                 "core beside it for ~2 minutes",
        notebook="28 (velocity Verlet), 29 (McLachlan) and 41 (NUTS)",
        caveat="The velocity-Verlet row's sampler is not certified unbiased (previous section); "
               "the McLachlan row's meets the issue's rule on `gaussian_check`. The NUTS row "
               "(unbiased, the same preconditioner, 70,048 gradients in all against McLachlan's "
               "80,020) is far from converged: the comparison at a like budget (NOTEBOOK 41)."),
    "results_gaussian_check.json": Source(
        title="Every method against the exact posterior: full-size `gaussian_check`",
        what="`lensbench compare` on the shipped `gaussian_check` (Gaussian-field maps, 2 bins of "
             "32² pixels over 5°, LSST-Y10 prior on Ω_c, σ_8; 2000 training simulations; NUTS "
             "2 × (300 + 500), tree depth ≤ 6): posterior means ± std, FoM(Ω_c, σ_8) = "
             "1/√det Cov, and C2ST (sklearn MLP, 5 folds) against the exact grid posterior.",
        command="lensbench compare --config gaussian_check --out /tmp/hp/gc/results\n"
                "cp /tmp/hp/gc/results/metrics.json "
                "experiments/benchmarks/results_gaussian_check.json",
        recorded="2026-11-26/27, " + VM + ", the other core busy throughout; the HMC stage resumed "
                 "across two sessions",
        notebook="7g",
        caveat="The file predates the convergence certificate of `metrics.json` (no ESS or R̂ "
               "stored); the run's diagnostics, copied into NOTEBOOK 7g, gave the HMC chains ESS "
               "693 / 778 and split R̂ ≤ 1.003. `gaussian_check`'s C_ℓ likelihood has since "
               "changed "
               "(analytic covariance, 24 linear ℓ bins: NOTEBOOK 8, ≥ 0.9× the exact FoM on "
               "average), so the cl_analytic row and the ratios to it are those of the old "
               "settings (simulated covariance, 8 log bins). The NPE rows are the old recipe's: "
               "section 21 has every implicit method and the C_ℓ likelihood with the current "
               "one, on four observation seeds."),
    "results_implicit_online.json": Source(
        title="Online-trained VMIM compressors on gaussian_check against the exact posterior",
        what="`gaussian_check` (Gaussian-field maps, 2 bins of 32² pixels over 5°, LSST-Y10 "
             "prior on Ω_c, σ_8), observation seed 0. VMIM compressors trained online (fresh "
             "maps from the prior in every batch, `compressor.online`), validated on the first "
             "1900 of 2000 fixed simulations; sbi NSF NPE on 4 noise copies of those 1900; "
             "calibration on the last 100. C2ST against the exact grid posterior. Each row's "
             "compressor settings are in its label; `compressor_flow_fom_at_observation` in the "
             "JSON is the FoM of the compressor's own flow q(θ | t_obs) on a grid. Before (fixed "
             "1900 maps, CNN width 8, NOTEBOOK 7g): FoM 237, C2ST 0.745.",
        command=".venv/bin/python -m experiments.benchmarks.implicit --config gaussian_check "
                "--work runs/gc_v4 \\\n"
                "    --n-train 1900 --losses vmim --reference exact --skip-cl \\\n"
                "    --set compressor.online=true --set compressor.network='\"resnet\"' "
                "--set compressor.width=16 \\\n"
                "    --set compressor.batch_size=32 --set compressor.summary_dim=6 "
                "--set compressor.epochs=60 \\\n"
                "    --set compressor.patience=15 --set compressor.ema=0.99   "
                "# the last row; the others drop keys",
        recorded="2026-12-06, " + VM + ", one run at a time (a test run or a short script "
                 "shared the cores part of the time)",
        notebook="12"),
    "results_implicit_gaussian_optimum.json": Source(
        title="VMIM on gaussian_check at the exact posterior: the flow's width and the steps",
        what="`gaussian_check`, observation seed 0 unless the label says, against the exact grid "
             "posterior of the same observation. VMIM "
             "compressors on the maps' band powers (`network = \"power\"`) or a ResNet with "
             "them (`power_bands`), their flow q(θ | t) 32 or 128 units wide, trained online "
             "(1900 fixed maps validate) or on 10,000 fixed maps with fresh noise in every batch "
             "(epochs × steps × batch in each label); NPE: sbi NSF on 4 noise copies of the "
             "training summaries, or the compressor's own flow (last row). Calibration on the "
             "last 100 of the simulations: 2000 in the online rows, 10,100 in the last two. Each row's keys: `overrides` in the JSON.",
        command=".venv/bin/python -m experiments.benchmarks.implicit --config gaussian_check "
                "--work runs/g22x \\\n"
                "    --n-train 10000 --losses vmim --reference exact --skip-cl \\\n"
                "    --set compressor.network='\"power\"' --set compressor.power_bands=32 "
                "--set compressor.flow_hidden=128 \\\n"
                "    --set compressor.online=false --set compressor.batch_size=128 "
                "--set compressor.epochs=100 --set compressor.patience=20   # row g22x",
        recorded="2026-12-07, " + VM + ", one run per core, at most two at a time",
        notebook="22"),
    "results_gaussian_check_methods.json": Source(
        title="Every method against the exact posterior on gaussian_check, four observation seeds",
        what="The shipped `gaussian_check` (Gaussian-field maps, 2 bins of 32² pixels over 5°, "
             "LSST-Y10 prior on Ω_c, σ_8): 10,100 simulations, the last 100 held out for "
             "SBC/TARP. Band-power compressors (`network = \"power\"`, 128-wide VMIM flow, "
             "≤ 100 epochs of 70 steps of 128 maps, fresh noise in every batch) trained with "
             "each loss; NPE: sbi MAF on 4 noise copies of the summaries, except VMIM, whose "
             "own flow is the posterior (`npe.vmim_flow`); NPE on the 72-number C_ℓ vector "
             "(MAF); the analytic C_ℓ likelihood (analytic Gaussian covariance, 24 linear ℓ "
             "bins, NUTS 2 × 1000). Seeds 1–3: the same fitted posteriors (and a new C_ℓ chain) on other observations, each row against "
             "its own observation's exact posterior (its FoM in the label; C2ST against it). "
             "The issue's targets: NPE on compressed summaries ≥ 0.9× the exact FoM with C2ST ≤ "
             "0.60, analytic C_ℓ ≥ 0.9× with C2ST ≤ 0.60, NPE on C_ℓ ≥ 0.85×.",
        command=".venv/bin/python -m experiments.benchmarks.implicit --config gaussian_check "
                "--work runs/loss23 \\\n"
                "    --n-train 10000 --losses mse,mae,gnll,vmim --reference exact "
                "--out runs/loss23/out.json\n"
                "# seeds s = 1, 2, 3: runs/loss23's sims.h5 and its comp_* and post_* directories "
                "copied into runs/loss23_s$s, then\n"
                ".venv/bin/python -m experiments.benchmarks.implicit --config gaussian_check "
                "--work runs/loss23_s$s \\\n"
                "    --n-train 10000 --losses mse,mae,gnll,vmim --reference exact --set seed=$s "
                "--out runs/loss23_s$s/out.json\n"
                "# merged (rows relabelled, exact FoM added) into "
                "results_gaussian_check_methods.json",
        recorded="2026-12-07, " + VM + ", one core each (`taskset`), at most two runs at a time; "
                 "the training set of NOTEBOOK 22 copied in",
        caveat="The analytic C_ℓ rows use the fixed-covariance Gaussian likelihood, "
               "`gaussian_check`'s default when they ran; the Wishart band-power likelihood, its "
               "default since, reaches 0.92–1.00× the exact FoM on the same four observations "
               "(mean 0.947, C2ST ≤ 0.515: results_cl_gaussian_check_likelihoods.json).",
        notebook="23"),
    "results_cl_gaussian_check_likelihoods.json": Source(
        title="The C_ℓ likelihood against the exact posterior on gaussian_check: fixed-covariance "
              "Gaussian and Wishart band powers, four observation seeds",
        what="The shipped `gaussian_check` binning (24 linear ℓ bins from 72 to 1640, 72 data), "
             "NUTS 2 × (300 + 1000) on each of two likelihoods of the same band powers: "
             "`gaussian` (N(d | mean(θ), C), C the analytic Gaussian covariance at [cosmology]) "
             "and `wishart` (`cl_baseline.likelihood = \"wishart\"`: n_b Ĉ_b ~ Wishart(M_b(θ), "
             "n_b) per ℓ bin, the band powers' exact distribution for Gaussian maps, whose "
             "covariance follows θ), each against the exact grid posterior of the same "
             "observation (C2ST: 2000 samples a side). The issue's target: the analytic C_ℓ "
             "likelihood ≥ 0.9× the exact FoM with C2ST ≤ 0.60, on several observation seeds.",
        command="python -m experiments.benchmarks.cl_baseline_vs_exact --seeds 0 1 2 3 \\\n"
                "    --variant gaussian_24:covariance=gaussian \\\n"
                "    --variant wishart_24:covariance=gaussian,likelihood=wishart \\\n"
                "    --work runs/clw --out experiments/benchmarks/"
                "results_cl_gaussian_check_likelihoods.json\n"
                "# the rows' split R̂ read from runs/clw's samples files (this run's script "
                "did not record it yet)",
        recorded="2026-12-07, " + VM + ", one core (`taskset -c 0`), beside a compressor's "
                 "training and test runs on the other; 2–5.5 minutes per chain pair",
        notebook="35"),
    "results_efficiency_gaussian_check.json": Source(
        title="The simulation-efficiency curve on gaussian_check",
        what="`lensbench compare` with `[compare] efficiency = [250, 500, 1000, 2000, 5000, "
             "10000]` on the shipped `gaussian_check` (observation seed 0), methods exact, "
             "npe_cl, npe_vmim: each NPE method retrained on the first n training simulations "
             "and compared with the exact posterior (C2ST: sklearn MLP, 5 folds, 2000 samples a "
             "side). VMIM: the band-power compressor with its own 128-wide flow as the "
             "posterior, 100 epochs of a fixed 70 steps of 128 maps at every n "
             "(`compressor.steps_per_epoch`: a small training set is cycled), early stopping "
             "after 20 epochs without a better validation loss; NPE on C_ℓ: sbi MAF on 4 noise "
             "copies of the 72-number C_ℓ vectors. The issue's target: C2ST ≤ 0.58 at 1000 "
             "simulations.",
        command="sed -e 's/^methods = .*/methods = [\"exact\", \"npe_cl\", \"npe_vmim\"]\\n"
                "efficiency = [250, 500, 1000, 2000, 5000, 10000]/' \\\n"
                "    experiments/configs/gaussian_check.toml > runs/eff23/gc_eff.toml\n"
                "lensbench compare --config runs/eff23/gc_eff.toml --out runs/eff23/results\n"
                "cp runs/eff23/results/efficiency.json "
                "experiments/benchmarks/results_efficiency_gaussian_check.json",
        recorded="2026-12-07, " + VM + ", one core (`taskset -c 0`; the training set of NOTEBOOK "
                 "22 copied in); other benchmarks used the other core; 2510 s in all",
        notebook="23"),
    "results_efficiency_quick.json": Source(
        title="The simulation-efficiency curve on quick against the converged field-level "
              "posterior",
        what="`lensbench compare` on `quick` (PM maps, observation seed 0) with methods npe_cl and "
             "npe_vmim, `[compare] efficiency = [250, 500, 1000, 2000, 5000]` and `compare."
             "reference` = the committed converged field-level posterior "
             "(`reference_quick_field_level_mclachlan.h5`, MCLMC McLachlan + fourier, 4 × 8000 "
             "draws, RESULTS 14): each NPE method retrained on the first n of 5000 training "
             "simulations and compared with it (C2ST: sklearn MLP, 5 folds, 2000 samples a "
             "side). VMIM: ResNet width 16, 6-number summary, weight average 0.99, its own "
             "128-wide flow as the posterior, 40 epochs of a fixed 140 steps of 32 maps at every "
             "n (early stopping after 10 without a better validation loss); NPE on C_ℓ: sbi MAF "
             "on 4 noise copies of the C_ℓ vectors.",
        command="lensbench compare --config quick --out runs/qeff \\\n"
                "    --set training_set.n_sims=5100 --set 'compare.methods=[\"npe_cl\", "
                "\"npe_vmim\"]' \\\n"
                "    --set 'compare.efficiency=[250, 500, 1000, 2000, 5000]' \\\n"
                "    --set \"compare.reference='$PWD/experiments/benchmarks/"
                "reference_quick_field_level_mclachlan.h5'\" \\\n"
                "    --set compare.c2st_samples=2000 --set compressor.width=16 "
                "--set compressor.summary_dim=6 \\\n"
                "    --set compressor.ema=0.99 --set compressor.epochs=40 "
                "--set compressor.patience=10 \\\n"
                "    --set compressor.steps_per_epoch=140 --set compressor.flow_hidden=128 "
                "--set npe.vmim_flow=true\n"
                "cp runs/qeff/efficiency.json experiments/benchmarks/results_efficiency_quick.json"
                "   # reference.file made relative",
        recorded="2026-12-07, " + VM + ", one core (`taskset -c 0`), the other running MAMS "
                 "chains; test runs and timing probes shared this core at times",
        notebook="38"),
    "results_implicit_quick_reference.json": Source(
        title="Implicit inference on quick against the converged field-level posterior",
        what="The shipped `quick` configuration, observation seed 0 (the observation of the "
             "committed field-level reference posterior, `reference_quick_field_level.h5`: MCLMC "
             "+ fourier, 4 × 17,000 draws, NOTEBOOK 15), which is the C2ST reference. 5100 PM "
             "simulations, the last 100 held out for SBC/TARP; a VMIM ResNet compressor (width "
             "16, depth 3, 6-number summary, weight average 0.99, 60 epochs) on the first 5000, "
             "sbi NSF NPE on 4 noise copies of its summaries; NPE on the C_ℓ data vector; the "
             "analytic C_ℓ likelihood with NUTS (200-simulation covariance). The issue's targets: "
             "NPE on VMIM summaries ≥ 0.9× the field-level FoM, C2ST ≤ 0.65.",
        command=".venv/bin/python -m experiments.benchmarks.implicit --config quick --work "
                "runs/q26 \\\n"
                "    --n-train 5000 --losses vmim \\\n"
                "    --reference-samples experiments/benchmarks/reference_quick_field_level.h5 "
                "\\\n"
                "    --set compressor.width=16 --set compressor.summary_dim=6 "
                "--set compressor.ema=0.99 \\\n"
                "    --set compressor.epochs=60 --set compressor.patience=15 \\\n"
                "    --out experiments/benchmarks/results_implicit_quick_reference.json",
        recorded="2026-12-06, " + VM + ", one core (`taskset -c 1`); test runs and profiling "
                 "used the other",
        notebook="16"),
    "results_implicit_quick_deep.json": Source(
        title="Implicit inference on quick without repeated structure, against its field-level "
              "posterior",
        what="`quick_deep`: quick with one 200 × 200 × 5000 Mpc/h box as deep as the lightcone "
             "(24 × 24 × 240 cells, quick's cell size) instead of quick's 1000 Mpc/h box tiled five "
             "times along each line of sight (issue 27 §3), observation seed 0. C2ST reference: "
             "its field-level posterior (`reference_quick_deep_field_level.h5`: MCLMC + fourier at "
             "energy variance 10⁻⁴, 4 × 7000 draws, NOTEBOOK 26). 5100 PM simulations, the last 100 "
             "held out for SBC/TARP; the VMIM recipe of the quick rows above (ResNet width 16, "
             "6-number summary, weight average 0.99, 60 epochs) with the shipped MAF NPE; NPE on "
             "C_ℓ; the analytic C_ℓ likelihood with NUTS (200-simulation covariance). Compare the "
             "ratios to the field level with quick's (section above and NOTEBOOK 16).",
        command="lensbench maps --config quick_deep --out obs.h5\n"
                "lensbench hmc --config quick_deep --maps obs.h5 --out run --set hmc.sampler=mclmc "
                "\\\n"
                "    --set hmc.precondition=fourier --set hmc.energy_variance=1e-4 "
                "--set hmc.num_warmup=400 \\\n"
                "    --set hmc.num_samples=7000 --set hmc.num_chains=4 --set hmc.processes=1 "
                "--set hmc.segment=500\n"
                "cp run/samples.h5 experiments/benchmarks/reference_quick_deep_field_level.h5\n"
                ".venv/bin/python -m experiments.benchmarks.implicit --config quick_deep --work "
                "runs/deep27/imp \\\n"
                "    --n-train 5000 --losses vmim \\\n"
                "    --reference-samples experiments/benchmarks/reference_quick_deep_field_level.h5 "
                "\\\n"
                "    --set compressor.width=16 --set compressor.summary_dim=6 "
                "--set compressor.ema=0.99 \\\n"
                "    --set compressor.epochs=60 --set compressor.patience=15 \\\n"
                "    --out experiments/benchmarks/results_implicit_quick_deep.json",
        recorded="2026-12-07, " + VM + "; the chains on one core (`taskset -c 1`), the "
                 "implicit stages on the other, beside gradient timings and a compressor scan. "
                 "The chains ran in parts (one process, then `--chain 2` and `--chain 3` beside "
                 "each other, then extended from 6000 to 7000 draws: the same run as the single "
                 "command); the implicit command was run again against the extended chains with "
                 "its stages cached (the first run generated the 5100 simulations in 391 s)",
        notebook="26"),
    "results_implicit_losses.json": Source(
        title="Implicit inference on quick: every compressor loss and both C_ℓ baselines",
        what="The shipped `quick` configuration (simulator after the lightcone fix of NOTEBOOK "
             "7b), observation seed 0: 5100 PM simulations, the last 100 held out for SBC/TARP; "
             "ResNet compressors (width 8, depth 3) trained up to 100 epochs, sbi NSF NPE on 4 "
             "noise copies; NPE on the C_ℓ data vector; the analytic C_ℓ likelihood with NUTS. "
             "C2ST against the NPE named as reference (itself an NPE, not an independent "
             "reference). Prior alone: FoM 42.",
        command=".venv/bin/python -m experiments.benchmarks.implicit --config quick --work "
                "runs/q4s \\\n"
                "    --n-train 1000,5000 --losses mse,mae,gnll,vmim \\\n"
                "    --set compressor.epochs=100 --set compressor.patience=10 \\\n"
                "    --out experiments/benchmarks/results_implicit_losses.json",
        recorded="2026-11-26, " + VM + ", pinned to one core while an HMC run used the other",
        notebook="6c"),
    "results_implicit_scan.json": Source(
        title="Implicit inference on quick against the number of training simulations",
        what="The same pipeline as above at n_train = 500–5000, MSE and VMIM compressors capped "
             "at 20 epochs (every run used them all), on the simulator before the lightcone fix.",
        command=".venv/bin/python -m experiments.benchmarks.implicit --config quick --work "
                "runs/quick_scan \\\n"
                "    --n-train 500,1000,2000,5000 --losses mse,vmim \\\n"
                "    --out experiments/benchmarks/results_implicit_scan.json",
        recorded="2026-11-26, " + VM + ", one core (`taskset -c 1`), simulator of commit 90d783f "
                 "(radial lightcone samples before NOTEBOOK 7b's fix)",
        notebook="6b",
        caveat="At 1000 and 5000 simulations the losses run above (fixed simulator, compressors "
               "trained to convergence) replaces these rows; the scan over n_train has not been "
               "repeated."),
    "results_implicit.json": Source(
        title="Implicit inference on the first quick configuration",
        what="NPE on four compressor losses and on C_ℓ at 500 and 900 training simulations, and "
             "the analytic C_ℓ likelihood, on the `quick` configuration of commit 5d5ac01 (PM "
             "32×32×64, 10 steps, 64² pixels), since replaced.",
        command=".venv/bin/python -m experiments.benchmarks.implicit --config quick --work "
                "runs/quick \\\n"
                "    --n-train 500,900 --out experiments/benchmarks/results_implicit.json",
        recorded="2026-11-26, " + VM,
        notebook="6",
        superseded_by="results_implicit_losses.json"),
    "results_cl_calibration_quick.json": Source(
        title="The C_ℓ likelihood on quick: calibration on held-out PM maps, and its information "
              "against the field level",
        what="Three C_ℓ likelihoods of quick's band powers (its 10 log ℓ bins, the [scales] cut: "
             "22 data): `gaussian_sim200` (the Gaussian likelihood with the Hartlap-corrected "
             "covariance of 200 simulations, quick's default until this section), "
             "`gaussian_analytic` (the analytic Gaussian covariance at [cosmology]) and "
             "`wishart` (the band powers' distribution for Gaussian maps, covariance following "
             "θ; quick's default since). Each is calibrated as NPE is "
             "(`pipeline.calibrate_cl_baseline`): on the last 200 of 20,200 training "
             "simulations (shape noise drawn as `fit-posterior`'s calibration draws it), its "
             "exact posterior tabulated on a grid (`cl_baseline.ClGridPosterior`, ≥ 5 cells per "
             "posterior σ), 500 draws each, SBC ranks and TARP; the rank quantile of the truth "
             "(mean 0.5 unbiased) and the share of truths in the central 68 %. Then its grid "
             "posterior of the observation (seed 0) against the converged field-level reference "
             "(`reference_quick_field_level_mclachlan.h5`, FoM 136; C2ST 2000 draws a side).",
        command="python -m experiments.benchmarks.implicit --config quick --work runs/q45 "
                "--n-train 20000 ... --set training_set.n_calibration=200   # sims.h5, obs.h5 "
                "(NOTEBOOK 36)\n"
                "python -m experiments.benchmarks.cl_calibration --config quick "
                "--sims runs/q45/sims.h5 \\\n"
                "    --set training_set.n_calibration=200 --maps runs/q45/obs.h5 \\\n"
                "    --reference experiments/benchmarks/reference_quick_field_level_mclachlan.h5 "
                "\\\n"
                "    --variant gaussian_sim200:covariance=simulated,likelihood=gaussian \\\n"
                "    --variant gaussian_analytic:covariance=gaussian,likelihood=gaussian \\\n"
                "    --variant wishart:covariance=gaussian,likelihood=wishart \\\n"
                "    --work runs/clcal --out experiments/benchmarks/"
                "results_cl_calibration_quick.json\n"
                "# run with quick's earlier defaults (simulated covariance, Gaussian likelihood), "
                "so the first two variants' keys are explicit here; the rank quantiles and "
                "coverages added from runs/clcal/<variant>/calibration.json (the script records "
                "them since)",
        recorded="2026-12-08, " + VM + ", one core (`taskset -c 0`), beside a field-level "
                 "chain on the other and test runs on the same core; 2.5–3.2 minutes per variant",
        notebook="40"),
}

ORDER = ("results_pm.json", "results_scaling.json", "results_lensing.json",
         "results_cl_validation.json", "results_cl_lsst_y10.json", "results_cl_lsst_y10_window.json",
         "results_cl_quick_window.json", "results_cl_hires_patch.json",
         "results_cl_hires_patch_random.json", "results_pk_box.json", "results_hmc.json",
         "results_hmc_coverage.json", "results_samplers_gaussian_check.json",
         "results_samplers_quick.json", "results_gaussian_check.json",
         "results_implicit_online.json", "results_efficiency_gaussian_check.json",
         "results_implicit_quick_reference.json", "results_implicit_quick_deep.json",
         "results_implicit_losses.json",
         "results_implicit_scan.json", "results_implicit.json",
         "results_implicit_gaussian_optimum.json", "results_gaussian_check_methods.json",
         "results_cl_gaussian_check_likelihoods.json", "results_efficiency_quick.json",
         "results_cl_calibration_quick.json")


# ---------------------------------------------------------------------------------------------
# Formatting


def num(x, digits: int = 3) -> str:
    """A number to ``digits`` significant figures (trailing zeros kept: 5.00 says how well it is
    known), rounded to a whole number from 10^(digits−1) up so that no exponent appears for the
    sizes these benchmarks produce; "–" for a missing or non-finite value."""
    if x is None or isinstance(x, bool):
        return "–" if x is None else str(x)
    if isinstance(x, int):
        return str(x)
    if not math.isfinite(x):
        return "–"
    if abs(x) >= 10 ** (digits - 1):
        return f"{x:.0f}"
    return f"{x:#.{digits}g}"


def signed(x, decimals: int = 2) -> str:
    """A signed value with a typographic minus, as in the notebook's bias columns."""
    if x is None or not math.isfinite(x):
        return "–"
    return f"{x:+.{decimals}f}".replace("-", "−")


def fixed(x, decimals: int = 2) -> str:
    """A value with a fixed number of decimals (p-values, ratios), "–" when missing."""
    if x is None or not math.isfinite(x):
        return "–"
    return f"{x:.{decimals}f}"


def mean_std(mean, std) -> str:
    """``mean ± std``: the mean to 3 significant figures, the std to 2 (a posterior width is
    not known better than that from a few thousand draws)."""
    if mean is None or std is None or not (math.isfinite(mean) and math.isfinite(std)):
        return "–"
    decimals = max(0, 1 - math.floor(math.log10(abs(std)))) if std > 0 else 3
    return f"{num(mean)} ± {std:.{decimals}f}"


def pval(p) -> str:
    """A p-value: 2 decimals, 2 significant figures below 0.1 so that 0.005 does not read 0.00."""
    if p is None or not math.isfinite(p):
        return "–"
    return f"{p:.2f}" if p >= 0.095 else f"{p:.2g}"


def ratio(a, b) -> str:
    """a / b as "3.24×", "–" when either is missing."""
    if a is None or b is None or not b:
        return "–"
    return f"{a / b:.3g}×"


def pair(values: Iterable, fmt: Callable = num, sep: str = ", ") -> str:
    """Several formatted values in one cell."""
    return sep.join(fmt(v) for v in values)


def param(name: str) -> str:
    """Display name of a parameter key."""
    return PARAM_NAMES.get(name, name)


def table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A Markdown table; "|" inside a cell is escaped so that it cannot split the row."""
    def line(cells):
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"
    rows = list(rows)
    out = [line(header), "|" + "---|" * len(header)]
    out += [line(r) for r in rows]
    return "\n".join(out)


def code_block(text: str) -> str:
    """An indented Markdown code block."""
    return "\n".join("    " + ln if ln else "" for ln in text.splitlines())


# ---------------------------------------------------------------------------------------------
# Certificates


def r_hat_text(r: float) -> str:
    """R̂ with 2 decimals, more when rounding would put it on the other side of R_HAT_MAX (1.012
    must not read "1.01")."""
    for decimals in range(2, 8):
        text = f"{r:.{decimals}f}"
        if (float(text) > R_HAT_MAX) == (r > R_HAT_MAX):
            return text
    return repr(r)


def _defined(v) -> bool:
    """Whether a diagnostic value exists (not null, not NaN/inf)."""
    return v is not None and math.isfinite(v)


def r_hat_cell(r_hat: Mapping) -> str:
    """Per-parameter split R̂ in one cell ("–" where undefined)."""
    return pair(r_hat.values(), lambda v: r_hat_text(v) if _defined(v) else "–")


def mcmc_flag(ess: Mapping | None, r_hat: Mapping | None) -> str | None:
    """None when every parameter has ESS >= ESS_MIN and split R̂ <= R_HAT_MAX; else
    "unconverged (ESS a/b, R̂ x)" with ESS rounded down (a failing value never reads as passing)
    and the worst R̂, "—" where undefined. An undefined value fails (a stuck chain gives NaN); an
    absent R̂ (one chain, no split R̂ recorded) leaves the ESS to decide."""
    ess, r_hat = dict(ess or {}), dict(r_hat or {})
    if not ess:
        return "ESS not recorded"
    bad_ess = any(not _defined(v) or v < ESS_MIN for v in ess.values())
    bad_r = any(not _defined(v) or v > R_HAT_MAX for v in r_hat.values())
    if not (bad_ess or bad_r):
        return None
    ess_text = "/".join(str(math.floor(v)) if _defined(v) else "—" for v in ess.values())
    r_text = ""
    if r_hat:
        defined = [v for v in r_hat.values() if _defined(v)]
        r_text = ", R̂ " + ("—" if len(defined) < len(r_hat) else r_hat_text(max(defined)))
    return f"unconverged (ESS {ess_text}{r_text})"


def calibration_flag(cal: Mapping | None) -> str | None:
    """None for an NPE calibrated on held-out simulations with no marginal below SBC_P_MIN; else
    what is missing or which marginal failed."""
    if not cal:
        return "uncalibrated (no held-out calibration)"
    low = [p for p, v in (cal.get("sbc_ks_pvals") or {}).items() if v is not None and v < SBC_P_MIN]
    if low:
        return "miscalibrated " + ", ".join(
            f"{param(p)} (SBC KS p {pval(cal['sbc_ks_pvals'][p])})" for p in low)
    return None


def status(flag: str | None, certified: str) -> str:
    """The status cell: the flag when there is one, else what certifies the row."""
    return flag if flag else certified


# ---------------------------------------------------------------------------------------------
# Sections, one per known file layout


def render_pm(data: Mapping, source: Source | None) -> list[str]:
    """Section 1 of the notebook: per mesh size, times, memory, forces and FFT floors of both
    codes, and their ratio (peer / lensbench, > 1 when lensbench is faster or smaller)."""
    meta = data.get("meta", {})
    runs = {(r["code_key"], r["n"], r["what"]): r for r in data["results"]}
    peer_name = next((r.get("code") for r in data["results"] if r["code_key"] == "peer"), "peer")
    ours_name = next((r.get("code") for r in data["results"] if r["code_key"] == "ours"), "ours")

    def value(code, n, what, key="median_s", scale=1.0):
        r = runs.get((code, n, what))
        if r is None or not r.get("ok", True):
            return None
        v = r.get(key)
        return None if v is None else v * scale

    def mark(code, n, what):
        r = runs.get((code, n, what))
        return " (disturbed)" if r is not None and r.get("disturbed") else ""

    metrics = (("forward [s]", "forward", "median_s", 1.0),
               ("gradient [s]", "grad", "median_s", 1.0),
               ("peak RSS forward [MB]", "forward", "peak_rss_mb", 1.0),
               ("peak RSS gradient [MB]", "grad", "peak_rss_mb", 1.0),
               ("pm_forces [ms]", "forces", "median_s", 1e3),
               ("FFT floor 1 rfftn + 3 irfftn [ms]", "fft", "median_s", 1e3))
    rows = []
    for n in meta.get("sizes") or sorted({r["n"] for r in data["results"]}):
        for label, what, key, scale in metrics:
            p, o = value("peer", n, what, key, scale), value("ours", n, what, key, scale)
            rows.append([f"{n}³", label, num(p) + mark("peer", n, what),
                         num(o) + mark("ours", n, what), ratio(p, o)])
        pf, of = value("peer", n, "forces"), value("ours", n, "forces")
        pt, ot = value("peer", n, "fft"), value("ours", n, "fft")
        pr = pf / pt if pf and pt else None
        orr = of / ot if of and ot else None
        rows.append([f"{n}³", "forces / own FFT floor", num(pr), num(orr), ratio(pr, orr)])
    busy = [r["others_cpu_cores"] for r in data["results"]
            if r.get("others_cpu_cores") is not None]
    facts = [f"Run {meta.get('started', '?')} to {meta.get('finished', '?')}, git "
             f"{meta.get('git_rev', '?')}, host {meta.get('host', '?')} ({meta.get('cpus', '?')} "
             f"CPUs), Python {meta.get('python', '?')}, tcmalloc {meta.get('tcmalloc')}; "
             f"{meta.get('repeats', '?')} timed calls per measurement."]
    if meta.get("setting"):
        facts.append(f"Setting: {meta['setting']}.")
    if busy:
        facts.append(f"Other processes used at most {num(max(busy), 2)} cores during any "
                     "measurement.")
    header = ["N", "metric", peer_name, ours_name, f"{peer_name} / {ours_name}"]
    return [" ".join(facts), table(header, rows)]


def _mem_cell(r: Mapping | None) -> str:
    """"XLA temp / peak RSS ; time" of one scaling measurement."""
    if not r:
        return "–"
    return (f"{num(r.get('xla_temp_mb'))} MB / {num(r.get('peak_rss_mb'))} MB ; "
            f"{num(r.get('median_s'))} s")


def _temp_ratio(grad: Mapping, forward: Mapping) -> float | None:
    """XLA temporary buffers of a gradient over the forward's (None where either is missing)."""
    if grad.get("xla_temp_mb") and forward.get("xla_temp_mb"):
        return grad["xla_temp_mb"] / forward["xla_temp_mb"]
    return None


def render_scaling(data: Mapping, source: Source | None) -> list[str]:
    """Sections 2 and 3 of the notebook: memory against steps, and fake-device weak scaling."""
    out = []
    memory = data.get("memory") or []
    if memory:
        # a baseline commit measured the same way in the same session: its adjoint beside ours
        baseline = data.get("baseline") or {}
        base_adjoint = {m["steps"]: m.get("adjoint") for m in baseline.get("memory") or []}
        rows = []
        for m in memory:
            f, a = m.get("forward") or {}, m.get("adjoint") or {}
            row = [m["steps"], _mem_cell(f), _mem_cell(a), _mem_cell(m.get("checkpoint")),
                   num(_temp_ratio(a, f))]
            if baseline:
                b = base_adjoint.get(m["steps"]) or {}
                row += [_mem_cell(b), num(_temp_ratio(b, f))]
            rows.append(row)
        n = (memory[0].get("forward") or {}).get("n", "?")
        calls = len((memory[0].get("forward") or {}).get("all_s") or [])
        out.append(f"Gradient memory at {n}³, {calls} timed call(s) per cell. Each cell: XLA "
                   "temporary buffers / process peak RSS ; median time.")
        header = ["steps", "forward", "grad, reverse adjoint",
                  "grad, autodiff + checkpoint per step", "adjoint / forward (temp)"]
        if baseline:
            header += [f"grad, reverse adjoint at {baseline.get('commit', 'baseline')}",
                       "its adjoint / forward (temp)"]
        out.append(table(header, rows))
    scaling = data.get("scaling") or []
    if scaling:
        base = next((s for s in scaling if s["devices"] == 1), None)
        rows = []
        for s in scaling:
            d, f, g = s["devices"], s["forward"]["median_s"], s["grad"]["median_s"]
            tf = d * base["forward"]["median_s"] / f if base else None
            tg = d * base["grad"]["median_s"] / g if base else None
            rows.append([d, s["pdims"], s["mesh"].replace("x", "×"), num(f), num(g), fixed(tf),
                         fixed(tg)])
        per_device = (base or scaling[0])["forward"].get("n", "?")
        out.append(f"Weak scaling, {per_device}³ cells per device; throughput = cells per second "
                   "relative to one device (D × t₁ / t_D).")
        out.append(table(["devices", "grid", "mesh", "forward [s]", "gradient [s]",
                          "forward throughput vs 1 device", "gradient throughput vs 1 device"],
                         rows))
    return out


def _case_label(r: Mapping) -> str:
    """The case name with the configuration changes it made."""
    changes = ", ".join(f"{k}={v}" for k, v in (r.get("changes") or {}).items())
    return f"{r['case']}" + (f" ({changes})" if changes else "")


def render_lensing(data: Mapping, source: Source | None) -> list[str]:
    """Section 4 of the notebook: time and memory of one κ map per case."""
    rows = []
    for r in data["results"]:
        rows.append([
            _case_label(r), "×".join(map(str, r["mesh"])) + f", {r['n_steps']}",
            f"{r['n_bins']}, {r['sky'][0]}²", r["shells"], r["gradient_mode"],
            f"{num(r['forward_s'])} s (compile {num(r['forward_compile_s'])} s)",
            f"{num(r['grad_s'])} s (compile {num(r['grad_compile_s'])} s)",
            f"{num(r['forward_xla_temp_mb'])} / {num(r['grad_xla_temp_mb'])} MB",
            f"{num(r['peak_rss_forward_mb'])} / {num(r['peak_rss_total_mb'])} MB"])
    out = []
    if data.get("machine"):
        out.append(f"Machine (from the file): {data['machine']}.")
    out.append(table(["case", "mesh, steps", "bins, pixels", "shells", "gradient", "forward",
                      "grad", "XLA temp fwd / grad", "peak RSS fwd / with grad"], rows))
    return out


def render_cl_validation(data: Mapping, source: Source | None) -> list[str]:
    """Notebook 5: per ℓ bin, measured C_ℓ / theory with the mesh window for every bin pair, and
    without the window for the auto-spectra; bins numbered from 1 (nearest) as in the notebook."""
    a = data.get("args") or {}
    ell, sigma, pairs = data["ell"], data["sigma"], data["pairs"]
    cl, theory, raw = data["cl"], data["theory"], data["theory_no_window"]
    header = ["ℓ"] + [f"{e:.0f}" for e in ell]
    label = [f"({i + 1},{j + 1})" for i, j in pairs]
    rows = [["rel. sampling error"] + [fixed(s, 3) for s in sigma]]
    rows += [[label[p]] + [num(c / t) if t else "–" for c, t in zip(cl[p], theory[p])]
             for p in range(len(pairs))]
    autos = [p for p, (i, j) in enumerate(pairs) if i == j]
    rows_raw = [[label[p]] + [num(c / t) if t else "–" for c, t in zip(cl[p], raw[p])]
                for p in autos]
    mesh, box = a.get("mesh") or [], a.get("box") or []
    deg = f"{a['field']:g}" if isinstance(a.get("field"), (int, float)) else "?"
    facts = (f"Setting (from the file): {'×'.join(map(str, mesh))} cells over "
             f"{'×'.join(num(b) for b in box)} Mpc/h, {a.get('steps', '?')} PM steps from "
             f"a = {a.get('a_init', '?')}, "
             f"{'CIC-compensated' if a.get('deconvolve') else 'plain CIC'} force, "
             f"{deg}°×{deg}° at {a.get('npix', '?')}² pixels, "
             f"{a.get('bins', '?')} LSST-Y10 bins, {a.get('seeds', '?')} seeds averaged"
             f"{' (fixed-amplitude initial conditions)' if a.get('fixed') else ''}; "
             f"{num(data.get('seconds'))} s in all.")
    return [facts, "Measured / (theory × mesh window), every bin pair:", table(header, rows),
            "Measured / theory without the mesh window, auto-spectra:", table(header, rows_raw)]


def render_cl_maps(data: Mapping, source: Source | None) -> list[str]:
    """``experiments.validation.cl_maps``: mean C_ℓ / theory ± standard error of the auto-spectra
    per ℓ bin, the worst cross-spectrum ratio per ℓ bin, and the pass/fail line."""
    ell, pairs, ratio, err = data["ell"], data["pairs"], data["ratio"], data["stderr"]
    autos = [p for p, (i, j) in enumerate(pairs) if i == j]
    cross = [p for p, (i, j) in enumerate(pairs) if i != j]
    header = ["ℓ", "modes"] + [f"bin {pairs[p][0] + 1}" for p in autos]
    if cross:
        header.append("cross, min–max")
    rows = []
    for b, l in enumerate(ell):
        row = [f"{l:.0f}", str(int(data["n_modes"][b]))]
        row += [f"{ratio[p][b]:.2f} ± {err[p][b]:.2f}" for p in autos]
        if cross:
            vals = [ratio[p][b] for p in cross]
            row.append(f"{min(vals):.2f}–{max(vals):.2f}")
        rows.append(row)
    check = data.get("check") or {}
    failing = [k for k, v in check.items() if not v["passed"]]
    lo, hi = data.get("ell_range") or ["?", "?"]
    facts = (f"{data['name']}: mean over {data['n_maps']} maps"
             f"{' (fixed-amplitude white noise)' if data.get('fixed_amplitude') else ''} of the "
             f"noise-free C_ℓ / ({data['theory']}), ± the standard error of the mean (the scatter "
             f"between maps / √n).")
    verdict = (f"Within {data.get('tol', 0.1):.0%} + 2 standard errors for ℓ ∈ [{lo:g}, {hi:g}] "
               f"(pairs with bin 1 to ℓ = {data.get('ell_max_bin1', hi):g}): "
               f"{len(check) - len(failing)} of {len(check)} pairs"
               + (f"; failing: {', '.join(failing)}" if failing else "") + ".")
    return [facts, table(header, rows), verdict]


def render_pk_box(data: Mapping, source: Source | None) -> list[str]:
    """``experiments.validation.pk_box``: P(k) / halofit per box and cell size."""
    rows = data["rows"]
    header = ["box (Mpc/h)", "cells", "cell (Mpc/h)", "seeds"] + [f"k = {k:.2f}" for k in rows[0]["k"]]
    body = [[f"{r['box']:g}", f"{r['cells']}³", f"{r['cell_size']:.2g}", str(r["seeds"])]
            + [f"{v:.2f}" for v in r["ratio"]] for r in rows]
    return [f"P_PM(k) / P_halofit(k) at a = {data['a']:g}, {data['steps']} PM steps from "
            f"a = {data['a_init']:g} (k in h/Mpc; each column the nearest k bin of the first row's "
            f"binning):", table(header, body)]


def render_hmc(data: Sequence[Mapping], source: Source | None) -> list[str]:
    """Notebook 7b: gradient-cost rows and chain rows of the HMC benchmark, chains flagged."""
    grads = [r for r in data if "gradients_per_s" in r]
    chains = [r for r in data if "sampler" in r]
    other = [r for r in data if r not in grads and r not in chains]
    out = []
    if grads:
        rows = [[r["config"], "×".join(map(str, r["mesh_shape"])), f"{r['field_cells']:,}",
                 r["n_steps"], f"{r['npix']}² × {r['n_bins']}", r["gradient"],
                 num(r["gradients_per_s"]), num(r["seconds_per_gradient"]),
                 num(r["compile_plus_first_s"]), num(r["peak_rss_mb"]),
                 ", ".join(r.get("devices") or [])] for r in grads]
        out.append(table(["config", "mesh", "field cells", "steps", "pixels × bins", "mode",
                          "gradients/s", "s per gradient", "compile + first [s]",
                          "peak RSS [MB]", "devices"], rows))
    if chains:
        rows = []
        for r in chains:
            ess, rh = r.get("ess") or {}, r.get("r_hat") or {}
            rows.append([r["sampler"], r["config"], r.get("run", ""), r.get("gradients", "–"),
                         pair(ess.values()),
                         r_hat_cell(rh),
                         num(r.get("min_ess_per_1000_gradients")), num(r.get("min_ess_per_hour")),
                         status(mcmc_flag(ess, rh), "converged")])
        names = ", ".join(param(p) for p in (chains[0].get("ess") or {}))
        out.append(table(["sampler", "config", "run", "gradients", f"ESS {names}",
                          f"split R̂ {names}", "min ESS / 1000 gradients", "min ESS / hour",
                          "status"], rows))
    if other:
        out += [render_generic(r, None)[0] for r in other]
    return out


def _span(values: Sequence[float]) -> str:
    """"a–b" over several chains' values, one value when they agree to 3 figures, "–" for none."""
    if not values:
        return "–"
    lo, hi = num(min(values)), num(max(values))
    return lo if lo == hi else f"{lo}–{hi}"


def render_samplers(data: Mapping, source: Source | None) -> list[str]:
    """``experiments.benchmarks.samplers``: one row per variant with its draws, ESS, split R̂,
    gradients per effective sample of the slowest parameter, tuned L and step, and, against the
    file's reference posterior, C2ST, mean offsets, std ratios and FoM ratio; chains flagged."""
    rows = []
    names = ""
    for r in data.get("rows", []):
        ess, rh = r.get("ess") or {}, r.get("r_hat") or {}
        names = ", ".join(param(p) for p in ess)
        draws = r.get("draws_per_chain", "–")
        tuned = [t for t in (r.get("tuned") or []) if t]
        ls = [t["L"] for t in tuned if "L" in t]
        steps = [t["step_size"] for t in tuned if "step_size" in t]
        has_ref = "c2st" in r
        seed = r.get("observation_seed")
        rows.append([
            r["variant"], "–" if seed is None else str(seed), f"{r['chains']} × {draws}",
            pair(ess.values(), lambda v: str(math.floor(v)) if _defined(v) else "–"),
            r_hat_cell(rh),
            f"{num(r['sampling_gradients_per_min_ess'])} ({num(r['gradients_per_min_ess'])})",
            f"{_span(ls)}, {_span(steps)}",
            f"`{r['reference']}`" if r.get("reference") else "–",
            num(r["c2st"]) if has_ref else "–",
            pair(r["mean_offset_sigma"], signed) if has_ref else "–",
            pair(r["std_ratio"]) if has_ref else "–",
            num(r["fom_ratio"]) if has_ref else "–",
            status(mcmc_flag(ess, rh), "converged")])
    return [table(["variant", "observation seed", "chains × draws", f"ESS {names}",
                   f"split R̂ {names}",
                   "sampling grads / min ESS (with warm-up)", "tuned L, step",
                   "reference", "C2ST vs reference", "mean offsets [σ]", "std ratios",
                   "FoM / reference",
                   "status"], rows)]


def render_cl_vs_exact(data: Mapping, source: Source | None) -> list[str]:
    """``experiments.benchmarks.cl_baseline_vs_exact``: each C_ℓ likelihood variant on each
    observation seed against that seed's exact posterior (FoM ratio, mean offsets and std ratios
    in exact σ, C2ST, the chain's ESS and split R̂, flagged), then each variant's means."""
    rows, names = [], ""
    for r in data.get("rows", []):
        order = list(r.get("names") or r.get("ess") or {})  # the header's order, in every cell
        ess = {k: (r.get("ess") or {}).get(k) for k in order}
        rh = {k: (r.get("r_hat") or {})[k] for k in order if k in (r.get("r_hat") or {})}
        names = ", ".join(param(p) for p in order)
        rows.append([r["variant"], str(r["seed"]), num(r["fom"]), num(r["fom_exact"]),
                     num(r["fom_ratio"]), pair(r["mean_offset_sigma"], signed),
                     pair(r["std_ratio"]), num(r["c2st"]),
                     pair(ess.values(), lambda v: str(math.floor(v)) if _defined(v) else "–"),
                     r_hat_cell(rh), status(mcmc_flag(ess, rh), "converged")])
    out = [table(["variant", "observation seed", "FoM", "exact FoM", "FoM / exact",
                  "mean offsets [exact σ]", "std ratios", "C2ST vs exact", f"ESS {names}",
                  f"split R̂ {names}", "status"], rows)]
    summary = data.get("summary") or {}
    if summary:
        out.append(table(["variant", "seeds", "mean FoM / exact", "mean C2ST"],
                         [[k, ", ".join(map(str, v["seeds"])), num(v["fom_ratio_mean"]),
                           num(v["c2st_mean"])] for k, v in summary.items()]))
    return out


def render_cl_calibration(data: Mapping, source: Source | None) -> list[str]:
    """``experiments.benchmarks.cl_calibration``: per C_ℓ likelihood variant, its calibration on
    held-out simulations (TARP, SBC, the truths' mean rank quantile and central-68 % coverage,
    flagged by the NPE rule) and, when a reference was given, its grid posterior of the
    observation against it."""
    rows = []
    has_ref = any("fom" in r for r in data.get("rows", []))
    names = ""
    for r in data.get("rows", []):
        order = list(r["sbc_ks_pvals"])
        names = ", ".join(param(p) for p in order)
        lk = r["likelihood"]
        cov = ("analytic" if lk["n_cov"] is None else f"{lk['n_cov']} simulations")
        cells = [r["variant"], lk["kind"], cov, str(lk["n_data"]), signed(r["tarp_atc"], 3),
                 pair((r["sbc_ks_pvals"][p] for p in order), pval),
                 pair(r["rank_quantile_mean"][p] for p in order),
                 pair(r["central_68_coverage"][p] for p in order), str(r["n_test"])]
        if has_ref:
            cells += [num(r.get("fom")), num(r.get("fom_ratio")), num(r.get("c2st")),
                      pair(r.get("mean_offset_sigma") or [], signed),
                      pair(r.get("std_ratio") or [])]
        cells.append(status(calibration_flag({"sbc_ks_pvals": r["sbc_ks_pvals"]}), "calibrated"))
        rows.append(cells)
    header = ["variant", "likelihood", "covariance", "data", "TARP ATC", f"SBC KS p {names}",
              f"mean rank quantile {names}", f"central 68 % coverage {names}", "held out"]
    if has_ref:
        header += ["FoM", "FoM / reference", "C2ST vs reference", "mean offsets [ref σ]",
                   "std ratios"]
    return [table(header + ["status"], rows)]


def coverage_command(data: Mapping) -> str:
    """The hmc_coverage command line, rebuilt from the config and overrides the file records."""
    parts = ["python -m experiments.benchmarks.hmc_coverage"]
    if data.get("config") and data["config"] != "gaussian_check":
        parts.append(f"--config {data['config']}")
    parts.append(f"--n-obs {data['n_obs']}")
    parts += [f"--set {o}" for o in data.get("overrides") or []]
    parts.append("--out experiments/benchmarks/results_hmc_coverage.json")
    lines, line = [], parts[0]
    for p in parts[1:]:
        if len(line) + len(p) > 90:
            lines.append(line + " \\")
            line = "    " + p
        else:
            line += " " + p
    return "\n".join(lines + [line])


def render_coverage(data: Mapping, source: Source | None) -> list[str]:
    """Notebook 7f: SBC and coverage of HMC and of the exact posterior, HMC against exact, with
    the per-observation chains' ESS against the certificate."""
    names = data["names"]
    ess_rows = [r["ess"] for r in data.get("rows", [])]
    short = [e for e in ess_rows if min(e) < ESS_MIN]
    median_ess = data.get("median_ess") or [statistics.median(c) for c in zip(*ess_rows)]
    hmc_status = (f"{len(short)} of {len(ess_rows)} chains below ESS {ESS_MIN} (median ESS "
                  f"{pair(median_ess, sep='/')})") if short else \
        f"every chain ESS ≥ {ESS_MIN}"

    def sbc_row(label, sbc, stat):
        return [label, pair((sbc[p]["ks_pval"] for p in names), pval),
                pair((sbc[p]["mean_quantile"] for p in names), fixed),
                pair((sbc[p]["coverage_68"] for p in names), fixed),
                pair((sbc[p]["coverage_95"] for p in names), fixed), stat]

    pnames = ", ".join(param(p) for p in names)
    h = data.get("hmc", {})
    settings = (f"{data['n_obs']} observations of `{data['config']}` with "
                f"{', '.join(data.get('overrides') or [])}; {h.get('sampler', '?')} "
                f"{h.get('num_chains', '?')} × ({h.get('num_warmup', '?')} + "
                f"{h.get('num_samples', '?')}), tree depth ≤ {h.get('max_tree_depth', '?')}; "
                f"median {num(data.get('median_gradients'))} gradients per observation.")
    sbc = table(["posterior", f"SBC KS p {pnames}", f"mean rank quantile {pnames}",
                 f"68 % coverage {pnames}", f"95 % coverage {pnames}", "status"],
                [sbc_row("HMC", data["sbc_hmc"], hmc_status),
                 sbc_row("exact grid posterior (control)", data["sbc_exact"], "exact")])
    cmp_rows = [[param(p), f"{num(v['chi2_mean'])} ({v['dof']})", signed(v["mean_z"]),
                 signed(v["mean_shift"], 3), fixed(v["median_std_ratio"], 3)]
                for p, v in data["hmc_vs_exact"].items()]
    cmp = table(["parameter", "Σ z² (dof)", "mean z", "mean shift [exact σ]",
                 "median std ratio HMC / exact"], cmp_rows)
    return [settings, sbc, "HMC against the exact posterior, per observation:", cmp]


def _metrics_status(metrics: Mapping, key: str) -> str:
    """Certificate of one method of a ``lensbench.metrics`` file: the file's own convergence
    flag when it has one, "not recorded" for MCMC methods of older files, the calibration of an
    NPE, "exact" for the grid."""
    m = metrics["methods"][key]
    method = m.get("method", key)
    if "converged" in m:
        note = unconverged_note(metrics, key)
        if note:
            return note
    elif method in MCMC_METHODS:
        return "ESS, R̂ not recorded in the file"
    if method.startswith("npe"):
        cal = m.get("calibration")
        flag = calibration_flag(cal)
        if flag:
            return flag
        return (f"calibrated: TARP ATC {signed(cal.get('tarp_atc'), 3)}, SBC KS p "
                f"{pair((cal.get('sbc_ks_pvals') or {}).values(), pval)} "
                f"({cal.get('n_test', '?')} held out)")
    if method == "exact":
        return "exact"
    return "converged" if m.get("converged") else "–"


def render_metrics(data: Mapping, source: Source | None) -> list[str]:
    """A ``lensbench.metrics`` file (``lensbench compare``): one row per method with means, FoM,
    FoM ratios, C2ST against the exact posterior (or the first method) and the certificate."""
    order = [k for k in data.get("methods_order") or data["methods"] if k in data["methods"]]
    sampled = []
    for k in order:
        for p in data["methods"][k].get("names", []):
            if p not in sampled:
                sampled.append(p)
    fom_key = ",".join(sampled[:2])
    ratios = (data.get("fom_ratio") or {})
    ref = ratios.get("reference")
    against = "exact" if "exact" in order else order[0]
    c2st = {}
    for pr in ((data.get("c2st") or {}).get("pairs") or []):
        c2st[frozenset((pr["a"], pr["b"]))] = pr.get("accuracy")
    exact_fom = (data["methods"].get("exact") or {}).get("fom", {}).get(fom_key)
    rows = []
    for k in order:
        m = data["methods"][k]
        ps = m.get("params") or {}
        fom = (m.get("fom") or {}).get(fom_key)
        row = [m.get("label", k).replace("$C_\\ell$", "C_ℓ")]
        row += [mean_std(ps[p]["mean"], ps[p]["std"]) if p in ps else "–" for p in sampled]
        s8 = m.get("S8") or {}
        row += [mean_std(s8.get("mean"), s8.get("std")), num(fom)]
        if ref:
            row.append(fixed((ratios.get("values", {}).get(k) or {}).get(fom_key)))
        if exact_fom:
            row.append(fixed(fom / exact_fom) if fom else "–")
        row.append("–" if k == against else fixed(c2st.get(frozenset((k, against))), 3))
        b = m.get("budget") or {}
        row.append(", ".join(x for x in (
            f"{num(b['wall_time_s'])} s" if b.get("wall_time_s") is not None else "",
            f"{b['n_simulations']} sims" if b.get("n_simulations") else "",
            f"{b['n_gradients']:,} gradients" if b.get("n_gradients") else "") if x) or "–")
        row.append(_metrics_status(data, k))
        rows.append(row)
    fom_names = ", ".join(param(p) for p in sampled[:2])
    header = ["method"] + [param(p) for p in sampled] + ["S_8", f"FoM({fom_names})"]
    if ref:
        header.append(f"/ {ref}" + (" (unconverged)" if unconverged_reference(data) else ""))
    if exact_fom:
        header.append("/ exact")
    header += [f"C2ST vs {against}", "budget", "status"]
    truth = data.get("truth") or {}
    out = ["Truth: " + ", ".join(f"{param(p)} = {num(truth[p], 4)}" for p in sampled + ["S8"]
                                 if p in truth) + "."]
    out.append(table(header, rows))
    others = [(pr["a"], pr["b"], pr.get("accuracy")) for pr in
              ((data.get("c2st") or {}).get("pairs") or []) if against not in (pr["a"], pr["b"])]
    if others:
        out.append("C2ST between the other methods: " + "; ".join(
            f"{a}–{b} {fixed(acc, 3)}" for a, b, acc in others) + ".")
    if data.get("warnings"):
        out.append("Warnings recorded in the file: " + "; ".join(data["warnings"]) + ".")
    return out


_LOSS_LABELS = {"npe_mse": "NPE on MSE summaries", "npe_mae": "NPE on MAE summaries",
                "npe_gnll": "NPE on GNLL summaries", "npe_vmim": "NPE on VMIM summaries",
                "npe_cl": "NPE on C_ℓ", "cl_analytic": "analytic C_ℓ (NUTS)",
                "hmc": "field-level reference (HMC)"}


def _implicit_status(m: Mapping) -> str:
    """The certificate of one implicit-benchmark method: MCMC diagnostics for the C_ℓ
    likelihood, calibration for an NPE; the exact posterior needs neither."""
    if m.get("method") == "exact":
        return "exact (grid)"
    if "ess" in m or m.get("method") in MCMC_METHODS:
        return status(mcmc_flag(m.get("ess"), m.get("r_hat")), "converged")
    return status(calibration_flag(m.get("calibration")), "calibrated")


def render_implicit(data: Mapping, source: Source | None) -> list[str]:
    """Notebook 6, 6b, 6c: one row per (method, training-set size)."""
    methods = data["methods"]
    epochs = any("compressor_epochs" in m for m in methods.values())
    names = next((list(m["mean"]) for m in methods.values() if m.get("mean")), [])
    pnames = ", ".join(param(p) for p in names)
    # FoM over the reference's: the row's own exact posterior where it records one (rows of other
    # observation seeds), else the reference method's
    ref = methods.get(data.get("reference")) or {}
    ratios = any(m.get("exact_fom_omega_c_sigma8") for m in methods.values()) or bool(
        ref.get("fom_omega_c_sigma8"))
    rows = []
    for key, m in methods.items():
        cal = m.get("calibration") or {}
        label = _LOSS_LABELS.get(m.get("method", key), m.get("method", key))
        if m.get("method") in MCMC_METHODS and m.get("n_samples"):
            label += f", {m['n_samples']} draws"
        row = [label, m.get("n_train", "–")]
        if epochs:
            row.append(m.get("compressor_epochs", "–"))
        c2 = "(reference)" if key == data.get("reference") else fixed(m.get("c2st_vs_reference"), 3)
        row.append(num(m.get("fom_omega_c_sigma8")))
        if ratios:
            base = m.get("exact_fom_omega_c_sigma8") or ref.get("fom_omega_c_sigma8")
            fom = m.get("fom_omega_c_sigma8")
            row.append(fixed(fom / base, 2) if fom and base else "–")
        row += [num(m.get("sigma_S8")),
                pair((m.get("bias_sigma") or {}).values(), signed),
                signed(cal.get("tarp_atc"), 3) if cal else "–",
                pair((cal.get("sbc_ks_pvals") or {}).values(), pval) if cal else "–",
                c2, _implicit_status(m)]
        rows.append(row)
    header = ["method", "n_train"] + (["epochs run"] if epochs else []) + [
        f"FoM({pnames})"] + ([f"FoM / {data.get('reference', '?')}"] if ratios else []) + [
        "σ(S_8)", f"bias {pnames} [σ]", "TARP ATC", f"SBC KS p {pnames}",
        f"C2ST vs {data.get('reference', '?')}", "status"]
    gen = data.get("generate") or {}
    facts = [f"Configuration `{data.get('config', '?')}`, observation seed "
             f"{data.get('observation_seed', '?')}; {gen.get('n_ok', '?')} of "
             f"{gen.get('n_sims', '?')} simulations ok."]
    if data.get("overrides"):
        facts.append("Overrides: " + ", ".join(f"`{o}`" for o in data["overrides"]) + ".")
    if data.get("c2st_classifier"):
        facts.append(f"C2ST: {data['c2st_classifier']}.")
    return [" ".join(facts), table(header, rows)]


def _flatten(obj, prefix: str = "") -> list[tuple[str, object]]:
    """(dotted key, value) pairs of a JSON tree; short lists of scalars stay one value."""
    if isinstance(obj, Mapping):
        out = []
        for k, v in obj.items():
            out += _flatten(v, f"{prefix}.{k}" if prefix else str(k))
        return out or [(prefix, "{}")]
    if isinstance(obj, list):
        if all(not isinstance(v, (Mapping, list)) for v in obj):
            if len(obj) <= 8:
                return [(prefix, "[" + ", ".join(_scalar(v) for v in obj) + "]")]
            nums = [v for v in obj if isinstance(v, (int, float)) and not isinstance(v, bool)]
            if len(nums) == len(obj):
                return [(prefix, f"{len(obj)} numbers, {num(min(nums))} to {num(max(nums))}")]
            return [(prefix, f"list of {len(obj)}")]
        out = []
        for i, v in enumerate(obj):
            out += _flatten(v, f"{prefix}[{i}]")
        return out
    return [(prefix, _scalar(obj))]


def _scalar(v) -> str:
    """One JSON scalar as a table cell."""
    if isinstance(v, float):
        return num(v)
    return "null" if v is None else str(v)


def _chain_flags(obj, prefix: str = "") -> list[tuple[str, str]]:
    """Every object of a JSON tree that holds both "ess" and "r_hat", with its convergence flag,
    so that an unknown file cannot show an unconverged chain without saying so."""
    out = []
    if isinstance(obj, Mapping):
        if isinstance(obj.get("ess"), Mapping) and isinstance(obj.get("r_hat"), Mapping):
            out.append((prefix or "(top level)",
                        status(mcmc_flag(obj["ess"], obj["r_hat"]), "converged")))
        for k, v in obj.items():
            out += _chain_flags(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _chain_flags(v, f"{prefix}[{i}]")
    return out


def render_efficiency(data: Mapping, source: Source | None) -> list[str]:
    """Notebook 12b: the simulation-efficiency table, as ``lensbench compare`` reports it."""
    from experiments.report import efficiency_table

    lines = efficiency_table(data)
    return ["\n".join(lines[2:]).strip()]  # without its own heading


MAX_GENERIC_ROWS = 200


def render_generic(data, source: Source | None) -> list[str]:
    """Any other file: a key/value table of its flattened contents (the first MAX_GENERIC_ROWS),
    plus the convergence status of every chain it records."""
    items = _flatten(data)
    rows = [[f"`{k}`" if k else "(value)", v] for k, v in items[:MAX_GENERIC_ROWS]]
    if len(items) > MAX_GENERIC_ROWS:
        rows.append(["…", f"{len(items) - MAX_GENERIC_ROWS} more entries"])
    out = [table(["key", "value"], rows)]
    flags = _chain_flags(data)
    if flags:
        out.append(table(["chain", "status"], [[f"`{k}`", v] for k, v in flags]))
    return out


RENDERERS: dict[str, Callable] = {
    "results_pm.json": render_pm,
    "results_scaling.json": render_scaling,
    "results_lensing.json": render_lensing,
    "results_cl_validation.json": render_cl_validation,
    "results_cl_lsst_y10.json": render_cl_maps,
    "results_cl_lsst_y10_window.json": render_cl_maps,
    "results_cl_quick_window.json": render_cl_maps,
    "results_cl_hires_patch.json": render_cl_maps,
    "results_cl_hires_patch_random.json": render_cl_maps,
    "results_pk_box.json": render_pk_box,
    "results_efficiency_gaussian_check.json": render_efficiency,
    "results_efficiency_quick.json": render_efficiency,
    "results_hmc.json": render_hmc,
    "results_hmc_coverage.json": render_coverage,
    "results_samplers_quick.json": render_samplers,
    "results_samplers_gaussian_check.json": render_samplers,
    "results_cl_gaussian_check_likelihoods.json": render_cl_vs_exact,
    "results_cl_calibration_quick.json": render_cl_calibration,
}


def renderer_for(name: str, data) -> Callable:
    """The section renderer of a file: by name, by the ``lensbench.metrics`` format, by the
    implicit benchmark's layout, else the generic table."""
    if name in RENDERERS:
        return RENDERERS[name]
    if isinstance(data, Mapping):
        if data.get("format") == "lensbench.metrics" and isinstance(data.get("methods"), Mapping):
            return render_metrics
        if isinstance(data.get("methods"), Mapping) and all(
                isinstance(m, Mapping) and "fom_omega_c_sigma8" in m
                for m in data["methods"].values()):
            return render_implicit
    return render_generic


# ---------------------------------------------------------------------------------------------
# The page


def title_of(name: str) -> str:
    """A section title for a file with no entry in SOURCES."""
    return name.removeprefix("results_").removesuffix(".json").replace("_", " ")


def section(numbers: Mapping[str, int], name: str, data, source: Source | None) -> str:
    """One section: title, what was measured, command, provenance, caveat, tables. A superseded
    file gets a pointer to its replacement (``numbers``: file name -> section number) and no
    table; a file that fails to render falls back to the generic table."""
    number = numbers[name]
    title = source.title if source else title_of(name)
    parts = [f"## {number}. {title}", f"Data: `{name}`."
             + (f" Discussion: [NOTEBOOK.md]({NOTEBOOK_NAME}) "
                f"{'sections' if ' and ' in source.notebook else 'section'} {source.notebook}."
                if source and source.notebook else "")]
    if source and source.superseded_by:
        where = (f" (section {numbers[source.superseded_by]})"
                 if source.superseded_by in numbers else "")
        parts.append(f"**Superseded** by `{source.superseded_by}`{where}. {source.what} Its "
                     f"table is kept in NOTEBOOK.md section {source.notebook}.")
        return "\n\n".join(parts)
    if source:
        parts.append(f"What: {source.what}")
        command = source.command or (coverage_command(data) if name == "results_hmc_coverage.json"
                                     else "")
        if command:
            parts.append("Command:\n\n" + code_block(command))
        parts.append(f"Recorded: {source.recorded}.")
        if source.caveat:
            parts.append(f"**Caveat.** {source.caveat}")
    else:
        parts.append("No description of this file is registered in "
                     "`experiments/benchmarks/render.py` (`SOURCES`); its contents as recorded:")
    render = renderer_for(name, data)
    try:
        blocks = render(data, source)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, ZeroDivisionError) as e:
        blocks = [f"(The {render.__name__} layout did not fit this file: "
                  f"{type(e).__name__}: {e}; shown as key/value pairs.)"]
        blocks += render_generic(data, None)
    parts += blocks
    return "\n\n".join(parts)


def load_results(directory: Path) -> dict[str, object]:
    """Every ``results_*.json`` of ``directory`` in page order: the known files in ORDER, then
    the others by name."""
    found = {p.name: p for p in directory.glob(PATTERN)}
    names = [n for n in ORDER if n in found] + sorted(n for n in found if n not in ORDER)
    return {n: json.loads(found[n].read_text()) for n in names}


HEADER = f"""# Benchmark results

Generated by `python -m experiments.benchmarks.render` from the committed
`experiments/benchmarks/results_*.json`; do not edit by hand (`--check` exits 1 when this page
differs from what the script writes, and `tests/test_render.py` checks it). These are the current
measurements only. How they came about, the investigations, the negative results and the
superseded measurements are in [NOTEBOOK.md]({NOTEBOOK_NAME}), in the order they were made;
results that have no `results_*.json` (e.g. the GPU timings of 7i, the MCLMC chains of 7k, the
C_ℓ covariance study of 8, the samplers of 9) are only there.

Certificates: an MCMC result whose file records ESS and split R̂ is flagged "unconverged" unless
every parameter has ESS ≥ {ESS_MIN} and split R̂ ≤ {R_HAT_MAX} (the thresholds of `lensbench
compare`); an NPE is flagged unless it was calibrated on held-out simulations (TARP and SBC), and
"miscalibrated" where a marginal's SBC rank KS p < {SBC_P_MIN}. Measured values are shown to 3
significant figures, biases, p-values and ratios to 2–3 decimals."""


def render_page(directory: Path = HERE) -> str:
    """The whole RESULTS.md text for the results files of ``directory``."""
    results = load_results(directory)
    numbers = {name: i for i, name in enumerate(results, start=1)}
    sections = [section(numbers, name, data, SOURCES.get(name)) for name, data in results.items()]
    contents = "\n".join(f"{i}. {(SOURCES[n].title if n in SOURCES else title_of(n))} (`{n}`)"
                         for i, n in enumerate(results, start=1))
    return "\n\n".join([HEADER, "Contents:\n\n" + contents] + sections) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Write the page, or with --check report whether the committed one is current."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true",
                    help="exit 1 when RESULTS.md differs from what would be written")
    ap.add_argument("--dir", type=Path, default=HERE, help="directory of the results files")
    args = ap.parse_args(argv)
    text = render_page(args.dir)
    page = args.dir / PAGE_NAME
    if args.check:
        current = page.read_text() if page.exists() else None
        if current != text:
            print(f"{page} is out of date: run python -m experiments.benchmarks.render",
                  file=sys.stderr)
            return 1
        return 0
    page.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
