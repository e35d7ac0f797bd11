"""Builders for the probe tests: a tokenizer trained here on the probe texts, and a tiny random Llama
saved with it to a folder that ``--model PATH`` loads (no hub, no network)."""
from memlayers.probes import formats


def _corpus():
    words = formats._ADJECTIVES + formats._NOUNS
    texts = [formats.NOISE, formats.NEEDLE, formats.NIAH_INTRO, formats.NIAH_QUESTION, formats.NIAH_ANSWER_PREFIX,
             formats.PASSKEY_INTRO, formats.PASSKEY_LINE, formats.PASSKEY_QUESTION, " ".join(words),
             " ".join(f"{a}-{b}" for a, b in zip(words, reversed(words))), "0123456789 " * 4]
    return [t.replace("{type_v}", "numbers") for t in texts] * 20


def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_corpus(), trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def make_model_dir(tokenizer, path):
    """Save a 2-layer, 64-wide random Llama and ``tokenizer`` to ``path``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         bos_token_id=0, eos_token_id=1, pad_token_id=2)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def oracle(sample):
    """A responder that reads the answer out of the prompt text (never ``sample.expected``): it shows
    that a model which does retrieve scores 1.0 through the whole pipeline."""
    import re

    m = re.search(r"The pass key is (\d+)\.", sample.context)
    if m:
        return f" {m.group(1)}."
    keys = re.search(r"special magic numbers for (.+) mentioned in the provided text\?", sample.query).group(1)
    keys = [k.strip() for k in re.split(r",? and |, ", keys) if k.strip()]
    values = [v for k in keys for v in re.findall(rf"numbers for {re.escape(k)} is: (\d+)\.", sample.context)]
    return " " + ", ".join(values) + "."


def make_induction_head(dim):
    """A hand-wired associative-recall mixer on embeddings: position t attends (sharply, causally)
    to earlier positions s whose token matches x_t and returns the embedding at s + 1."""
    import torch
    from torch import nn

    class _Induction(nn.Module):
        def forward(self, x):
            T = x.shape[1]
            scores = 30.0 * x @ x.transpose(1, 2)                      # [B, T, T]
            s = torch.arange(T)
            allowed = s[None, :] + 1 < s[:, None]                       # s + 1 < t: the value is in the past
            scores = scores.masked_fill(~allowed, float("-inf"))
            w = torch.nan_to_num(scores.softmax(-1))                    # rows with nothing allowed -> 0
            shifted = torch.cat([x[:, 1:], torch.zeros_like(x[:, :1])], dim=1)  # value of s is x_{s+1}
            return w @ shifted

    return _Induction()


def make_causal_attention(dim):
    """One head of causal softmax attention with learned projections."""
    import torch
    from torch import nn

    class _Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(dim, 3 * dim)
            self.out = nn.Linear(dim, dim)

        def forward(self, x):
            q, k, v = self.qkv(x).chunk(3, dim=-1)
            return self.out(nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True))

    return _Attention()
