"""Graph passes on float models, one per file, each named after its paper.

* :func:`fold_bn` - BatchNorm folding (keeps the BatchNorm statistics for the data-free passes);
* :func:`equalize` - cross-layer equalization (Nagel et al. 2019, DFQ section 4.1);
* :func:`absorb_high_bias` - high-bias absorption (DFQ section 4.1.1);
* :func:`correct_bias` - analytic and empirical bias correction (DFQ section 4.2);
* :func:`adaround` - adaptive rounding of weights (Nagel et al. 2020), per layer or per block
  (``AdaRoundConfig(granularity="block")``: BRECQ, Li et al. 2021; :func:`find_blocks`);
* :func:`bn_activation_ranges` - data-free activation ranges from BatchNorm statistics (DFQ);
* :func:`distill_inputs` - synthetic calibration inputs distilled from BatchNorm statistics (ZeroQ);
* :mod:`~lowbit.passes.pipeline` - which of these :func:`lowbit.quantize` runs (``dfq=DFQ()``, ``adaround=``).
"""

from __future__ import annotations

from .adaround import AdaRoundConfig, AdaRoundResult, adaround, adaround_layer
from .bias_correction import clipped_normal_mean, correct_bias, correct_layer_bias
from .bn_ranges import Moments, bn_activation_ranges, clipped_normal_moments
from .brecq import find_blocks
from .cle import equalize, equalize_pair
from .clip import ChannelClip
from .distill import DistillConfig, DistillResult, distill_inputs
from .fold_bn import BNStats, fold_bn, fold_bn_into, output_stats
from .high_bias_absorption import absorb_high_bias, absorb_pair
from .pipeline import DFQ, apply_weight_qparams, layer_bn_stats, run_passes, weight_specs

__all__ = ["fold_bn", "fold_bn_into", "BNStats", "output_stats", "equalize", "equalize_pair", "ChannelClip",
           "absorb_high_bias", "absorb_pair", "correct_bias", "correct_layer_bias", "clipped_normal_mean",
           "adaround", "adaround_layer", "AdaRoundConfig", "AdaRoundResult", "DFQ", "run_passes", "weight_specs",
           "apply_weight_qparams", "layer_bn_stats", "bn_activation_ranges", "clipped_normal_moments", "Moments",
           "find_blocks", "DistillConfig", "DistillResult", "distill_inputs"]
