"""layers.py: the shared blocks against their transformers counterparts and their own equations."""
import pytest
import torch
import transformers
from transformers.models.bert.modeling_bert import BertLayer

from checkpoints import bert_layer_rules, state_to_ours
from layers import Attention, PostNormBlock, additive_mask, apply_rotary, rotary_cos_sin


def test_post_norm_block_matches_bert_layer_with_cross_attention():
    """The BERT block the Q-Former is made of: self-attention, cross-attention to the image,
    feed-forward, each followed by add & LayerNorm; loaded through the BERT layout rules."""
    torch.manual_seed(0)
    # is_decoder only unlocks the cross-attention; a lone BertLayer stays bidirectional.
    config = transformers.BertConfig(hidden_size=32, num_attention_heads=4, intermediate_size=48, is_decoder=True,
                                     add_cross_attention=True,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    reference = BertLayer(config).eval()
    ours = PostNormBlock(32, 4, 48, context_dim=32).eval()
    ours.load_state_dict(state_to_ours(reference.state_dict(), bert_layer_rules("", "")))
    x, image = torch.randn(2, 5, 32), torch.randn(2, 7, 32)
    with torch.no_grad():
        expected = reference(x, encoder_hidden_states=image)
        expected = expected[0] if isinstance(expected, tuple) else expected
        torch.testing.assert_close(ours(x, context=image), expected, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="needs `context`"):
        ours(x)


def test_attention_scale_and_position_bias():
    """scale=1 and an additive bias (T5's attention) equal softmax(q k^T + bias) v by hand,
    and a boolean mask combines with the bias."""
    torch.manual_seed(0)
    attention = Attention(16, 2, bias=False, scale=1.0)
    x = torch.randn(1, 4, 16)
    bias = torch.randn(1, 2, 4, 4)
    mask = torch.ones(4, 4, dtype=torch.bool).tril()
    q = attention.q_proj(x).view(1, 4, 2, 8).transpose(1, 2)
    k = attention.k_proj(x).view(1, 4, 2, 8).transpose(1, 2)
    v = attention.v_proj(x).view(1, 4, 2, 8).transpose(1, 2)
    scores = q @ k.transpose(-1, -2) + bias + additive_mask(mask, torch.float32)
    expected = attention.o_proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(1, 4, 16))
    torch.testing.assert_close(attention(x, position_bias=bias, attn_mask=mask), expected, atol=1e-5, rtol=0)


def test_rotary_preserves_norms_and_rotates_relative_positions():
    """RoFormer eq. 34: a rotation per pair, so norms stay and q.k depends on the offset only."""
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)

    def at(x: torch.Tensor, position: int) -> torch.Tensor:
        return apply_rotary(x, *rotary_cos_sin(torch.tensor([[position]]), 8, 10000.0, torch.float32))

    torch.testing.assert_close(at(q, 5).norm(), q.norm())
    torch.testing.assert_close((at(q, 7) * at(k, 3)).sum(), (at(q, 14) * at(k, 10)).sum(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("adapter", [None, "output", "parallel"])
def test_a_decoder_layer_is_one_graph_for_torch_compile(adapter):
    """A LLaMA decoder layer, bare or with Lynx's output adapter or LION's router, traces into one
    graph with no break, so compiling layer by layer (short compile times) loses nothing."""
    import torch._dynamo

    from adapters import insert_output_adapters, insert_parallel_adapters
    from model import LanguageModel, TextConfig
    from layers import causal_attention_mask
    config = TextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=2)
    model = LanguageModel(config)
    if adapter == "output":
        insert_output_adapters(model, 1)
    elif adapter == "parallel":
        insert_parallel_adapters(model, [r"layers\.0$"], 8, 2)
    layer = model.model.layers[0]
    x = torch.randn(2, 5, 32)
    rotary = rotary_cos_sin(torch.arange(5).expand(2, -1), config.head_dim, config.rope_theta, x.dtype)
    mask, is_causal = causal_attention_mask(torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]]), 5, 0)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(layer)(x, mask, is_causal, rotary, None)
    assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), explanation.break_reasons
