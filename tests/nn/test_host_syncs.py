"""Host syncs of a quantized forward, counted on the CPU, and the caches that removed them.

On CUDA every ``bool(tensor)`` / ``.item()`` waits for the GPU. Each such read dispatches
``aten::_local_scalar_dense`` on any device, so a :class:`TorchDispatchMode` that counts that op on the
CPU counts exactly the syncs a CUDA run would make (measured on an H200: a ResNet-18 W8A8 QAT step made
339 before the flag cache, the count this mode gives for the same model on the CPU).

The caches are keyed on the tensors' version counters; the tests check that every way lowbit or a user
changes a flag, a bias or a scale is seen.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lowbit
from lowbit import QuantSpec
from lowbit.nn.quantizer import TensorQuantizer, buffer_flag, quantizers

from .._syncs import checks_off, count_syncs


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                         nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


def test_ptq_eval_forward_makes_no_host_sync():
    x = torch.randn(2, 3, 8, 8)
    q = lowbit.quantize(_net().eval(), lowbit.recipes.W8A8(), [x], x, progress=False).eval()
    assert any(m.int32_bias(m.bias, 4) is not None for m in q.modules() if hasattr(m, "int32_bias"))
    with torch.no_grad():
        first = q(x)
        assert count_syncs(lambda: q(x)) == 0  # was 4-5 per quantizer: the flags, the int32 bias check
        assert torch.equal(q(x), first)


def test_qat_step_syncs_only_in_the_nan_checks():
    x, y = torch.randn(2, 3, 8, 8), torch.tensor([0, 3])
    qat = lowbit.prepare_qat(_net(), lowbit.recipes.W8A8(), [x], x, progress=False)
    opt = torch.optim.SGD(qat.parameters(), lr=1e-3)

    def step():
        loss = nn.functional.cross_entropy(qat(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    step()
    n_quantizers = sum(1 for _ in quantizers(qat))
    with checks_off():
        off = count_syncs(step)
    on = count_syncs(step)
    # the step counter of the schedule and the Linear's int32 bias (its bias changed in the step): 2
    assert off <= 2, off
    # observer update + range check, per observing quantizer
    assert on - off == 2 * n_quantizers


@pytest.mark.parametrize("write", ["fill_", "copy_", "load_state_dict", "set_mode", "no_grad_assign", "deepcopy"])
def test_flag_cache_sees_every_write(write):
    q = TensorQuantizer(QuantSpec("int8"), name="t")
    with q.observing():
        q(torch.tensor([-1.0, 1.0]))
    x = torch.tensor([0.3333])
    assert float(q(x)) != float(x)  # quantizing, and the flag is now cached
    assert buffer_flag(q, "quant_enabled") is True
    if write == "fill_":
        q.quant_enabled.fill_(False)
    elif write == "copy_":
        q.quant_enabled.copy_(torch.tensor(False))
    elif write == "load_state_dict":
        sd = q.state_dict()
        sd["quant_enabled"] = torch.tensor(False)
        q.load_state_dict(sd)
    elif write == "set_mode":
        q.set_mode(observe=False, quantize=False)
    elif write == "no_grad_assign":
        q.quant_enabled = torch.tensor(False)  # a new tensor object: a new key
    else:
        # a copy's tensors are new objects whose version counters restart: an entry copied along with
        # the module could match them by chance (it did: a QAT model's deep copy kept observing), so the
        # cache lives outside the modules
        q.quant_enabled.fill_(False)
        q = copy.deepcopy(q)
    assert float(q(x)) == float(x)  # off: the input unchanged
    assert buffer_flag(q, "quant_enabled") is False


def test_int32_bias_cache_follows_bias_and_scale_changes():
    x = torch.randn(2, 3, 8, 8)
    q = lowbit.quantize(_net().eval(), lowbit.recipes.W8A8(), [x], x, progress=False).eval()
    conv = next(m for m in q.modules() if isinstance(m, nn.Conv2d) and m.int32_bias(m.bias, 4) is not None)
    before = conv.int32_bias(conv.bias, 4).codes.clone()
    with torch.no_grad():
        conv.bias.add_(1.0)
    after = conv.int32_bias(conv.bias, 4)
    assert not torch.equal(after.codes, before)
    fresh = lowbit.nn.bias.int32_bias(conv.bias, conv.bias_input_quantizer().scale, conv.weight_quantizer.scale,
                                      conv.weight.numel() // conv.bias.numel())
    assert torch.equal(after.codes, fresh.codes)
    iq = conv.bias_input_quantizer()
    iq.set_qparams(iq.scale * 2, iq.zero_point)
    doubled = conv.int32_bias(conv.bias, 4)
    assert not torch.equal(doubled.codes, after.codes)


def test_bias_correction_and_equalization_writes_move_the_version():
    """The passes write in place under no_grad (not through .data), so the caches keyed on versions see them."""
    from lowbit.passes._layer import scale_in_channels, scale_out_channels
    from lowbit.passes.bias_correction import _sub_bias

    lin = nn.Linear(3, 2)
    versions = (lin.weight._version, lin.bias._version)
    scale_out_channels(lin, torch.tensor([2.0, 4.0]))
    scale_in_channels(lin, torch.tensor([1.0, 2.0, 3.0]))
    _sub_bias(lin, torch.tensor([0.1, 0.2]))
    assert lin.weight._version >= versions[0] + 2 and lin.bias._version >= versions[1] + 2
