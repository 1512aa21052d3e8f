"""``lowbit --help`` on every command, ``lowbit inspect`` totals, and the MODEL error paths."""

from __future__ import annotations

import json

import pytest

from .conftest import TINY, call, run_cli

COMMANDS = ("quantize", "eval", "bench", "inspect", "explain", "demo")


def test_top_level_help_subprocess():
    r = run_cli("--help")
    assert r.returncode == 0
    for c in COMMANDS:
        assert c in r.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_with_examples(capsys, command):
    rc, out, _ = call(capsys, command, "--help")
    assert rc == 0
    assert "examples:" in out and f"lowbit {command}" in out


def test_no_command_is_a_usage_error(capsys):
    rc, _, err = call(capsys)
    assert rc == 2 and "COMMAND" in err


def test_inspect_totals_of_tiny_model(capsys):
    import torch

    from .tiny_models import tiny_net

    rc, out, err = call(capsys, "inspect", TINY, "--json")
    assert rc == 0, err
    d = json.loads(out)
    m = tiny_net()
    assert d["total_params"] == sum(p.numel() for p in m.parameters()) == 356
    # closed form on 1x3x8x8: conv 64 px * 8 out * 27, depthwise 64 * 8 * 9, linear 8 * 4
    assert d["total_macs"] == 64 * 8 * 27 + 64 * 8 * 9 + 8 * 4 == 18464
    assert d["input_shapes"] == [[1, 3, 8, 8]]
    assert d["bytes"] == {"fp32": 1424, "fp16": 712, "int8": 356, "int4": 178}
    assert torch.equal(m.conv1.weight, tiny_net().conv1.weight)  # the factory is deterministic


def test_inspect_table_names_layers(capsys):
    rc, out, _ = call(capsys, "inspect", TINY)
    assert rc == 0
    for name in ("conv1", "bn1", "dw", "fc"):
        assert name in out
    assert "356 params" in out and "18.46 kMACs" in out


def test_inspect_input_shape_from_option_and_data(capsys, tiny_data):
    rc, out, _ = call(capsys, "inspect", TINY, "--input-shape", "3,16,16", "--json")
    assert rc == 0 and json.loads(out)["total_macs"] == 256 * 8 * 27 + 256 * 8 * 9 + 32
    rc, out, _ = call(capsys, "inspect", TINY, "--data", str(tiny_data["npy"]), "--json")
    assert rc == 0 and json.loads(out)["input_shapes"] == [[1, 3, 8, 8]]


def test_model_errors_subprocess():
    r = run_cli("inspect", "tests.cli.tiny_models:broken")
    assert r.returncode == 1
    assert "broken on purpose" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("model,needle", [
    ("tests.cli.tiny_models:not_a_module", "not a torch.nn.Module"),
    ("tests.cli.tiny_models:missing", "has no callable 'missing'"),
    ("no_such_pkg_xyz.mod:build", "cannot import module"),
    ("no_such_model", "unknown MODEL"),
    ("missing/file.pt2", "does not exist"),
    ("missing/file.py:build", "does not exist"),
    ("torchvision:resnet1000", "torchvision has no model"),
])
def test_model_errors(capsys, model, needle):
    rc, _, err = call(capsys, "inspect", model)
    assert rc == 1
    assert needle in err


def test_bad_input_shape_is_usage_error(capsys):
    rc, _, err = call(capsys, "inspect", TINY, "--input-shape", "3,a")
    assert rc == 2 and "C,H,W" in err


def test_main_in_process_restores_lowbit_log_level(capsys):
    import logging

    from lowbit.cli import main

    log = logging.getLogger("lowbit")
    before = log.level
    assert main(["explain", "0.1", "--format", "fp16"]) == 0
    assert log.level == before  # the quiet default applies to the command only


def test_error_message_is_one_line(capsys, tmp_path):
    """load_state_dict's report spans lines; the CLI prints it on the one error line."""
    import torch

    torch.save({"conv1.weight": torch.zeros(2, 3, 3, 3)}, tmp_path / "w.pt")
    rc, _, err = call(capsys, "inspect", TINY, "--weights", str(tmp_path / "w.pt"))
    assert rc == 1 and "size mismatch" in err
    assert err.strip().count("\n") == 0 and err.startswith("lowbit inspect: error: cannot load the weights"), err
