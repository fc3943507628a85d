"""PEMA, plug-in external memory adaptation (Kim, Kim, Bak, NAACL 2024): the second offsite contract.

The model owner shares no transformer block, only its final norm and LM head (the head bundle)
and answers representation queries; the data owner builds an external memory of (context
representation, gold next token) pairs from those answers, trains a small adapter on it, and
generates by interpolating the adapter's distribution with the model's.

    owner.py     RepresentationServer: f(c) and next-token log-probs for prompts (+ extensions)
    head.py      head bundle: export (owner), load as a `Head` module (data owner)
    memory.py    external memory: memory-mapped keys/values, resumable build
    train.py     the adapter (A, B_rct, B_pd), its two training phases, its bundle
    generate.py  interpolated greedy generation with Gradual Unrolling
    task.py      SciQ answer generation offline; sacreBLEU and exact match
"""

# public name -> the module that defines it; loaded on first use, so importing the package (as the
# CLI does to register the pema-* commands) imports no torch.
_EXPORTS = {
    **dict.fromkeys(["GenerateConfig", "MemoryConfig", "PemaConfig"], "configs"),
    **dict.fromkeys(["generate_ids", "generate_texts", "unrolling_schedule"], "generate"),
    **dict.fromkeys(["Head", "LoadedHead", "export_head", "export_head_checkpoint", "load_head"], "head"),
    **dict.fromkeys(["ExternalMemory", "build_memory"], "memory"),
    **dict.fromkeys(["DecodingSession", "RepresentationRequest", "RepresentationResponse", "RepresentationServer"], "owner"),
    **dict.fromkeys(["exact_match", "load_generation_examples", "normalize_answer", "score_generations"], "task"),
    **dict.fromkeys(["LoadedPemaAdapter", "PemaAdapter", "load_pema_adapter", "save_pema_adapter", "train_pema",
                     "train_pema_bundle"], "train"),
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
