"""Helpers for the real-model tests: chat prompts and greedy answers."""
import torch


def chat_ids(tokenizer, text: str) -> torch.Tensor:
    """``[1, T]`` ids of ``text`` as one user turn, ending with the assistant's prompt."""
    enc = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)
    return enc["input_ids"]


def answer(model, tokenizer, ids: torch.Tensor, max_new_tokens: int = 12) -> str:
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
