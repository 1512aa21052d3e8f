"""Model capture: torch.fx graph when the model traces, module swap when it does not; the plan of which
spec each layer gets; the decision log; calibration data handling; read-back tables."""

from .data import as_call, iter_calls
from .log import Decision, DecisionLog
from .plan import Planner, Resolved
from .readback import LayerSQNR, QuantRecord, layer_sqnr, quant_table, quantization_disabled

__all__ = [
    "as_call", "iter_calls", "Decision", "DecisionLog", "Planner", "Resolved",
    "LayerSQNR", "QuantRecord", "layer_sqnr", "quant_table", "quantization_disabled",
]
