"""Field-level (explicit) inference: HMC over cosmological parameters θ and the latent field z.

The numpyro model ``field_model`` ties θ and the white-noise initial conditions z to noisy κ maps
through a ``simulators`` map model (gradients through the simulation); ``run_hmc`` samples it with
NUTS (numpyro) or MCLMC (blackjax) in checkpointed, resumable segments; ``read_chains`` loads a
finished run. θ samples come out as a (num_chains, num_samples, d) array plus parameter names.

    model = field_model(map_model, {"Omega_c": dist.Uniform(0.1, 0.5)}, base, data, sigma_n)
    result = run_hmc(model, HMCSettings(num_chains=2), "runs/hmc", theta_names=model.theta_names)
    result.theta, result.names, result.diagnostics

Depends on ``simulators``, and on ``experiments.files`` (atomic writes) and ``experiments.config``
(``HMCSettings`` takes the defaults and checks of the [hmc] section).
"""

from .checkpoint import CheckpointError
from .model import FIELD_SITE, FieldModel, LogDensity, field_model, log_density
from .sampling import HMCResult, read_chains, run_hmc
from .settings import HMCSettings
from .start import field_start

__all__ = ["CheckpointError", "FIELD_SITE", "FieldModel", "HMCResult", "HMCSettings", "LogDensity",
           "field_model", "field_start", "log_density", "read_chains", "run_hmc"]
