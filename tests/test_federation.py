"""#19 (core): one federated round on the owner's side, FedAvg of checked adapter bundles, resumable."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import rehash
from offsite.adapter import load_adapter
from offsite.data import Example
from offsite.emulator import compress_checkpoint, load_emulator
from offsite.federation.aggregate import FederationError, Update, aggregate_round, latest_round
from offsite.methods import make_config
from offsite.plugin import plugin_checkpoint
from offsite.training import FinetuneConfig, finetune


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    from tiny import save_tiny_checkpoint

    root = tmp_path_factory.mktemp("federation")
    save_tiny_checkpoint("llama", root / "base")
    emulator = compress_checkpoint(root / "base", root / "emu", "layerdrop", make_config("layerdrop", num_kept=2))
    clients = {}
    for lora in (False, True):
        for i in range(3):  # three data owners, each its own data
            data = [Example(f"Client {i} question {j}:", f" answer {i + j}") for j in range(4 + 2 * i)]
            run = finetune(emulator, data, root / f"run-{'lora' if lora else 'full'}-{i}",
                           FinetuneConfig(lora=lora, epochs=1, batch_size=2, lr=1e-2, max_length=24, seed=i), progress=False)
            clients[(lora, i)] = (run, len(data))
    return root, emulator, clients


def expected_mean(bundles_and_weights):
    total = sum(w for _, w in bundles_and_weights)
    keys = bundles_and_weights[0][0].tensors.keys()
    return {k: sum(b.tensors[k].double() * w for b, w in bundles_and_weights) / total for k in keys}


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_the_aggregate_is_the_example_weighted_mean(federation, lora, tmp_path):
    root, emulator, clients = federation
    updates = [Update(f"owner-{i}", clients[(lora, i)][0], clients[(lora, i)][1]) for i in range(3)]
    result = aggregate_round(emulator, updates, tmp_path / "rounds", 1)
    assert result.accepted == {f"owner-{i}": clients[(lora, i)][1] for i in range(3)} and result.dropped == {}
    mean = expected_mean([(load_adapter(clients[(lora, i)][0]), clients[(lora, i)][1]) for i in range(3)])
    got = load_adapter(result.adapter)
    assert set(got.tensors) == set(mean)
    for key, value in mean.items():
        torch.testing.assert_close(got.tensors[key].double(), value.to(got.tensors[key].dtype).double(), rtol=0, atol=0)
    assert got.manifest["training"]["federated"]["examples"] == sum(c[1] for k, c in clients.items() if k[0] == lora)
    # an ordinary adapter bundle: the owner plugs it in as any other
    plugin_checkpoint(root / "base", result.adapter, tmp_path / "plugged", emulator=emulator)


def poison(src, dst, change):
    import shutil

    shutil.copytree(src, dst)
    name = "adapter.safetensors" if (dst / "adapter.safetensors").exists() else "adapter_model.safetensors"
    tensors = load_file(dst / name)
    change(tensors)
    save_file(tensors, dst / name)
    rehash(dst)
    return dst


def test_poisoned_clients_are_dropped_with_their_reason_and_the_round_goes_on(federation, tmp_path):
    root, emulator, clients = federation
    good = clients[(False, 0)]
    first_key = lambda t: sorted(t)[0]  # noqa: E731

    def nan(t):
        t[first_key(t)][0] = float("nan")

    def blow_up(t):
        t[first_key(t)] *= 1e6

    def extra_key(t):
        t["lm_head.weight"] = torch.zeros(2, 2)

    updates = [Update("good", good[0], good[1]),
               Update("nan", poison(good[0], tmp_path / "nan", nan), 5),
               Update("huge", poison(good[0], tmp_path / "huge", blow_up), 5),
               Update("foreign-key", poison(good[0], tmp_path / "key", extra_key), 5),
               Update("no-examples", good[0], 0),
               Update("lora-among-full", clients[(True, 1)][0], 3)]
    result = aggregate_round(emulator, updates, tmp_path / "rounds", 1)
    assert result.accepted == {"good": good[1]}
    why = result.dropped
    assert "NaN" in why["nan"] and "over the bound" in why["huge"] and "outside the allowed" in why["foreign-key"]
    assert "positive count" in why["no-examples"] and "another kind" in why["lora-among-full"]
    assert json.loads((tmp_path / "rounds" / "round-0001" / "round.json").read_text())["dropped"] == why
    with pytest.raises(FederationError, match="no client update passed"):
        aggregate_round(emulator, updates[1:4], tmp_path / "rounds", 2)
    assert not (tmp_path / "rounds" / "round-0002").exists()


def test_a_restarted_owner_resumes_after_its_last_round(federation, tmp_path, monkeypatch):
    import offsite.federation.aggregate as A

    root, emulator, clients = federation
    updates = [Update(f"owner-{i}", clients[(False, i)][0], clients[(False, i)][1]) for i in range(2)]
    first = aggregate_round(emulator, updates, tmp_path / "rounds", 1)
    assert latest_round(tmp_path / "rounds").round == 1
    monkeypatch.setattr(A, "fedavg", lambda *a, **k: pytest.fail("a finished round is not recomputed"))
    again = aggregate_round(emulator, updates, tmp_path / "rounds", 1)
    assert again.accepted == first.accepted and again.adapter == first.adapter


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_two_rounds_the_second_starting_from_the_first_aggregate(federation, lora, tmp_path):
    from offsite.federation.aggregate import start_from

    root, emulator, clients = federation
    first = aggregate_round(emulator, [Update(f"owner-{i}", clients[(lora, i)][0], clients[(lora, i)][1]) for i in range(3)],
                            tmp_path / "rounds", 1)
    config = FinetuneConfig(lora=lora, epochs=1, batch_size=2, lr=1e-2, max_length=24, max_steps=1)
    data = [Example("Client 0 question 0:", " answer 0")] * 2
    # starting from the aggregate: before any step, the trainable tensors are the aggregate's
    zero_lr = FinetuneConfig(lora=lora, epochs=1, batch_size=2, lr=1e-12, max_length=24, max_steps=1, max_grad_norm=0.0)
    same = finetune(emulator, data, tmp_path / "same", zero_lr, start=start_from(first.adapter), progress=False)
    a, b = load_adapter(first.adapter).tensors, load_adapter(same).tensors
    assert a.keys() == b.keys() and all(torch.allclose(a[k].float(), b[k].float(), atol=1e-6) for k in a)
    second = [Update(f"owner-{i}", finetune(emulator, data, tmp_path / f"r2-{i}", config, start=start_from(first.adapter), progress=False), 2)
              for i in range(2)]
    result = aggregate_round(emulator, second, tmp_path / "rounds", 2)
    assert sorted(result.accepted) == ["owner-0", "owner-1"] and latest_round(tmp_path / "rounds").round == 2
    with pytest.raises(FederationError, match="this run trains"):
        finetune(emulator, data, tmp_path / "mismatch", FinetuneConfig(lora=not lora, max_steps=1, max_length=24),
                 start=start_from(first.adapter), progress=False)
