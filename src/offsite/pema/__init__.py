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

from .generate import GenerateConfig, generate_ids, generate_texts, unrolling_schedule
from .head import Head, LoadedHead, export_head, export_head_checkpoint, load_head
from .memory import ExternalMemory, MemoryConfig, build_memory
from .owner import DecodingSession, RepresentationRequest, RepresentationResponse, RepresentationServer
from .task import exact_match, load_generation_examples, normalize_answer, score_generations
from .train import LoadedPemaAdapter, PemaAdapter, PemaConfig, load_pema_adapter, save_pema_adapter, train_pema, train_pema_bundle

__all__ = [
    "DecodingSession", "ExternalMemory", "GenerateConfig", "Head", "LoadedHead", "LoadedPemaAdapter", "MemoryConfig",
    "PemaAdapter", "PemaConfig", "RepresentationRequest", "RepresentationResponse", "RepresentationServer",
    "build_memory", "exact_match", "export_head", "export_head_checkpoint", "generate_ids", "generate_texts",
    "load_generation_examples", "load_head", "load_pema_adapter", "normalize_answer", "save_pema_adapter",
    "score_generations", "train_pema", "train_pema_bundle", "unrolling_schedule",
]
