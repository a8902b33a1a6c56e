"""Sampler settings of a field-level HMC run (frozen, validated, JSON round-trippable)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

SAMPLERS = ("nuts", "mclmc", "mams")
PRECONDITIONERS = ("none", "fourier")
MIN_MCLMC_WARMUP = 20  # blackjax's three tuning stages each need a few steps (MAMS starts with them)


# Keys added after runs were first written, with the value that reproduces those runs: a saved
# settings dict without them still resumes and extends.
LATER_KEYS = {"precondition": "none"}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class HMCSettings:
    """How to sample.

    Attributes:
      sampler: "nuts" (numpyro NUTS, step size and mass matrix adapted in warm-up), "mclmc"
        (blackjax microcanonical Langevin, L and step size tuned in warm-up; 1 gradient per step;
        unadjusted, so biased by its step size) or "mams" (Metropolis-adjusted microcanonical
        HMC, Robnik et al. 2025: MCLMC's tuning, then the step size adapted to target_accept;
        unbiased; a random number of gradients per iteration, ~L / step size on average).
      num_warmup: warm-up iterations per chain (NUTS: adaptation; MCLMC/MAMS: tuning, >= 20).
      num_samples: kept iterations per chain, >= 1.
      num_chains: chains, run one after another, >= 1.
      max_tree_depth: NUTS tree depth cap (at most 2^depth gradients per iteration), 1..15.
      target_accept: NUTS and MAMS dual-averaging target acceptance probability, in (0, 1).
      dense_theta: NUTS mass matrix dense over the θ sites and diagonal for the field
        (otherwise diagonal everywhere).
      precondition: "none" or "fourier": sample the field in the variables of
        ``explicit.precondition`` (each Fourier mode scaled by its linearised posterior width,
        estimated once at the start from Hessian-vector products); any sampler.
      segment: iterations per checkpointed segment (one jitted scan), >= 1.
      thin_field: keep the field every thin_field-th sample (0: never).
      seed: base random seed; chain c uses fold_in(PRNGKey(seed), c). >= 0.
    """

    sampler: str = "nuts"
    num_warmup: int = 500
    num_samples: int = 1000
    num_chains: int = 2
    max_tree_depth: int = 10
    target_accept: float = 0.8
    dense_theta: bool = True
    precondition: str = "none"
    segment: int = 100
    thin_field: int = 0
    seed: int = 0

    def __post_init__(self):
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        minimum = {"num_warmup": 0, "num_samples": 1, "num_chains": 1, "max_tree_depth": 1,
                   "segment": 1, "thin_field": 0, "seed": 0}
        for name, low in minimum.items():
            v = getattr(self, name)
            if not _is_int(v) or v < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {v!r}")
        if self.max_tree_depth > 15:
            raise ValueError(f"max_tree_depth must be <= 15 (2^15 gradients per iteration), "
                             f"got {self.max_tree_depth}")
        if self.precondition not in PRECONDITIONERS:
            raise ValueError(f"precondition must be one of {PRECONDITIONERS}, got "
                             f"{self.precondition!r}")
        if self.sampler in ("mclmc", "mams") and self.num_warmup < MIN_MCLMC_WARMUP:
            raise ValueError(f"num_warmup must be >= {MIN_MCLMC_WARMUP} for {self.sampler} (its "
                             f"tuning stages need steps), got {self.num_warmup}")
        ta = self.target_accept
        if isinstance(ta, bool) or not isinstance(ta, (int, float)) or not 0 < ta < 1:
            raise ValueError(f"target_accept must be a number in (0, 1), got {ta!r}")
        object.__setattr__(self, "target_accept", float(ta))
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
