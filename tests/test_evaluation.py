"""The evaluator against a naive one-sequence-at-a-time computation, on tiny random models."""

from __future__ import annotations

import math
import sys

import pytest
import torch
import transformers as T
from torch import nn

from tiny import VOCAB_SIZE, make_tokenizer
from offsite.data import encode_pair
from offsite.errors import AssetError, ConfigError
from offsite.evaluation import lm_eval_model, loglikelihoods, perplexity, score_multiple_choice
from offsite.tasks import MCDoc

_IDS = dict(vocab_size=VOCAB_SIZE, bos_token_id=1, eos_token_id=2, pad_token_id=0)
# One family per way of handling positions: RoPE, RoPE + sliding window (cache trimming),
# learned absolute positions (two ways of deriving them), ALiBi.
FAMILIES = {
    "llama": lambda **kw: T.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, **_IDS, **kw),
    "mistral": lambda **kw: T.MistralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                            num_key_value_heads=2, sliding_window=4, **_IDS, **kw),
    "gemma3": lambda **kw: T.Gemma3TextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                              num_key_value_heads=2, head_dim=8, sliding_window=4, **_IDS, **kw),
    "gpt2": lambda **kw: T.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=kw.pop("max_position_embeddings", 128),
                                      **_IDS, **kw),
    "opt": lambda **kw: T.OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                                    word_embed_proj_dim=32, **{"max_position_embeddings": 128, **kw}, **_IDS),
    "bloom": lambda **kw: T.BloomConfig(hidden_size=32, n_layer=2, n_head=4, **_IDS, **kw),
}

PAIRS = [
    ("Question: What is the capital of France?\nAnswer:", " Paris"),
    ("Question: What is the capital of France?\nAnswer:", " the lazy dog jumps over a brown fox"),
    ("Question: What is the capital of France?\nAnswer:", " a"),
    ("Goal: How do I boil water?\nAnswer: ", "Put a pot on the stove."),
    ("Goal: How do I boil water?\nAnswer: ", "Science."),
    ("A man is sitting on a roof. He", " asks questions"),
    ("", "The quick brown fox"),
]


def tiny_model(family: str = "llama", seed: int = 0, **config):
    torch.manual_seed(seed)
    return T.AutoModelForCausalLM.from_config(FAMILIES[family](**config)).eval()


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def naive_loglikelihood(model, tok, context: str, continuation: str, max_length: int | None = None) -> float:
    """One unpadded sequence, full log-softmax: the definition the batched scorer must match."""
    ctx, cont = encode_pair(tok, context, continuation)
    ids = (ctx or [tok.eos_token_id]) + cont
    if max_length:
        ids = ids[-(max_length + 1):]
    with torch.no_grad():
        logprobs = model(torch.tensor([ids[:-1]])).logits.log_softmax(-1)[0]
    n = min(len(cont), len(ids) - 1)
    return sum(logprobs[len(ids) - 1 - n + j, t].item() for j, t in enumerate(ids[-n:]))


def naive_nll(model, ids: list[int]) -> float:
    with torch.no_grad():
        logprobs = model(torch.tensor([ids[:-1]])).logits.log_softmax(-1)[0]
    return -sum(logprobs[j, t].item() for j, t in enumerate(ids[1:]))


@pytest.mark.parametrize("family", FAMILIES)
def test_loglikelihoods_match_naive_computation(family, tok):
    model = tiny_model(family)
    got = loglikelihoods(model, tok, PAIRS, batch_size=3, progress=False)
    want = [naive_loglikelihood(model, tok, c, x) for c, x in PAIRS]
    assert got == pytest.approx(want, abs=1e-4)


