"""#18: sequential onloading, one block in memory at a time, equals the whole model's forward."""

import pytest
import torch

from offsite.onload import block_activations
from offsite.streaming import StoredCheckpoint
from offsite.surgery import discover_layout, get_blocks
from tiny import FAMILIES, save_tiny_checkpoint


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_block_by_block_activations_equal_the_models_own(family, tmp_path):
    model = save_tiny_checkpoint(family, tmp_path / "base")
    torch.manual_seed(0)
    ids = torch.randint(3, 300, (5, 12))
    last = 5
    captured = {}
    block = get_blocks(model, discover_layout(model))[last]

    def keep(module, args, out):
        captured["h"] = out[0] if isinstance(out, tuple) else out

    handle = block.register_forward_hook(keep)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    handle.remove()
    with StoredCheckpoint(tmp_path / "base", torch.float32) as stored:
        got = block_activations(stored, ids, last, tmp_path / "work", batch_size=2, progress=False)
    torch.testing.assert_close(torch.from_numpy(got[:]), captured["h"].float(), rtol=1e-5, atol=1e-5)
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == [f"activations-{last % 2}.npy"]
