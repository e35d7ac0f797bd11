"""torch.compile of an attached model runs and equals the eager model (the dispatch is per instance:
no global registry, no flags that change while the model runs).

Dynamo traces the model and AOTAutograd the graphs (backend "aot_eager"); inductor's code generation
adds minutes on a 2-core CPU and tests nothing of memlayers (the default backend also passes: 6m43s
measured on the 2-core VM).
"""
import torch

import memlayers.hf as mm
from memlayers.ops.utils.testing import rel_err

from hf_tiny import VOCAB, logits, tiny_model


def test_compiled_attached_model_equals_eager():
    torch._dynamo.reset()
    model = tiny_model("llama")
    ids = torch.randint(1, VOCAB, (2, 40))
    mm.attach(model, [mm.KNNMemoryConfig(layers=[-1], top_k=8, backend="torch"),
                      mm.TitansMemoryConfig(layers=[0], chunk_size=8, backend="torch")])
    mm.memorize(model, ids[:, :24], chunk_size=8)
    eager = logits(model, ids[:, 24:])
    compiled = torch.compile(model, backend="aot_eager")
    with torch.no_grad():
        out = compiled(ids[:, 24:]).logits
    assert rel_err(out, eager) < 1e-5
    # The memory is read: without it the same compiled model computes something else.
    mm.reset_memory(model)
    with torch.no_grad():
        assert rel_err(compiled(ids[:, 24:]).logits, eager) > 1e-3