@pytest.mark.parametrize("batch_size", [1, 2, 64])
def test_loglikelihoods_do_not_depend_on_batching(batch_size, tok):
    model = tiny_model()
    reference = loglikelihoods(model, tok, PAIRS, batch_size=5, progress=False)
    assert loglikelihoods(model, tok, PAIRS, batch_size=batch_size, progress=False) == pytest.approx(reference, abs=1e-4)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_long_inputs_lose_the_left_of_the_context(family, tok):
    model = tiny_model(family, max_position_embeddings=12)
    pairs = [(PAIRS[0][0] * 3, PAIRS[0][1]), (PAIRS[3][0], "Put a pot on the stove and turn on the heat, then wait.")]
    assert len(encode_pair(tok, *pairs[1])[1]) > 12  # the continuation alone overflows: scored from its tail
    got = loglikelihoods(model, tok, pairs, batch_size=2, progress=False)
    assert got == pytest.approx([naive_loglikelihood(model, tok, c, x, max_length=12) for c, x in pairs], abs=1e-4)


def test_empty_context_is_scored_after_eos():
    """A tokenizer without BOS encodes "" to nothing; EOS stands in so the first token still counts."""
    tok = make_tokenizer(add_bos=False)
    model = tiny_model()
    assert encode_pair(tok, "", "The quick brown fox")[0] == []
    got = loglikelihoods(model, tok, [("", "The quick brown fox"), PAIRS[0]], progress=False)
    assert got == pytest.approx([naive_loglikelihood(model, tok, "", "The quick brown fox"),
                                 naive_loglikelihood(model, tok, *PAIRS[0])], abs=1e-4)


def test_model_without_position_ids_or_logits_to_keep(tok):
    """A wrapper that forwards only the basics (as some adapters do) is scored the same way."""

    class Wrapper(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask=None, past_key_values=None, use_cache=False):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask, past_key_values=past_key_values,
                              use_cache=use_cache)

    model = tiny_model()
    got = loglikelihoods(Wrapper(model), tok, PAIRS, batch_size=4, progress=False)
    assert got == pytest.approx(loglikelihoods(model, tok, PAIRS, batch_size=4, progress=False), abs=1e-4)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_peft_wrapped_model_matches_naive_computation(family, tok):
    """An unmerged LoRA model (PeftModel) still gets explicit positions through its **kwargs."""
    peft = pytest.importorskip("peft")
    model = tiny_model(family)
    targets = {"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"]}[family]
    config = peft.LoraConfig(r=2, target_modules=targets, fan_in_fan_out=family == "gpt2", init_lora_weights=False)
    wrapped = peft.get_peft_model(model, config).eval()
    got = loglikelihoods(wrapped, tok, PAIRS, batch_size=3, progress=False)
    assert got == pytest.approx([naive_loglikelihood(wrapped, tok, c, x) for c, x in PAIRS], abs=1e-4)


def _docs() -> list[MCDoc]:
    return [
        MCDoc(0, "Question: What is the capital of France?\nAnswer:", [" Paris", " the lazy dog", " a", " Science asks"], 0),
        MCDoc(1, "Goal: How do I boil water?\nAnswer:", [" Put a pot on the stove.", " Jump."], 1),
        MCDoc(2, "A man is sitting on a roof. He", [" asks questions", " jumps over the lazy dog", " tests"], 2),
        MCDoc(3, "The quick brown fox", [" jumps", " is sitting on a roof and asks questions"], 0),
        MCDoc(4, "Science asks questions and", [" tests the answers", " a", " the capital", " boil", " Paris"], 4),
    ]


def test_score_multiple_choice_metrics(tok):
    model = tiny_model()
    docs = _docs()
    result = score_multiple_choice(model, tok, docs, batch_size=3, progress=False)
    hits, hits_norm = [], []
    for doc in docs:
        lls = [naive_loglikelihood(model, tok, doc.context, c) for c in doc.choices]
        norm = [ll / len(c) for ll, c in zip(lls, doc.choices)]
        hits.append(max(range(len(lls)), key=lls.__getitem__) == doc.gold)
        hits_norm.append(max(range(len(norm)), key=norm.__getitem__) == doc.gold)
    # per-doc outcomes, in doc order, for paired comparisons
    assert result.pop("correct") == "".join("1" if h else "0" for h in hits)
    assert result.pop("correct_norm") == "".join("1" if h else "0" for h in hits_norm)
    acc, acc_norm, n = sum(hits) / len(docs), sum(hits_norm) / len(docs), len(docs)
    assert result == pytest.approx({"acc": acc, "acc_norm": acc_norm, "n": n,
                                    "acc_stderr": math.sqrt(acc * (1 - acc) / (n - 1)),
                                    "acc_norm_stderr": math.sqrt(acc_norm * (1 - acc_norm) / (n - 1))})


