import pytest
import torch
import transformers as T

from offsite.errors import UnsupportedModelError
from offsite.surgery import OVERRIDES, discover_layout, get_blocks, per_layer_config_keys, reduced_config
from tiny import FAMILIES, NUM_BLOCKS, tiny_model

EXPECTED = {
    "llama": ("model.layers", "model.norm"),
    "qwen2": ("model.layers", "model.norm"),
    "mistral": ("model.layers", "model.norm"),
    "gemma3": ("model.layers", "model.norm"),
    "gpt2": ("transformer.h", "transformer.ln_f"),
    "opt": ("model.decoder.layers", "model.decoder.final_layer_norm"),
    "gpt_neox": ("gpt_neox.layers", "gpt_neox.final_layer_norm"),
    "bloom": ("transformer.h", "transformer.ln_f"),
    "phi": ("model.layers", "model.final_layernorm"),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_discovers_every_family(family):
    model = tiny_model(family)
    layout = discover_layout(model)
    assert (layout.blocks, layout.norm) == EXPECTED[family]
    assert layout.num_blocks == NUM_BLOCKS == len(get_blocks(model, layout))
    assert model.get_submodule(layout.embedding) is model.get_input_embeddings()
    assert model.get_submodule(layout.head) is model.get_output_embeddings()
    assert layout.parse_block_key(layout.block_key(5, "mlp.weight")) == (5, "mlp.weight")
    assert layout.parse_block_key(layout.embedding + ".weight") is None


def test_encoder_decoder_is_unsupported():
    config = T.T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=2)
    with pytest.raises(UnsupportedModelError, match="encoder-decoder"):
        discover_layout(T.T5ForConditionalGeneration(config))


def test_plain_module_is_unsupported():
    with pytest.raises(UnsupportedModelError, match="not a Hugging Face PreTrainedModel"):
        discover_layout(torch.nn.Linear(2, 2))


def test_model_without_lm_head_is_unsupported():
    model = T.LlamaModel(FAMILIES["llama"]())
    with pytest.raises(UnsupportedModelError, match="no LM head"):
        discover_layout(model)


def test_no_block_list_points_to_override_table(monkeypatch):
    model = tiny_model("llama")
    model.config.num_hidden_layers = 5  # no ModuleList of that length exists
    with pytest.raises(UnsupportedModelError, match="OVERRIDES"):
        discover_layout(model)
    monkeypatch.setitem(OVERRIDES, "llama", {"blocks": "model.layers", "norm": None})
    model.config.num_hidden_layers = NUM_BLOCKS
    layout = discover_layout(model)
    assert layout.blocks == "model.layers" and layout.norm is None


def test_per_layer_config_follows_kept_blocks():
    config = FAMILIES["gemma3"]()
    assert per_layer_config_keys(config) == ["layer_types"]
    kept = [0, 1, 5, 7]
    small = reduced_config(config, kept)
    assert small.num_hidden_layers == 4
    assert small.layer_types == [config.layer_types[i] for i in kept]


def test_gpt2_attribute_map_is_respected():
    small = reduced_config(FAMILIES["gpt2"](), [0, 3, 7])
    assert small.n_layer == small.num_hidden_layers == 3


def test_index_dependent_blocks_are_refused():
    config = FAMILIES["gpt2"]()
    config.scale_attn_by_inverse_layer_idx = True
    with pytest.raises(UnsupportedModelError, match="scale_attn_by_inverse_layer_idx"):
        reduced_config(config, [0, 1])
