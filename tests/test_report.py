"""The five-number report on a tiny model and real (offline) task data: every number, resumable."""


import json

import pytest

from offsite.errors import ConfigError
from offsite.report import ReportConfig, markdown_table, run_report
from offsite.training import FinetuneConfig



@pytest.mark.slow
def test_report_runs_every_setting_and_resumes(base_dir, tmp_path):
    config = ReportConfig(
        model=str(base_dir),
        tasks=["sciq", "arc_easy"],
        method_params={"num_kept": 2},
        finetune=FinetuneConfig(lora=True, max_steps=2, batch_size=4, max_length=64),
        train_limit=8,
        eval_limit=6,
        eval_batch_size=8,
        full_finetune=True,
        perplexity_chars=400,
        healing_steps=2,
        out=str(tmp_path / "report"),
    )
    lines = []
    data = run_report(config, progress=False, log=lines.append)
    for task in ("sciq", "arc_easy"):
        assert set(data["tasks"][task]) == {"full_zs", "emulator_zs", "emulator_ft", "plugin", "full_ft"}
        assert all(r["n"] == 6 and 0 <= r["acc"] <= 1 for r in data["tasks"][task].values())
    out = tmp_path / "report"
    table = (out / "report.md").read_text()
    assert "| mean |" in table and "plug-in − emulator FT" in table and "Perplexity" in table
    assert set(data["tasks"]["_perplexity"]) == {"full", "emulator"}
    assert "Healing check: 2 steps" in table and "ships" in table
    verbatim = data["tasks"]["_privacy"]["verbatim"]
    assert 0.5 < verbatim["fraction"] < 1.0  # 6 of 8 blocks + embeddings are shipped as they are
    assert (out / "report.png").stat().st_size > 1000
    assert (out / "sciq" / "offsite" / "adapter" / "manifest.json").is_file()

    # A second run computes nothing again.
    lines.clear()
    again = run_report(config, progress=False, log=lines.append)
    assert not any(line.endswith("...") for line in lines)
    assert again["tasks"]["sciq"] == data["tasks"]["sciq"]
    assert markdown_table(again) == markdown_table(data)

    changed = ReportConfig(**{**config.__dict__, "eval_limit": 7})
    with pytest.raises(ConfigError, match="different configuration"):
        run_report(changed, progress=False, log=lines.append)


def test_result_store_keeps_results_across_neutral_and_later_added_finetune_fields(tmp_path):
    """A results file written before a training field existed still serves a run whose field reproduces the old
    behaviour; logging options never matter; anything that changes the numbers is refused."""
    import dataclasses

    from offsite.report import ResultStore

    def config(**finetune):
        return json.loads(json.dumps(dataclasses.asdict(ReportConfig(model="m", finetune=FinetuneConfig(**finetune)))))

    old = config(group_by_length=False)
    for field in ("group_by_length", "report_to", "gradient_checkpointing"):
        del old["finetune"][field]  # as a results file from before those fields were written
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"config": old, "tasks": {"sciq": {"plugin": {"acc": 0.5}}}}))

    store = ResultStore(path, config(group_by_length=False, log_every=1, report_to="tensorboard", gradient_checkpointing=True))
    assert store.get("sciq", "plugin") == {"acc": 0.5}
    for changed in (config(), config(group_by_length=False, lr=3e-4)):  # grouped batches (the new default); another lr
        with pytest.raises(ConfigError, match="different configuration"):
            ResultStore(path, changed)


def test_report_config_from_yaml_mapping():
    config = ReportConfig.from_dict({"distill": {"tokens": 1000}, "tasks": "piqa,sciq", "finetune": {"lora": True, "lr": 1e-4}, "method_params": {"num_kept": 4}})
    assert config.tasks == ["piqa", "sciq"] and config.finetune.lora and config.finetune.lr == 1e-4
    with pytest.raises(ConfigError, match="no option"):
        ReportConfig.from_dict({"finetune": {"learning_rat": 1}})
    with pytest.raises(ConfigError, match="no option"):
        ReportConfig.from_dict({"taks": "piqa"})


@pytest.mark.slow
def test_report_with_a_distilled_emulator(base_dir, tmp_path):
    config = ReportConfig(
        model=str(base_dir), tasks=["sciq"], method_params={"num_kept": 2},
        distill={"block_size": 16, "batch_size": 2, "tokens": 16 * 2 * 3, "eval_every": 3, "eval_chars": 300},
        finetune=FinetuneConfig(max_steps=1, batch_size=4, max_length=64), train_limit=4, eval_limit=3,
        perplexity_chars=0, out=str(tmp_path / "r"),
    )
    data = run_report(config, progress=False, log=lambda *_: None)
    assert (tmp_path / "r" / "emulator-distilled" / "manifest.json").is_file()
    manifest = json.loads((tmp_path / "r" / "sciq" / "offsite" / "adapter" / "manifest.json").read_text())
    assert manifest["emulator"]["method"]["params"]["distillation"]["steps"] == 3
    assert set(data["tasks"]["sciq"]) == {"full_zs", "emulator_zs", "emulator_ft", "plugin"}
