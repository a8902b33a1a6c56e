"""Neural compressors: tomographic maps (n, n_bins, npix, npix) → low-dimensional summaries.

Simulator-agnostic: everything takes numpy arrays of maps, parameters θ (n, d) and the per-bin
shape-noise rms sigma_n (n_bins,). Losses (Lanzieri et al. 2025): "mse", "mae", "gnll" (full
covariance Gaussian NLL) and "vmim" (variational mutual-information maximisation with a
conditional normalizing flow, ``compressors.flow``).

    >>> comp = train_compressor(maps, theta, sigma_n, TrainConfig(loss="vmim"), "runs/vmim")
    >>> t = load_compressor("runs/vmim").compress(noisy_maps)     # (n, summary_dim)

``compress`` returns θ estimates in θ units for mse/mae/gnll and the raw summary t for vmim.
"""

from .flow import ConditionalFlow
from .losses import LOSSES
from .networks import build_network
from .train import Compressor, TrainConfig, load_compressor, train_compressor

__all__ = ["LOSSES", "TrainConfig", "Compressor", "train_compressor", "load_compressor",
           "build_network", "ConditionalFlow"]
