"""A needle comes back through kNN memory on the real model, and is missed by the window alone."""
import random

import pytest
import torch

import memlayers as ml
from memlayers.probes.formats import NOISE, PASSKEY_INTRO, PASSKEY_LINE, PASSKEY_QUESTION

WINDOW = 128


def _passkey(tok, key: str, filler_tokens: int, seed: int):
    """(memorized ids, window + question ids): the pass key early in the document, outside the window."""
    rng = random.Random(seed)
    noise = tok.encode(" " + NOISE, add_special_tokens=False)
    fill = (noise * (filler_tokens // len(noise) + 1))[:filler_tokens]
    at = rng.randint(8, filler_tokens // 4)
    doc = ([tok.bos_token_id] + tok.encode(PASSKEY_INTRO, add_special_tokens=False) + fill[:at]
           + tok.encode(" " + PASSKEY_LINE.format(key=key), add_special_tokens=False) + fill[at:])
    question = tok.encode(PASSKEY_QUESTION, add_special_tokens=False)
    return torch.tensor([doc[:-WINDOW]]), torch.tensor([doc[-WINDOW:] + question])


@pytest.mark.slow
def test_needle_recalled_with_memory_and_missed_without(smollm2):
    model, tok = smollm2
    key = "73914"
    memorized, window = _passkey(tok, key, filler_tokens=384, seed=1)
    assert key not in tok.decode(window[0])

    def answer():
        out = model.generate(window, attention_mask=torch.ones_like(window), max_new_tokens=8, do_sample=False,
                             pad_token_id=tok.eos_token_id)
        return tok.decode(out[0, window.shape[1]:], skip_special_tokens=True)

    without = answer()
    ml.attach(model, ml.KNNMemoryConfig())
    ml.memorize(model, memorized, chunk_size=WINDOW, progress=False)
    with_memory = answer()
    assert key in with_memory, with_memory
    assert key not in without, without
