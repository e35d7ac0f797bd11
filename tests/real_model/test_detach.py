"""The real model with kNN memory attached: detach gives back the exact model."""
import torch

import memlayers as ml
from memlayers.probes.formats import NOISE


def test_detach_restores_bit_identical_logits(smollm2):
    model, tok = smollm2
    ids = tok(NOISE * 3, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        before = model(ids).logits
        ml.attach(model, ml.KNNMemoryConfig(top_k=8))
        ml.memorize(model, ids, chunk_size=16, progress=False)
        with_memory = model(ids).logits
        ml.detach(model)
        after = model(ids).logits
    assert not torch.equal(with_memory, before)  # the memory was really read
    assert torch.equal(after, before)
