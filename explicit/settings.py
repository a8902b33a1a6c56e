"""Sampler settings of a field-level HMC run (frozen, validated, JSON round-trippable)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from experiments.config import MIN_MCLMC_WARMUP, ConfigError, HmcSection, validate_section

__all__ = ["HMCSettings", "MIN_MCLMC_WARMUP"]


# Keys added after runs were first written, with the value that reproduces those runs: a saved
# settings dict without them still resumes and extends.
LATER_KEYS = {"precondition": "none", "energy_variance": 5e-4, "integrator": "velocity_verlet"}


def _configured(name: str):
    """The default of the [hmc] key of that name: a run built in Python and one configured in
    TOML sample alike unless told otherwise (docs/configuration.md documents them)."""
    return HmcSection.model_fields[name].default


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class HMCSettings:
    """How to sample. The defaults are those of the [hmc] configuration section
    (``experiments.config.HmcSection``), except ``dense_theta``, which no configuration sets.

    Attributes:
      sampler: "nuts" (numpyro NUTS, step size and mass matrix adapted in warm-up), "mclmc"
        (blackjax microcanonical Langevin, L and step size tuned in warm-up; 1 or 2 gradients per
        step, see integrator; unadjusted, so biased by its step size) or "mams" (Metropolis-
        adjusted microcanonical HMC, Robnik et al. 2025: MCLMC's tuning, then the step size
        adapted to target_accept; unbiased; a random number of gradients per iteration, ~L /
        step size on average).
      num_warmup: warm-up iterations per chain (NUTS: adaptation; MCLMC/MAMS: tuning, >= 20).
      num_samples: kept iterations per chain, >= 1.
      num_chains: chains, run one after another, >= 1.
      max_tree_depth: NUTS tree depth cap (at most 2^depth gradients per iteration), 1..15.
      target_accept: NUTS and MAMS dual-averaging target acceptance probability, in (0, 1).
      energy_variance: MCLMC (and MAMS's MCLMC warm-up stage): energy-error variance per
        dimension that blackjax tunes the step size to; smaller is less biased and slower.
      integrator: MCLMC (and MAMS's MCLMC warm-up stage): "velocity_verlet" or "mclachlan"
        (``experiments.config.MCLMC_INTEGRATORS``: 1 and 2 gradients per step).
      dense_theta: NUTS mass matrix dense over the θ sites and diagonal for the field
        (otherwise diagonal everywhere).
      precondition: "none" or "fourier": sample the field in the variables of
        ``explicit.precondition`` (each Fourier mode scaled by its linearised posterior width,
        estimated once at the start from Hessian-vector products); any sampler.
      segment: iterations per checkpointed segment (one jitted scan), >= 1.
      thin_field: keep the field every thin_field-th sample (0: never).
      seed: base random seed; chain c uses fold_in(PRNGKey(seed), c). >= 0.
    """

    sampler: str = _configured("sampler")
    num_warmup: int = _configured("num_warmup")
    num_samples: int = _configured("num_samples")
    num_chains: int = _configured("num_chains")
    max_tree_depth: int = _configured("max_tree_depth")
    target_accept: float = _configured("target_accept")
    dense_theta: bool = True
    energy_variance: float = _configured("energy_variance")
    integrator: str = _configured("integrator")
    precondition: str = _configured("precondition")
    segment: int = _configured("segment")
    thin_field: int = _configured("thin_field")
    seed: int = _configured("seed")

    def __post_init__(self):
        """The keys of the [hmc] section are checked by its model (one validation for both), with
        messages that start with the key: ``num_samples must be >= 1, got 0``."""
        try:
            section = validate_section("hmc", {k: getattr(self, k) for k in _SECTION_KEYS})
        except ConfigError as e:
            key, _, problem = str(e).removeprefix("hmc.").partition(": ")
            raise ValueError(f"{key} {problem}") from None
        object.__setattr__(self, "target_accept", section.target_accept)
        object.__setattr__(self, "energy_variance", section.energy_variance)
        if not isinstance(self.dense_theta, bool):
            raise ValueError(f"dense_theta must be True or False, got {self.dense_theta!r}")

    @property
    def n_iterations(self) -> int:
        """Iterations of the segmented loop per chain (NUTS: warm-up + samples; MCLMC and MAMS
        tune before the loop, so samples only)."""
        return self.num_samples + (self.num_warmup if self.sampler == "nuts" else 0)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @staticmethod
    def with_later_keys(saved: dict) -> dict:
        """A saved settings dict completed with the ``LATER_KEYS`` it predates."""
        return {**LATER_KEYS, **saved} if isinstance(saved, dict) and saved else saved

    def extends(self, saved: dict) -> bool:
        """True when a run written with ``saved`` settings can be continued under these: the only
        difference is more samples per chain (num_samples does not enter the sampler's warm-up
        or compiled code, so continuing gives the draws of one uninterrupted longer run)."""
        mine = self.to_dict()
        rest = {k: v for k, v in mine.items() if k != "num_samples"}
        return (set(saved) == set(mine) and rest == {k: saved[k] for k in rest}
                and _is_int(saved["num_samples"]) and saved["num_samples"] <= self.num_samples)

    def differences(self, other: dict) -> list[str]:
        """'name: other → self' for each field that differs from a saved settings dict."""
        mine = self.to_dict()
        keys = sorted(set(mine) | set(other))
        return [f"{k}: {other.get(k, '<missing>')!r} → {mine.get(k, '<missing>')!r}"
                for k in keys if mine.get(k, object()) != other.get(k, object())]


# the fields that are keys of the [hmc] section (dense_theta is not)
_SECTION_KEYS = tuple(f.name for f in dataclasses.fields(HMCSettings) if f.name != "dense_theta")
