"""``lowbit explain``: fields and values checked against torch's own casts and closed-form cases."""

from __future__ import annotations

import json

import pytest
import torch

from .conftest import call, run_cli


@pytest.fixture
def _explain(capsys):
    def run(*args: str) -> dict:
        rc, out, err = call(capsys, "explain", *args, "--json")
        assert rc == 0, err
        return json.loads(out)
    return run


def test_fp16_text_output():
    r = run_cli("explain", "0.1", "--format", "fp16")
    assert r.returncode == 0, r.stderr
    assert "0.0999755859375" in r.stdout
    assert "0010111001100110" in r.stdout
    assert "exponent 01011" in r.stdout and "mantissa 1001100110" in r.stdout
    assert "normal" in r.stdout


@pytest.mark.parametrize("fmt,dtype,value", [("fp16", torch.float16, 0.1), ("bf16", torch.bfloat16, 0.1),
                                             ("fp8_e4m3", torch.float8_e4m3fn, 0.3),
                                             ("fp8_e5m2", torch.float8_e5m2, -1.7)])
def test_minifloats_match_torch_casts(fmt, dtype, value, _explain):
    d = _explain(str(value), "--format", fmt)
    t = torch.tensor(value, dtype=torch.float64).to(dtype)
    assert d["stored"] == float(t.double())
    assert d["error"] == float(t.double()) - value
    bits = int(t.view(torch.int16 if t.element_size() == 2 else torch.int8).item()) & ((1 << (8 * t.element_size())) - 1)
    assert d["bits"] == format(bits, f"0{8 * t.element_size()}b")
    assert d["sign"] == (1 if value < 0 else 0)


def test_fp16_fields_of_point_one(_explain):
    d = _explain("0.1", "--format", "fp16")
    assert (d["sign"], d["exponent_bits"], d["mantissa_bits"]) == (0, "01011", "1001100110")
    assert d["exponent"] == -4 and d["kind"] == "normal" and d["stored"] == 0.0999755859375


def test_fp16_subnormal_and_overflow(_explain):
    assert _explain("1e-6", "--format", "fp16")["kind"] == "subnormal"
    assert _explain("70000", "--format", "fp16")["kind"] == "inf"
    sat = _explain("70000", "--format", "fp16", "--saturate")
    assert sat["stored"] == 65504.0 and sat["saturated"] is True


def test_fp4_e2m1_rounds_to_grid(_explain):
    d = _explain("2.4", "--format", "fp4_e2m1")
    assert d["stored"] == 2.0 and d["bits"] == "0100"  # e2m1 grid 0, .5, 1, 1.5, 2, 3, 4, 6


def test_int8_with_scale_closed_form(_explain):
    d = _explain("0.1", "--format", "int8", "--scale", "0.0039")
    assert d["code"] == round(0.1 / 0.0039) == 26
    assert d["stored"] == 26 * 0.0039
    assert d["bits"] == "00011010"
    neg = _explain("-1", "--format", "int8", "--scale", "0.0039")
    assert neg["code"] == -128 and neg["saturated"] is True and neg["bits"] == "10000000"


def test_explain_errors(capsys):
    r = run_cli("explain", "0.1", "--format", "fp17")  # subprocess: exit code and no traceback
    assert r.returncode == 1 and "unknown number format" in r.stderr and "Traceback" not in r.stderr
    rc, _, err = call(capsys, "explain", "0.1", "--format", "int8", "--scale", "-1")
    assert rc == 1 and "--scale must be a positive" in err
    rc, _, err = call(capsys, "explain", "abc")
    assert rc == 2 and "invalid float value" in err
    rc, _, err = call(capsys, "explain", "1", "--format", "int8", "--zero-point", "1000")
    assert rc == 1 and "give one in [-128, 127]" in err
