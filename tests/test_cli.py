"""The command line, end to end on a tiny model, including YAML configs and one-line errors."""

import json

import pytest
import yaml

from offsite.cli import main
from offsite.data import save_examples


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_two_party_round_trip_from_the_cli(base_dir, examples, tmp_path, capsys):
    data = tmp_path / "train.jsonl"
    save_examples(examples, data)
    code, out, _ = run(capsys, "compress", "--model", base_dir, "--out", tmp_path / "emu", "--num-kept", 2)
    assert code == 0 and "emulator -> original [0, 1, 2, 5, 6, 7]" in out

    config = tmp_path / "ft.yaml"
    config.write_text(yaml.safe_dump({"bundle": str(tmp_path / "emu"), "data": str(data), "lora": True, "lora_r": 4, "max_steps": 3, "batch_size": 4}))
    code, out, _ = run(capsys, "finetune", "--config", config, "--out", tmp_path / "run", "--lr", "0.01")
    assert code == 0, out
    manifest = json.loads((tmp_path / "run" / "adapter" / "manifest.json").read_text())
    assert manifest["training"]["lora_r"] == 4 and manifest["training"]["learning_rate"] == 0.01  # YAML + flag
    assert manifest["metrics"]["steps"] == 3

    code, out, _ = run(capsys, "plugin", "--model", base_dir, "--adapter", tmp_path / "run" / "adapter", "--out", tmp_path / "plugged")
    assert code == 0
    code, out, _ = run(capsys, "inspect", tmp_path / "run" / "adapter")
    assert code == 0 and "lora on original blocks [0, 1, 6, 7]" in out and "SHA-256 verified" in out
    code, out, _ = run(capsys, "inspect", tmp_path / "plugged", "--json")
    assert code == 0 and json.loads(out)["kind"] == "plugged"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["compress", "--out", "x"], "missing required option --model"),
        (["compress", "--model", "no-such-model", "--out", "x"], "neither a checkpoint directory nor a known asset"),
        (["inspect", "nowhere"], "bundle not found"),
        (["finetune", "--bundle", "b", "--out", "o"], "exactly one of --data"),
        (["finetune", "--config", "missing.yaml"], "config file not found"),
    ],
)
def test_errors_are_one_line(argv, message, capsys):
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert err.startswith("offsite: error: ") and message in err and err.count("\n") == 1


def test_method_flags_are_checked_by_the_method(base_dir, tmp_path, capsys):
    code, _, err = run(capsys, "compress", "--model", base_dir, "--out", tmp_path / "e", "--num-kept", 9)
    assert code == 2 and "more than the 4 middle blocks" in err
    assert not (tmp_path / "e").exists()
    code, _, err = run(capsys, "compress", "--model", base_dir, "--out", tmp_path / "e", "--kept-blocks", "2,5")
    assert code == 0
