"""The command line, end to end on a tiny model, including YAML configs and one-line errors."""

import dataclasses
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
    owner, data_owner = tmp_path / "owner-keys", tmp_path / "data-keys"
    for keys in (owner, data_owner):
        code, out, _ = run(capsys, "keygen", "--out", keys)
        assert code == 0 and "key id" in out
    code, out, _ = run(capsys, "compress", "--model", base_dir, "--out", tmp_path / "emu", "--num-kept", 2,
                       "--sign-key", owner / "offsite.key")
    assert code == 0 and "emulator -> original [0, 1, 2, 5, 6, 7]" in out and "manifest.sig present" in out

    config = tmp_path / "ft.yaml"
    config.write_text(yaml.safe_dump({"bundle": str(tmp_path / "emu"), "data": str(data), "lora": True, "lora_r": 4, "max_steps": 3, "batch_size": 4}))
    code, _, err = run(capsys, "finetune", "--config", config, "--out", tmp_path / "run", "--trusted-key", data_owner / "offsite.pub")
    assert code == 1 and "signature does not verify" in err and not (tmp_path / "run" / "adapter").exists()
    code, out, _ = run(capsys, "finetune", "--config", config, "--out", tmp_path / "run", "--lr", "0.01",
                       "--trusted-key", owner / "offsite.pub", "--sign-key", data_owner / "offsite.key")
    assert code == 0, out
    adapter = tmp_path / "run" / "adapter"
    manifest = json.loads((adapter / "manifest.json").read_text())
    assert manifest["training"]["lora_r"] == 4 and manifest["training"]["learning_rate"] == 0.01  # YAML + flag
    assert manifest["metrics"]["steps"] == 3
    assert "sign_key" not in manifest["training"] and str(data_owner) not in (adapter / "manifest.json").read_text()

    code, out, _ = run(capsys, "verify", adapter, "--key", data_owner / "offsite.pub")
    assert code == 0 and out.startswith(f"OK: {adapter}: adapter bundle")
    code, _, err = run(capsys, "verify", adapter, "--key", owner / "offsite.pub")
    assert code == 1 and err.count("\n") == 1 and "signature does not verify" in err

    code, _, err = run(capsys, "plugin", "--model", base_dir, "--adapter", adapter, "--out", tmp_path / "plugged")
    assert code == 2 and "missing required option --emulator" in err
    code, out, _ = run(capsys, "plugin", "--model", base_dir, "--adapter", adapter, "--emulator", tmp_path / "emu",
                       "--trusted-key", data_owner / "offsite.pub", "--out", tmp_path / "plugged")
    assert code == 0
    code, out, _ = run(capsys, "inspect", adapter)
    assert code == 0 and "lora on original blocks [0, 1, 6, 7]" in out and "SHA-256 verified" in out
    code, out, _ = run(capsys, "inspect", tmp_path / "plugged", "--json")
    assert code == 0 and json.loads(out)["kind"] == "plugged"


def test_verify_names_the_tampered_file(tmp_path, capsys, base_dir):
    run(capsys, "keygen", "--out", tmp_path / "k")
    code, _, err = run(capsys, "keygen", "--out", tmp_path / "k")
    assert code == 1 and "already exists, not overwriting" in err
    run(capsys, "compress", "--model", base_dir, "--out", tmp_path / "emu", "--num-kept", 2, "--sign-key", tmp_path / "k" / "offsite.key")
    code, out, _ = run(capsys, "verify", tmp_path / "emu", "--key", tmp_path / "k" / "offsite.pub")
    assert code == 0 and "OK" in out
    weights = tmp_path / "emu" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x10
    weights.write_bytes(bytes(data))
    code, out, err = run(capsys, "verify", tmp_path / "emu", "--key", tmp_path / "k" / "offsite.pub")
    assert code == 1 and out == "" and err.count("\n") == 1 and "model.safetensors does not match its SHA-256" in err
    code, _, err = run(capsys, "verify", tmp_path / "emu")
    assert code == 2 and "give --key" in err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["compress", "--out", "x"], "missing required option --model"),
        (["compress", "--model", "no-such-model", "--out", "x"], "neither a checkpoint directory nor a known asset"),
        (["inspect", "nowhere"], "bundle not found"),
        (["finetune", "--bundle", "b", "--out", "o"], "exactly one of --data"),
        (["finetune", "--config", "missing.yaml"], "config file not found"),
        (["plugin", "--model", "m", "--adapter", "a", "--out", "o"], "missing required option --emulator"),
        (["evaluate", "--model", "m", "--adapter", "a"], "missing required option --emulator"),
        (["verify", "nowhere", "--key", "missing.pub"], "public key file not found"),
        (["keygen"], "missing required option --out"),
    ],
)
def test_errors_are_one_line(argv, message, capsys):
    """Exit status 2 for a wrong command line (missing, unknown or conflicting options), 1 for a
    command that was understood and failed; one line either way."""
    code, out, err = run(capsys, *argv)
    usage = "missing required option" in message or "exactly one of" in message
    assert code == (2 if usage else 1)
    assert err.startswith("offsite: error: ") and message in err and err.count("\n") == 1