def test_scoring_restores_training_mode(tok):
    model = tiny_model()
    model.train()
    score_multiple_choice(model, tok, _docs()[:2], progress=False)
    assert model.training


def test_score_multiple_choice_rejects_bad_input(tok):
    model = tiny_model()
    with pytest.raises(ConfigError, match="no documents"):
        score_multiple_choice(model, tok, [], progress=False)
    with pytest.raises(ConfigError, match="batch_size"):
        score_multiple_choice(model, tok, _docs(), batch_size=0, progress=False)


def test_perplexity_of_one_window_is_the_plain_nll(tok):
    model = tiny_model()
    text = " ".join(c + x for c, x in PAIRS[:4])
    ids = tok(text)["input_ids"]
    result = perplexity(model, tok, text, block_size=len(ids), progress=False)
    nll = naive_nll(model, ids) / (len(ids) - 1)
    assert result["tokens"] == len(ids) - 1
    assert result["nll"] == pytest.approx(nll, abs=1e-5)
    assert result["ppl"] == pytest.approx(math.exp(nll), rel=1e-5)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("block_size,stride", [(8, None), (8, 3), (5, 5)])
def test_perplexity_windows_score_every_token_once(family, block_size, stride, tok):
    model = tiny_model(family)
    text = " ".join(c + x for c, x in PAIRS)
    ids = tok(text)["input_ids"]
    stride = stride or block_size
    total, scored = 0.0, 1
    while scored < len(ids):  # the sliding-window definition, one window at a time
        end = min(scored + stride, len(ids))
        window = ids[max(0, end - block_size - 1):end]
        with torch.no_grad():
            logprobs = model(torch.tensor([window[:-1]])).logits.log_softmax(-1)[0]
        n = end - scored
        total -= sum(logprobs[len(window) - 1 - n + j, t].item() for j, t in enumerate(window[-n:]))
        scored = end
    result = perplexity(model, tok, text, block_size=block_size, stride=stride, batch_size=3, progress=False)
    assert result["tokens"] == len(ids) - 1
    assert result["nll"] == pytest.approx(total / (len(ids) - 1), abs=1e-5)


def test_perplexity_block_is_capped_by_the_model_length(tok):
    model = tiny_model(max_position_embeddings=6)
    text = " ".join(c + x for c, x in PAIRS[:3])
    capped = perplexity(model, tok, text, block_size=512, progress=False)
    assert capped == pytest.approx(perplexity(model, tok, text, block_size=6, progress=False))


def test_perplexity_rejects_bad_settings(tok):
    model = tiny_model()
    with pytest.raises(ConfigError, match="stride"):
        perplexity(model, tok, "The quick brown fox", block_size=4, stride=5, progress=False)
    with pytest.raises(ConfigError, match="two tokens"):
        perplexity(model, tok, "", progress=False)


def test_lm_eval_adapter_names_the_install_command_when_missing(monkeypatch, tok):
    monkeypatch.setitem(sys.modules, "lm_eval.models.huggingface", None)  # makes the import fail
    with pytest.raises(AssetError, match=r"pip install lm-eval==0\.4\.13"):
        lm_eval_model(tiny_model(), tok)


def test_lm_eval_adapter_wraps_a_loaded_model(tok):
    pytest.importorskip("lm_eval")
    from lm_eval.models.huggingface import HFLM

    model = tiny_model()
    lm = lm_eval_model(model, tok, batch_size=4)
    assert isinstance(lm, HFLM)
    assert lm.model is model
    assert lm.batch_size == 4
