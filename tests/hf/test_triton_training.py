"""Training on the Triton backend with non-empty memories (issue 13), every HF branch: the kNN
attention wrapper, the Titans branch, DKVB. Several SGD steps after memories were written, each step
after more memorizing: every gradient equals the torch backend's. Runs the kernels under
TRITON_INTERPRET=1 on CPU at tiny sizes."""
import os

import pytest
import torch

import memlayers.hf as mm
from memlayers.ops.utils.testing import rel_err

from hf_tiny import VOCAB, tiny_model

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"),
    reason="the Triton backend needs a GPU or TRITON_INTERPRET=1",
)


def _model(backend: str):
    torch.manual_seed(0)
    model = tiny_model("llama")
    mm.attach(model, [
        mm.KNNMemoryConfig(layers=[1], top_k=8, combine="gate", capacity=48, backend=backend),
        mm.TitansMemoryConfig(layers=[0], heads=2, chunk_size=16, backend=backend),
        mm.DKVBConfig(layers=[1], num_codebooks=4, num_keys=16, key_dim=8, top_k=2, backend=backend),
    ])
    with torch.no_grad():  # open the zero-initialized gates so every branch carries gradient
        model.model.layers[0].titans_gate.fill_(0.3)
        model.model.layers[1].dkvb_gate.fill_(0.3)
    return model


def test_training_steps_with_memories_equal_the_torch_backend():
    ref, tri = _model("torch"), _model("triton")
    assert all(torch.equal(a, b) for a, b in zip(ref.state_dict().values(), tri.state_dict().values()))
    trainable = [n for n, p in ref.named_parameters() if p.requires_grad]
    opts = [torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.05) for m in (ref, tri)]
    torch.manual_seed(1)
    text = torch.randint(1, VOCAB, (2, 120))
    for step in range(3):
        memorized, batch = text[:, step * 24:step * 24 + 20], text[:, step * 24 + 20:step * 24 + 40]
        grads = []
        for model, opt in zip((ref, tri), opts):
            mm.memorize(model, memorized, chunk_size=8)  # more memories each step (the ring wraps at 48)
            model.train()
            opt.zero_grad()
            model(batch, labels=batch).loss.backward()
            grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
            opt.step()
            model.eval()
        g_ref, g_tri = grads
        assert sorted(g_ref) == sorted(g_tri)
        for name in ("model.layers.1.base_layer.self_attn.gate", "model.layers.0.titans_gate",
                     "model.layers.0.titans_memory.neural_memory.to_qkv.weight", "model.layers.1.dkvb_gate",
                     "model.layers.1.dkvb.values"):
            assert name in g_ref and g_ref[name].abs().sum() > 0, name
        for name in trainable:
            if name in g_ref:
                assert rel_err(g_tri[name], g_ref[name]) < 1e-3, (step, name)
    assert ref.model.layers[1].base_layer.self_attn.memory.count.tolist() == [48, 48]