def test_method_flags_are_checked_by_the_method(base_dir, tmp_path, capsys):
    code, _, err = run(capsys, "compress", "--model", base_dir, "--out", tmp_path / "e", "--num-kept", 9)
    assert code == 1 and "more than the 4 middle blocks" in err
    assert not (tmp_path / "e").exists()
    code, _, err = run(capsys, "compress", "--model", base_dir, "--out", tmp_path / "e", "--kept-blocks", "2,5")
    assert code == 0


def test_evaluate_takes_user_task_files_and_checks_every_task_first(base_dir, tmp_path, capsys, monkeypatch):
    import json as _json

    import offsite.cli as C

    mine = tmp_path / "mine.jsonl"
    mine.write_text("\n".join(_json.dumps(r) for r in [
        {"context": "The capital of France is", "choices": [" Paris", " Rome"], "gold": 0},
        {"context": "Two plus two is", "choices": [" four", " five", " six"], "gold": 0},
    ]) + "\n")
    out = tmp_path / "results.json"
    assert main(["evaluate", "--model", str(base_dir), "--tasks", f"{mine}", "--out", str(out)]) == 0
    assert _json.loads(out.read_text())["tasks"][str(mine)]["n"] == 2
    loaded = []
    monkeypatch.setattr(C, "_model_for_evaluation", lambda *a, **k: loaded.append(1))
    for bad, message in ((f"{mine},arc_eassy", "unknown task 'arc_eassy'"), (str(tmp_path / "none.jsonl"), "task file not found")):
        assert main(["evaluate", "--model", str(base_dir), "--tasks", bad]) == 1
        assert message in capsys.readouterr().err
    (tmp_path / "bad.jsonl").write_text('{"context": "x", "choices": [" a"], "gold": 0}\n')
    assert main(["evaluate", "--model", str(base_dir), "--tasks", str(tmp_path / "bad.jsonl")]) == 1
    assert "two or more texts" in capsys.readouterr().err
    assert loaded == []  # no model was loaded for any of them


def test_manifest_text_cannot_fake_lines_or_drive_the_terminal(base_dir, tmp_path, capsys):
    """Regression (#23): newlines and ANSI escapes in manifest names were printed raw."""
    from conftest import edit_manifest

    from offsite.emulator import compress_checkpoint
    from offsite.methods import make_config
    from offsite.options import terminal_safe

    assert terminal_safe("a\nb\x1b[31mc\td") == "a\\nb\\x1b[31mc\\td"
    emu = compress_checkpoint(base_dir, tmp_path / "emu", "layerdrop", make_config("layerdrop", num_kept=2))
    edit_manifest(emu, lambda m: m["base"].update(name="evil\nOK: verified\x1b[2J"))
    capsys.readouterr()
    code, out, err = run(capsys, "inspect", emu)
    assert code == 0 and "evil\\nOK: verified\\x1b[2J" in out and "\x1b" not in out


@pytest.mark.slow
def test_evaluate_runs_a_local_lm_eval_task_and_checks_it_first(base_dir, tmp_path, capsys, monkeypatch):
    """#20: an lm-eval 0.4 task YAML over local files runs through lm-eval itself, offline; a bad one is refused
    before the model loads."""
    import json as _json

    import offsite.cli as C

    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(_json.dumps(r) for r in [
        {"question": "The sky is", "choices": ["blue", "green"], "label": 0},
        {"question": "Fire is", "choices": ["cold", "hot"], "label": 1},
        {"question": "Water is", "choices": ["wet", "dry"], "label": 0},
    ]) + "\n")
    task = tmp_path / "mine.yaml"
    task.write_text(f"""task: offsite_local_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
""")
    out = tmp_path / "results.json"
    assert main(["evaluate", "--model", str(base_dir), "--tasks", str(task), "--out", str(out)]) == 0
    result = _json.loads(out.read_text())["tasks"][str(task)]
    assert result["lm_eval_task"] == "offsite_local_mc" and 0.0 <= result["acc,none"] <= 1.0 and result["sample_len"] == 3
    loaded = []
    monkeypatch.setattr(C, "_model_for_evaluation", lambda *a, **k: loaded.append(1))
    (tmp_path / "notask.yaml").write_text("dataset_path: json\n")
    for bad, message in ((str(tmp_path / "notask.yaml"), "names no task"), (str(tmp_path / "none.yaml"), "task file not found")):
        assert main(["evaluate", "--model", str(base_dir), "--tasks", f"arc_easy,{bad}"]) == 1
        assert message in capsys.readouterr().err
    assert loaded == []


