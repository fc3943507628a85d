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


def test_prompt_completion_and_chat_records(tmp_path, tokenizer):
    import json as _json

    from offsite.data import chat_examples, load_examples
    from offsite.errors import ConfigError

    path = tmp_path / "mixed.jsonl"
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"},
            {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And Italy?"},
            {"role": "assistant", "content": "Rome."}]
    path.write_text("\n".join(_json.dumps(r) for r in [{"prompt": "Q: 2+2?\nA:", "completion": " 4"}, {"messages": chat}]) + "\n")
    with pytest.raises(ConfigError, match="chat template"):
        load_examples(path, tokenizer=tokenizer)  # the tiny tokenizer has none
    tokenizer.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>\n{% endfor %}"
                               "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    try:
        called = []
        examples = load_examples(path, tokenizer=lambda: called.append(1) or tokenizer)
        assert called == [1]
        assert examples[0].context == "Q: 2+2?\nA:" and examples[0].continuation == " 4"
        # one example per assistant turn; the loss falls on the turn and its end marker only
        assert examples[1].context.endswith("<|user|>Capital of France?<|end|>\n<|assistant|>")
        assert examples[1].continuation == "Paris.<|end|>\n"
        assert examples[2].context.endswith("<|user|>And Italy?<|end|>\n<|assistant|>") and examples[2].continuation == "Rome.<|end|>\n"
        with pytest.raises(ConfigError, match="no assistant turn"):
            chat_examples([{"role": "user", "content": "hi"}], tokenizer)
        with pytest.raises(ConfigError, match="role"):
            chat_examples([{"role": "robot", "content": "hi"}], tokenizer)
    finally:
        tokenizer.chat_template = None
