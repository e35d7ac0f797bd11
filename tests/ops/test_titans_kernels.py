"""Triton Titans kernels vs the naive chunked form: output, final states and every gradient."""
import pytest
import torch

from memlayers.ops.titans import titans_chunked_naive, titans_memory
from memlayers.ops.utils.testing import assert_rel_close, poison_, rel_err

from test_titans_naive import GATE_ENDS, leaves, loss_of, make_inputs, with_gate_ends


def to(inp, device):
    out = {}
    for n, t in inp.items():
        if isinstance(t, tuple):
            out[n] = tuple(x.detach().to(device).requires_grad_(True) for x in t)
        elif t is None:
            out[n] = None
        else:
            out[n] = t.detach().to(device).requires_grad_(True)
    return out


def call(inp, backend, **kw):
    return titans_memory(
        inp["q"], inp["k"], inp["v"], inp["theta"], inp["weights"], alpha=inp["alpha"], eta=inp["eta"],
        momentum=inp["momentum"], backend=backend, **kw,
    )


def compare(inp, device, tol, grad_tol=None, **kw):
    ref_in, ker_in = to(inp, "cpu"), to(inp, device)
    ref = call(ref_in, "torch", **kw)
    out = call(ker_in, "triton", **kw)
    assert out[0].dtype == inp["q"].dtype
    assert_rel_close(out[0].float().cpu(), ref[0].float(), tol, "y")
    for i, (a, b) in enumerate(zip(out[1] + (out[2] or ()), ref[1] + (ref[2] or ()))):
        assert_rel_close(a.cpu(), b, tol, f"final state {i}")
    g_ref = torch.autograd.grad(loss_of((ref[0].float(),) + ref[1:]), [t for _, t in leaves(ref_in)])
    g_out = torch.autograd.grad(loss_of((out[0].float().cpu(),) + tuple(
        tuple(x.cpu() for x in s) if s is not None else None for s in out[1:])), [t for _, t in leaves(ker_in)])
    for (n, _), a, b in zip(leaves(inp), g_out, g_ref):
        assert_rel_close(a.float().cpu(), b.float(), grad_tol or tol, f"grad {n}")


CASES = [
    # (T, chunk, momentum, forget, bias)
    (50, 16, True, True, "l2"),      # odd length: 3 full chunks and a partial one; 4 chunks -> R=2 segments
    (16, 16, False, True, "huber"),
    (21, 16, True, False, "lp"),
    (1, 16, True, True, "l2"),
]


@pytest.mark.parametrize("T,chunk,momentum,forget,bias", CASES)
def test_linear_kernel_matches_naive(device, T, chunk, momentum, forget, bias):
    inp = make_inputs(1, 2, T, 16, 20, 1, momentum=momentum, forget=forget)
    compare(inp, device, 1e-5, chunk_size=chunk, bias=bias, delta=0.3, p=2.5)


@pytest.mark.parametrize("T,chunk,DK,DV", [(70, 16, 16, 16), (33, 32, 80, 48), (19, 16, 24, 150)])
def test_linear_kernel_segments_and_head_dims(device, T, chunk, DK, DV):
    # 70 tokens / 16 = 5 chunks -> checkpoints every 3: segments of 3 and 2 chunks in the backward.
    # Head dims that are not powers of two exercise the padded (masked) tiles; Dv = 48 with Dk = 80
    # and Dv = 150 split the memory over 2 and 3 value-column programs (the last one partial).
    inp = make_inputs(1, 1, T, DK, DV, 1)
    compare(inp, device, 1e-5, chunk_size=chunk)


@pytest.mark.parametrize("T,chunk,momentum,forget,bias", CASES[:3])
def test_mlp_kernel_matches_naive(device, T, chunk, momentum, forget, bias):
    inp = make_inputs(1, 2, T, 16, 16, 2, hidden=24, momentum=momentum, forget=forget)
    compare(inp, device, 1e-5, chunk_size=chunk, bias=bias, delta=0.3, p=2.5)


