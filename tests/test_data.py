"""The one tokenisation of (context, continuation) that training and evaluation share."""

import pytest

from offsite.data import IGNORE_INDEX, Example, encode_pair, pad_batch, tokenize_example
from offsite.errors import ConfigError


@pytest.mark.parametrize(
    "context, continuation",
    [("Question: 2+2? Answer:", " 4"), ("Question: 2+2? Answer: ", "4"), ("The fox", " jumps over"), ("", "Paris")],
)
def test_pair_tokenises_like_the_joined_text(tokenizer, context, continuation):
    ctx, cont = encode_pair(tokenizer, context, continuation)
    assert ctx + cont == tokenizer(context + continuation)["input_ids"]
    assert cont, "the continuation must be scored"


def test_trailing_space_moves_to_the_answer(tokenizer):
    # "Answer: " + "4" and "Answer:" + " 4" are the same example, so training and scoring agree.
    assert encode_pair(tokenizer, "Answer: ", "4") == encode_pair(tokenizer, "Answer:", " 4")


def test_labels_mask_the_context(tokenizer):
    features = tokenize_example(tokenizer, Example("Question: what? Answer:", " Paris"), max_length=64)
    ctx, cont = encode_pair(tokenizer, "Question: what? Answer:", " Paris")
    assert features["labels"] == [IGNORE_INDEX] * len(ctx) + cont
    short = tokenize_example(tokenizer, Example("Question: what? Answer:", " Paris"), max_length=len(cont) + 1)
    assert short["labels"][-len(cont):] == cont and len(short["input_ids"]) == len(cont) + 1


def test_empty_continuation_is_an_error(tokenizer):
    with pytest.raises(ConfigError, match="no tokens"):
        encode_pair(tokenizer, "context", "")


def test_padding(tokenizer):
    batch = pad_batch([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [5], "labels": [5]}], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [5, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [5, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
