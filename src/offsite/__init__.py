"""offsite: offsite-tuning of Hugging Face causal LMs.

Data flows one way: base model -> emulator bundle (owner) -> adapter bundle (data owner)
-> plugged model (owner) -> report.

The main entry points are importable from here (`from offsite import compress_checkpoint,
finetune, plug_in`); they load on first use, so `import offsite` itself stays light (no torch).
Save/load pairs are symmetric: save_emulator/load_emulator, save_adapter/load_adapter,
save_checkpoint/restore_checkpoint (training), export_head_checkpoint/load_head (PEMA).
"""

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    # owner: emulators
    "make_config": "offsite.methods", "build_emulator": "offsite.methods", "EmulatorConfig": "offsite.methods",
    "compress_checkpoint": "offsite.emulator", "save_emulator": "offsite.emulator", "load_emulator": "offsite.emulator",
    "DistillConfig": "offsite.distill", "distill": "offsite.distill",
    # data owner: training
    "FinetuneConfig": "offsite.training", "finetune": "offsite.training", "load_examples": "offsite.data",
    "save_adapter": "offsite.adapter", "load_adapter": "offsite.adapter",
    # owner: plug-in and evaluation
    "plug_in": "offsite.plugin", "plug_into_emulator": "offsite.plugin", "plugin_checkpoint": "offsite.plugin",
    "score_multiple_choice": "offsite.evaluation", "perplexity": "offsite.evaluation",
    "ReportConfig": "offsite.report", "run_report": "offsite.report", "paired_bootstrap": "offsite.stats",
    # trust
    "generate_keypair": "offsite.signing", "read_manifest": "offsite.bundle",
    # models and errors
    "load_checkpoint": "offsite.models", "resolve_model": "offsite.models",
    "OffsiteError": "offsite.errors", "ConfigError": "offsite.errors", "BundleError": "offsite.errors",
    "PluginError": "offsite.errors", "UsageError": "offsite.errors",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'offsite' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