def test_help_and_version_import_no_torch():
    """#21: `offsite --help`, `--version` and every command's -h answer without importing torch."""
    import subprocess
    import sys

    code = """
import sys
from offsite.cli import main
from offsite.cli import build_parser
commands = sorted(build_parser()._subparsers._group_actions[0].choices)
assert len(commands) >= 19, commands
nested = [["federate", "server", "-h"], ["federate", "client", "-h"], ["remote", "list", "-h"]]
for argv in [["--help"], ["--version"]] + [[c, "-h"] for c in commands] + nested:
    try:
        main(argv)
    except SystemExit as e:
        assert e.code == 0, (argv, e.code)
heavy = [m for m in ("torch", "transformers", "peft", "accelerate", "flwr") if m in sys.modules]
print("HEAVY", heavy)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "HEAVY []" in out.stdout and "compress" in out.stdout and "pema-train" in out.stdout and "Exit codes" in out.stdout


def test_yaml_values_are_type_checked_with_one_line_errors(tmp_path, capsys):
    """#21: PyYAML reads `lr: 1e-4` as a string and a quoted "no" is truthy; both used to reach the optimiser or
    train LoRA silently. Values are now checked against the config's field types before anything runs."""
    from offsite.configs import FinetuneConfig
    from offsite.options import build_dataclass, load_yaml

    (tmp_path / "ok.yaml").write_text("lr: 1e-4\nmax_steps: 3\nlora: false\n")
    config = build_dataclass(FinetuneConfig, load_yaml(str(tmp_path / "ok.yaml")))
    assert config.lr == 1e-4 and isinstance(config.lr, float) and config.max_steps == 3 and config.lora is False
    for text, message in (('lora: "no"\n', "lora must be true or false, got 'no'"),
                          ("max_steps: two\n", "max_steps must be a whole number, got 'two'"),
                          ("lr: fast\n", "lr must be a number, got 'fast'"),
                          ("max_steps: 2.5\n", "max_steps must be a whole number")):
        (tmp_path / "bad.yaml").write_text(text)
        assert main(["finetune", "--config", str(tmp_path / "bad.yaml"), "--bundle", "x", "--data", "y", "--out", str(tmp_path / "o")]) == 1
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    (tmp_path / "method.yaml").write_text("num_kept: '3'\n")
    assert main(["compress", "--config", str(tmp_path / "method.yaml"), "--model", "x", "--out", str(tmp_path / "e")]) == 1
    assert "num_kept must be a whole number" in capsys.readouterr().err


