"""Decoding with memory attached reads no tensor data on the host beyond what generate itself reads
(issue 13): every read waits for the device on a GPU, per step and layer."""
import pytest
import torch

import memlayers.hf as mm

from hf_tiny import VOCAB, tiny_model


def _reads_per_step(model, prompt, host_reads):
    counts = []
    for n in (3, 7):
        host_reads.clear()
        model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None,
                       pad_token_id=0)
        counts.append(len(host_reads))
    return (counts[1] - counts[0]) / 4


CONFIGS = {
    "llama-titans-dkvb": ("llama", [mm.TitansMemoryConfig(layers=[0], chunk_size=16, backend="torch"),
                                    mm.DKVBConfig(layers=[1], num_codebooks=4, num_keys=16, key_dim=8,
                                                  backend="torch")]),
    "llama-knn": ("llama", [mm.KNNMemoryConfig(layers=[1], top_k=8, backend="torch")]),
    "gpt2-knn": ("gpt2", [mm.KNNMemoryConfig(layers=[0, 1], top_k=8, backend="torch")]),
}


@pytest.mark.parametrize("case", sorted(CONFIGS))
def test_decode_steps_read_nothing_more_than_without_memory(case, host_reads):
    family, configs = CONFIGS[case]
    model = tiny_model(family)
    ids = torch.randint(1, VOCAB, (2, 40))
    plain = _reads_per_step(model, ids[:, 30:], host_reads)
    mm.attach(model, configs)
    assert not any(m.training for m in model.modules())  # attached to an eval model: eval branches
    mm.memorize(model, ids[:, :30], chunk_size=16)
    attached = _reads_per_step(model, ids[:, 30:], host_reads)
    assert attached == plain, (attached, plain)
