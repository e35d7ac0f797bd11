import pytest
import torch

transformers = pytest.importorskip("transformers")

VOCAB = 96


@pytest.fixture(autouse=True)
def _one_thread():
    # Two cores shared with other test runs: one thread avoids oversubscription stalls.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_llama(layers: int = 3, hidden: int = 48):
    """A tiny random Llama (fp32, eval mode); initializer 0.2 gives peaked, distinct next-token logits."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      initializer_range=0.2, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=VOCAB, n_embd=48, n_layer=2, n_head=4, n_positions=128, initializer_range=0.2,
                     bos_token_id=0, eos_token_id=0)
    cfg._attn_implementation = "sdpa"
    return GPT2LMHeadModel(cfg).eval()


def batch(B: int = 5, L: int = 11, seed: int = 1):
    """Random ids and a right-padded attention mask with rows of different lengths."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (B, L), generator=g)
    lengths = torch.randint(L // 2, L + 1, (B,), generator=g)
    lengths[0] = L
    mask = (torch.arange(L)[None, :] < lengths[:, None]).long()
    return ids, mask