@pytest.mark.parametrize("momentum", [True, False])
def test_mlp_kernel_streams_hidden_blocks(device, momentum):
    # Hidden size 4.5x the head dim, not a power of two: the state and the per-chunk scratch stream
    # through five hidden blocks of 16 units (the last partial), across 3 chunks in 2 checkpoint segments.
    inp = make_inputs(1, 1, 37, 16, 16, 2, hidden=72, momentum=momentum)
    compare(inp, device, 1e-5, chunk_size=16)


@pytest.mark.parametrize("T,chunk,D,hidden,bias", [(70, 32, 20, 40, "lp"), (45, 64, 16, 16, "huber"),
                                                    (37, 16, 40, 48, "lp")])
def test_mlp_kernel_padded_tiles_and_chunks(device, T, chunk, D, hidden, bias):
    # Head dim 20 in 32-wide tiles, hidden 40 in blocks of 16 (the last partial), 32-token chunks with a
    # partial last one, 3 chunks in segments of 2 and 1; a 64-token chunk shorter than its tile; and
    # 16-token chunks at head dim 40, whose head-dim blocks are 16 wide: four per 64-wide tile, the third
    # partial, the fourth all padding.
    inp = make_inputs(1, 1, T, D, D, 2, hidden=hidden)
    compare(inp, device, 1e-5, chunk_size=chunk, bias=bias, delta=0.3, p=2.5)


@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize("gate_end", GATE_ENDS)
def test_gate_gradients_at_range_ends(device, depth, gate_end):
    # alpha = 1 (full forgetting) and eta = 0 (no momentum carried) and values next to them: the
    # kernels' gate gradients must match autograd of the naive path there too.
    inp = with_gate_ends(make_inputs(1, 1, 21, 16, 16, depth, hidden=16), gate_end, gate_end)
    compare(inp, device, 1e-5, chunk_size=16)


@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernel_half_inputs(device, depth, dtype):
    # fp16 dots run in fp16 even on the interpreter; bf16 ones in fp32 there (see triton._matmul_dtype).
    inp = make_inputs(1, 1, 40, 16, 16, depth, hidden=16, dtype=dtype)
    compare(inp, device, 1e-2, chunk_size=16)


@pytest.mark.parametrize("depth", [1, 2])
def test_kernel_writes_every_output_element(device, monkeypatch, depth):
    # Every buffer the host allocates starts as NaN: outputs and gradients must all be overwritten.
    import memlayers.ops.titans.triton as host

    real_empty = torch.empty

    def poisoned_empty(*a, **kw):
        return poison_(real_empty(*a, **kw))

    monkeypatch.setattr(host.torch, "empty", poisoned_empty)
    inp = to(make_inputs(1, 2, 37, 16, 16, depth, hidden=16), device)
    y, w, s = call(inp, "triton", chunk_size=16)
    grads = torch.autograd.grad(loss_of((y, w, s)), [t for _, t in leaves(inp)])
    for t in (y, *w, *s, *grads):
        assert torch.isfinite(t).all()


@pytest.mark.gpu
@pytest.mark.parametrize("depth", [1, 2])
def test_kernel_16k_tokens_matches_naive_and_stays_finite(depth):
    B, H, T, D = 1, 4, 16384, 64
    inp = make_inputs(B, H, T, D, D, depth, hidden=2 * D)
    inp["theta"] = torch.full((B, H, T), 0.005)
    inp["alpha"] = torch.full((B, H, T), 0.002)
    inp["eta"] = torch.full((B, H, T), 0.9)
    ref = call(to(inp, "cpu"), "torch", chunk_size=64)
    out = call(to(inp, "cuda"), "triton", chunk_size=64)
    assert torch.isfinite(out[0]).all()
    assert rel_err(out[0].cpu(), ref[0]) < 1e-4
