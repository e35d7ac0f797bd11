"""KNNMemoryAttention: segment-by-segment processing against full causal attention (the acceptance),
position policies, gate mode, training over segments with per-row resets, and bad input."""
import pytest
import torch
import torch.nn.functional as F

from memlayers.layers.knn_attention import KNNMemoryAttention
from memlayers.layers.rotary import apply_rotary, rotary_tables
from memlayers.ops.utils.testing import rel_err

DIM, HEAD_DIM = 32, 8


def make_layer(heads=4, kv_heads=2, **kw):
    kw = {"top_k": 64, "capacity": 64, "backend": "torch", **kw}
    return KNNMemoryAttention(DIM, heads, kv_heads, HEAD_DIM, **kw)


def projections(layer, x):
    q = layer._heads(layer.q_proj, x, layer.heads)
    k = layer._heads(layer.k_proj, x, layer.kv_heads)
    v = layer._heads(layer.v_proj, x, layer.kv_heads)
    if layer.q_norm is not None:
        q, k = layer.q_norm(q), layer.k_norm(k)
    return q, k, v


def full_attention(layer, x):
    """Causal attention over the whole sequence with the layer's weights (rotary at 0..N-1)."""
    B, N, _ = x.shape
    q, k, v = projections(layer, x)
    if layer.rotary:
        cos, sin = rotary_tables(N, HEAD_DIM)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    rep = layer.heads // layer.kv_heads
    o = F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), is_causal=True)
    return layer.o_proj(o.transpose(1, 2).reshape(B, N, -1))


def segmented(layer, x, seg):
    return torch.cat([layer(s) for s in x.split(seg, dim=1)], dim=1)


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2)])
@pytest.mark.parametrize("xl_memory", [False, True])
def test_segments_equal_full_causal_attention(heads, kv_heads, xl_memory):
    layer = make_layer(heads, kv_heads, xl_memory=xl_memory, qk_norm=xl_memory)
    x = torch.randn(2, 60, DIM)
    with torch.no_grad():
        err = rel_err(segmented(layer, x, 13), full_attention(layer, x))  # 13: the last segment is short
    assert err < 1e-5, err


def test_segments_equal_full_attention_triton_kernel(device):
    """The same acceptance with the fused kernel (interpreter on CPU) doing the memory attention."""
    layer = make_layer(4, 2, backend="triton").to(device)
    x = torch.randn(1, 30, DIM, device=device)
    with torch.no_grad():
        err = rel_err(segmented(layer, x, 10), full_attention(layer, x))
    assert err < 1e-5, err


def test_token_by_token_inference_equals_full_attention():
    layer = make_layer(4, 2)
    x = torch.randn(2, 16, DIM)
    with torch.no_grad():
        assert rel_err(segmented(layer, x, 1), full_attention(layer, x)) < 1e-5


def test_error_falls_as_k_grows():
    """Without positions the retrieval ranks by the attention score itself: more memories, less error."""
    torch.manual_seed(1)
    x = torch.randn(2, 64, DIM)
    errs = []
    for k in (1, 4, 16, 64):
        layer = make_layer(4, 2, rotary=False, top_k=k)
        torch.manual_seed(2)
        for p in layer.parameters():
            torch.nn.init.normal_(p, std=0.3)
        with torch.no_grad():
            errs.append(rel_err(segmented(layer, x, 16), full_attention(layer, x)))
    assert errs[0] > errs[1] > errs[2] > errs[3], errs
    assert errs[0] > 1e-2 and errs[3] < 1e-5, errs


def joint_reference(layer, x1, x2, mem_score):
    """Second segment's output: one softmax over its causal keys and every key of the first segment,
    the latter scored by ``mem_score(q_pre, q_rot, k_pre, query_positions)``."""
    B, T, _ = x2.shape
    P = x1.shape[1]
    q1, k1, v1 = projections(layer, x1)
    q, k, v = projections(layer, x2)
    cos, sin = rotary_tables(P + T, HEAD_DIM)
    pos = torch.arange(P, P + T)
    q_rot, k_rot = apply_rotary(q, cos[pos], sin[pos]), apply_rotary(k, cos[pos], sin[pos])
    rep = layer.heads // layer.kv_heads
    k_rot, v, k1, v1 = (t.repeat_interleave(rep, 1) for t in (k_rot, v, k1, v1))
    local = q_rot @ k_rot.transpose(-1, -2) * layer.scale
    local = local.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    mem = mem_score(q, q_rot, k1, pos, cos, sin) * layer.scale
    p = torch.cat([local, mem], -1).softmax(-1)
    o = p @ torch.cat([v, v1], 2)
    return layer.o_proj(o.transpose(1, 2).reshape(B, T, -1))