def test_print_config_shows_the_effective_options_and_reads_back(tmp_path, capsys):
    """#21: --print-config prints defaults < --config < flags as YAML; fed back as --config it gives the same."""
    import yaml

    (tmp_path / "c.yaml").write_text("lr: 1e-4\nmax_steps: 3\n")
    argv = ["finetune", "--config", str(tmp_path / "c.yaml"), "--lora", "--bundle", "emu", "--data", "d.jsonl", "--out", "run"]
    assert main(argv + ["--print-config"]) == 0
    printed = capsys.readouterr().out
    values = yaml.safe_load(printed)
    assert values["lr"] == 1e-4 and values["lora"] is True and values["max_steps"] == 3 and values["batch_size"] == 8
    assert values["bundle"] == "emu" and values["out"] == "run"
    (tmp_path / "back.yaml").write_text(printed)
    assert main(["finetune", "--config", str(tmp_path / "back.yaml"), "--print-config"]) == 0
    assert capsys.readouterr().out == printed
    assert main(["compress", "--method", "gradot", "--target-fraction", "0.5", "--model", "m", "--out", "o", "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["target_fraction"] == 0.5


def test_help_is_the_fields_comment_with_real_defaults_choices_and_groups(capsys):
    """#21: a flag's help is its config field's comment (so --lr says what its default means), enumerated
    fields list their choices, required ones say so, and compress -h groups the flags by method."""
    from offsite.cli import main

    def help_of(*argv):
        with pytest.raises(SystemExit):
            main([*argv, "-h"])
        return " ".join(capsys.readouterr().out.split())

    finetune = help_of("finetune")
    assert "--lr LR default: 5e-5 for full blocks, 3e-4 for LoRA" in finetune and "(default: None)" not in finetune.split("--lr LR")[1][:60]
    assert "--schedule {linear,cosine,constant_with_warmup}" in finetune and "--report-to {none,tensorboard}" in finetune
    compress = help_of("compress")
    for method in ("layerdrop", "gradot", "crash", "scaleot"):
        assert f"--method {method}:" in compress
    gradot = compress.split("--method gradot:")[1].split("--method crash:")[0]
    assert "--target-fraction" in gradot and "Also takes --num-kept" in gradot and "--score {gradient,magnitude}" in gradot
    assert "--emulator EMULATOR the emulator bundle issued" in help_of("federate", "server") and "(required)" in help_of("federate", "server")


def test_a_mistyped_flag_gets_the_nearest_one(capsys):
    from offsite.cli import main

    with pytest.raises(SystemExit) as e:
        main(["finetune", "--bundle", "b", "--lrr", "3"])
    assert e.value.code == 2
    assert "unrecognized arguments: --lrr 3 (did you mean --lr?)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["federate", "client", "--bundel", "b"])
    assert "(did you mean --bundle?)" in capsys.readouterr().err


def test_a_manifest_is_a_config_the_run_can_be_repeated_from(tmp_path, capsys):
    """#21: an adapter manifest's training section and an emulator's method parameters feed back as --config."""
    import json

    from offsite.cli import main
    from offsite.configs import FinetuneConfig
    from offsite.options import build_dataclass, load_yaml

    training = {**dataclasses.asdict(FinetuneConfig(lora=True, lr=2e-4, max_steps=7)), "learning_rate": 2e-4, "precision": "no",
                "federated": {"round": 1}}
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"format": "offsite-bundle", "kind": "adapter", "training": training}))
    assert build_dataclass(FinetuneConfig, load_yaml(str(manifest))) == FinetuneConfig(lora=True, lr=2e-4, max_steps=7)
    assert main(["finetune", "--config", str(manifest), "--seed", "3", "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert "lora: true" in printed and "max_steps: 7" in printed and "seed: 3" in printed
    emulator = tmp_path / "emulator.json"
    emulator.write_text(json.dumps({"format": "offsite-bundle", "kind": "emulator",
                                    "method": {"name": "gradot", "params": {"num_bottom": 2, "num_top": 2, "target_fraction": 0.5,
                                                                            "result": {"middle_fraction": 0.5}}}}))
    assert load_yaml(str(emulator)) == {"method": "gradot", "num_bottom": 2, "num_top": 2, "target_fraction": 0.5}


def test_environment_values_and_nested_overrides(tmp_path, capsys, monkeypatch):
    """#21: OFFSITE_<COMMAND>_<OPTION> sets an option (checked like YAML; a flag still wins), and --set
    overrides a nested key of a report's YAML config."""
    from offsite.errors import ConfigError
    from offsite.report import ReportConfig

    monkeypatch.setenv("OFFSITE_FINETUNE_LR", "1e-4")
    monkeypatch.setenv("OFFSITE_FINETUNE_LORA", "true")
    monkeypatch.setenv("OFFSITE_FINETUNE_SEED", "4")
    assert main(["finetune", "--seed", "5", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["lr"] == 1e-4 and printed["lora"] is True and printed["seed"] == 5
    monkeypatch.setenv("OFFSITE_FINETUNE_MAX_STEPS", "two")
    assert main(["finetune", "--print-config"]) == 1
    assert "max_steps must be a whole number" in capsys.readouterr().err
    monkeypatch.setenv("OFFSITE_FEDERATE_SERVER_ROUNDS", "2.5")
    assert main(["federate", "server", "--emulator", "e", "--out", str(tmp_path / "f"), "--insecure"]) == 1
    assert "rounds must be a whole number" in capsys.readouterr().err

    config = tmp_path / "report.yaml"
    config.write_text(yaml.safe_dump({"model": "m", "tasks": "arc_easy", "finetune": {"lr": 2e-4, "epochs": 2}}))
    from offsite.options import load_yaml, set_nested

    data = load_yaml(str(config))
    set_nested(data, ["finetune.lr=1e-4", "method_params.num_kept=20", "tasks=[piqa, sciq]"])
    built = ReportConfig.from_dict(data)
    assert built.finetune.lr == 1e-4 and built.finetune.epochs == 2 and built.method_params == {"num_kept": 20}
    assert built.tasks == ["piqa", "sciq"]
    with pytest.raises(ConfigError, match="lr must be a number"):
        ReportConfig.from_dict({"model": "m", "finetune": {"lr": "fast"}})
