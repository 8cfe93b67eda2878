"""The public strategies draw what they promise, and sparsec's passes hold on them."""

import torch
from hypothesis import given

from sparsec import block_sparse_attention, parse_pass_arg, trace
from sparsec.testing import check_pass
from sparsec.testing import strategies as sst
from sparsec.testing.models import LayerSpec, ModelSpec, build_model, inputs_for
from sparsec.testing.pytest_plugin import examples


@given(sst.models(lengths=(16, 40)))
def test_attention_pass_preserves_random_models_with_keep_all_layout(model):
    check_pass(parse_pass_arg("block-sparse-attention:layout=dense,block=16"), model,
               inputs_for(model))


def test_look_alikes_are_not_rewritten():
    for form in ("softmax_over_queries", "sigmoid_scores"):
        model = build_model(ModelSpec(dim=16, length=32, layers=(
            LayerSpec("attention", (("form", form), ("heads", 2))),)))
        result = check_pass(parse_pass_arg("block-sparse-attention:layout=dense,block=16"),
                            model, inputs_for(model))
        assert result.stats["sites_rewritten"] == 0, form


def test_embeddings_and_conv1x1_trace():
    model = build_model(ModelSpec(dim=8, length=5, vocab=50, layers=(
        LayerSpec("conv1x1", (("bias", True),)), LayerSpec("norm", (("type", "rms"),)))))
    program = trace(model, inputs_for(model))
    targets = {n.target for n in program.call_nodes()}
    assert torch.ops.aten.embedding.default in targets
    assert torch.ops.aten.conv1d.default in targets or \
        torch.ops.aten.convolution.default in targets


@examples(20)
@given(layout=sst.layouts(), data=sst.st.data())
def test_drawn_layouts_are_valid_and_the_op_follows_them(layout, data):
    layout.validate()
    heads = layout.kv_num_blocks.shape[1]
    g = torch.Generator().manual_seed(data.draw(sst.st.integers(0, 99)))
    q = torch.randn(1, max(heads, 2), layout.q_len, 16, generator=g, dtype=torch.float64)
    k = torch.randn(1, max(heads, 2), layout.kv_len, 16, generator=g, dtype=torch.float64)
    v = torch.randn_like(k)
    got = block_sparse_attention(q, k, v, layout)
    mask = layout.to_element_mask()  # independent of the op: dense SDPA under the mask
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    seen = mask.expand(1, q.shape[1], layout.q_len, layout.kv_len).any(-1)
    assert torch.allclose(got[seen], want[seen], atol=1e-10)
    assert (got[~seen] == 0).all()