def test_position_policy_none():
    layer = make_layer(4, 2, position="none")
    x1, x2 = torch.randn(1, 12, DIM), torch.randn(1, 9, DIM)
    with torch.no_grad():
        layer(x1)
        ref = joint_reference(layer, x1, x2, lambda q, q_rot, k1, pos, cos, sin: q @ k1.transpose(-1, -2))
        assert rel_err(layer(x2), ref) < 1e-5


def test_position_policy_fixed_distance():
    d = 5
    layer = make_layer(4, 2, position="fixed", fixed_distance=d)
    x1, x2 = torch.randn(1, 12, DIM), torch.randn(1, 9, DIM)

    def score(q, q_rot, k1, pos, cos, sin):
        # Each memory key sits d positions before its query: rotate it at (query position - d).
        kr = apply_rotary(k1[:, :, None], cos[pos - d][:, None], sin[pos - d][:, None])  # [B, H, T, P, D]
        return torch.einsum("bhtd,bhtpd->bhtp", q_rot, kr)

    with torch.no_grad():
        layer(x1)
        assert rel_err(layer(x2), joint_reference(layer, x1, x2, score)) < 1e-5


def test_gate_mode_mixes_two_softmaxes():
    layer = make_layer(4, 2, combine="gate")
    local_only = make_layer(4, 2, combine="gate")
    local_only.load_state_dict(layer.state_dict())
    x = torch.randn(2, 24, DIM)
    with torch.no_grad():
        local_only.gate.fill_(-100.0)  # sigmoid -> 0: each segment sees only itself
        blocks = torch.cat([full_attention(local_only, s) for s in x.split(8, dim=1)], dim=1)
        assert rel_err(segmented(local_only, x, 8), blocks) < 1e-5
    y = segmented(layer, x, 8)
    assert rel_err(y.detach(), blocks) > 1e-2  # the memory contributes at sigmoid(0) = 1/2
    y.square().sum().backward()
    assert layer.gate.grad is not None and bool((layer.gate.grad != 0).all())


def test_training_over_segments_with_row_reset():
    layer = make_layer(4, 2, xl_memory=True)
    opt = torch.optim.SGD(layer.parameters(), lr=1e-2)
    x = torch.randn(2, 40, DIM)
    for seg in x.split(10, dim=1):  # one backward per segment: the memory holds no graph
        opt.zero_grad()
        layer(seg).square().mean().backward()
        assert layer.q_proj.weight.grad.abs().sum() > 0
        opt.step()
    assert not layer.memory.keys.requires_grad and int(layer.memory.count[0]) == 40

    # Same weights from here on: the memory written during training came from older weights.
    weights = {k: v for k, v in layer.state_dict().items() if not k.startswith(("memory.", "xl_"))}
    fresh = make_layer(4, 2, xl_memory=True)
    fresh.load_state_dict(weights)
    cont = make_layer(4, 2, xl_memory=True)
    cont.load_state_dict(weights)
    layer.setup_memory(2)
    with torch.no_grad():
        segmented(layer, x, 10)
        segmented(cont, x, 10)
        nxt = torch.randn(2, 10, DIM)
        layer.reset_memory(rows=[0])  # row 0 starts a new document
        assert int(layer.memory.count[0]) == 0 and int(layer.memory.count[1]) == 40
        y = layer(nxt)
        assert rel_err(y[0], fresh(nxt)[0]) < 1e-6  # as if row 0 had just begun
        assert rel_err(y[1], cont(nxt)[1]) < 1e-6  # row 1 carries on


def test_xl_grad_reaches_previous_segment():
    for xl_grad in (False, True):
        layer = make_layer(4, 2, xl_memory=True, xl_grad=xl_grad)
        x1 = torch.randn(1, 8, DIM, requires_grad=True)
        layer(x1)
        g, = torch.autograd.grad(layer(torch.randn(1, 8, DIM)).sum(), x1, allow_unused=True)
        assert (g is not None and g.abs().sum() > 0) == xl_grad


def test_update_memory_false_reads_only():
    layer = make_layer()
    x = torch.randn(2, 10, DIM)
    with torch.no_grad():
        layer(x)
        keys, count = layer.memory.keys.clone(), layer.memory.count.clone()
        y1 = layer(x, update_memory=False)
        assert torch.equal(layer.memory.keys, keys) and torch.equal(layer.memory.count, count)
        assert torch.equal(y1, layer(x))


