"""Quantization-aware training: :func:`prepare_qat` -> any training loop -> :func:`convert`.

>>> qat = lowbit.prepare_qat(model, lowbit.recipes.W8A8(), calib_data)      # doctest: +SKIP
>>> train(qat)                                                              # doctest: +SKIP
>>> deployable = lowbit.convert(qat)                                        # doctest: +SKIP
"""

from .config import LEARNABLE, QATConfig
from .conv_bn import CONV_BN_TYPES, ConvBnMixin, QuantConvBn1d, QuantConvBn2d, QuantLinearBn1d
from .convert import convert
from .distill import distillation_loss
from .prepare import is_qat_model, prepare_qat
from .schedule import freeze_bn, freeze_observers, qat_step

__all__ = [
    "prepare_qat", "convert", "QATConfig", "LEARNABLE", "distillation_loss",
    "freeze_bn", "freeze_observers", "qat_step", "is_qat_model",
    "ConvBnMixin", "QuantConvBn1d", "QuantConvBn2d", "QuantLinearBn1d", "CONV_BN_TYPES",
]