@pytest.mark.parametrize("bad,exc,words", [
    (lambda: torch.randn(2, 5), ValueError, "x must have 3 dimensions"),
    (lambda: torch.randn(2, 5, DIM + 1), ValueError, "x must have shape"),
    (lambda: torch.randn(2, 5, DIM).double(), TypeError, "x must have dtype"),
    (lambda: torch.randn(2, 5, DIM).half(), TypeError, "x must have the layer's dtype"),
    (lambda: torch.full((2, 5, DIM), float("nan")), ValueError, "x contains non-finite"),
    (lambda: torch.randn(3, 5, DIM), ValueError, "batch size 3"),
    (lambda: [1.0], TypeError, "x must be a torch.Tensor"),
])
def test_bad_input_leaves_memory_unchanged(bad, exc, words):
    layer = make_layer(xl_memory=True)
    with torch.no_grad():
        layer(torch.randn(2, 7, DIM))
    state = [t.clone() for t in layer.memory.buffers()] + [layer._next_pos.clone(), layer.xl_keys.clone()]
    with pytest.raises(exc, match=words):
        layer(bad())
    after = [t for t in layer.memory.buffers()] + [layer._next_pos, layer.xl_keys]
    assert all(torch.equal(a, b) for a, b in zip(state, after))


@pytest.mark.parametrize("kw,exc,words", [
    (dict(heads=4, kv_heads=3), ValueError, "multiple of kv_heads"),
    (dict(combine="sum"), ValueError, "combine must be one of"),
    (dict(position="rotate", rotary=False), ValueError, "needs rotary=True"),
    (dict(top_k=0), ValueError, "top_k must be >= 1"),
    (dict(capacity=1.5), TypeError, "capacity must be an int"),
    (dict(backend="cuda"), ValueError, "backend must be one of"),
])
def test_bad_constructor_arguments(kw, exc, words):
    args = {"dim": DIM, "heads": 4, **kw}
    with pytest.raises(exc, match=words):
        KNNMemoryAttention(**args)


def test_reset_memory_bad_rows_changes_nothing():
    layer = make_layer()
    with torch.no_grad():
        layer(torch.randn(2, 5, DIM))
    with pytest.raises(ValueError, match="rows"):
        layer.reset_memory(rows=[5])
    assert int(layer.memory.count.min()) == 5 and int(layer._next_pos.min()) == 5


def test_triton_training_with_a_nonempty_memory_matches_torch(device):
    """Issue 13: backward through the fused kernel once the memory holds tokens (the write after the
    read must not change what backward reads); gradients equal the torch backend's, step after step."""
    layers = {b: make_layer(4, 2, backend=b, capacity=16).to(device) for b in ("torch", "triton")}
    layers["triton"].load_state_dict(layers["torch"].state_dict())
    opts = {b: torch.optim.SGD(layer.parameters(), lr=1e-2) for b, layer in layers.items()}
    x = torch.randn(2, 30, DIM, device=device)
    for seg in x.split(6, dim=1):  # 5 steps; capacity 16 wraps the ring, overwriting read slots
        grads = {}
        for b, layer in layers.items():
            opts[b].zero_grad()
            layer(seg).square().mean().backward()
            grads[b] = [p.grad.clone() for p in layer.parameters()]
            opts[b].step()
        assert all(rel_err(t, r) < 1e-4 for t, r in zip(grads["triton"], grads["torch"]))
    assert int(layers["triton"].memory.count.min()) == 16


def test_memory_is_module_state():
    """The memory and XL segment are buffers: in state_dict (loadable at another batch size into a
    layer that never ran) and moved by .to()."""
    layer = make_layer(4, 2, xl_memory=True)
    with torch.no_grad():
        layer(torch.randn(3, 9, DIM))
    state = {k: v.clone() for k, v in layer.state_dict().items()}  # state_dict() shares the live buffers
    assert {"memory.keys", "memory.count", "xl_keys", "xl_valid"} <= set(state)
    other = make_layer(4, 2, xl_memory=True)
    with torch.no_grad():
        other(torch.randn(1, 4, DIM))  # a memory of another batch size
    nxt = torch.randn(3, 5, DIM)
    with torch.no_grad():
        expected = layer(nxt)
    for target in (make_layer(4, 2, xl_memory=True), other):
        target.load_state_dict(state)  # the weights differ: both layers now carry layer's weights and memory
        assert target.memory_batch_size == 3
        with torch.no_grad():
            assert torch.equal(target(nxt), expected)
    moved = layer.to(torch.float64)
    assert moved.memory.keys.dtype == torch.float64 and moved.xl_keys.dtype == torch.float64


def test_old_store_names_warn_and_still_work():
    with pytest.warns(DeprecationWarning, match="memory_backend"):
        old = KNNMemoryAttention(DIM, 4, memory_backend="exact", backend="torch", capacity=8)
    with pytest.warns(DeprecationWarning, match="search_backend"):
        KNNMemoryAttention(DIM, 4, search_backend="torch", capacity=8)
    with torch.no_grad():
        old(torch.randn(1, 3, DIM))
    assert old.memory.index == "exact" and old.memory.backend == "torch"
