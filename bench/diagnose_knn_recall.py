"""Why a kNN-memory recall misses: does the needle reach each layer's top-k, and what fills it instead;
for a needle inside the window, how much the memory's reads weigh and in which layers they decide.

One probe prompt (passkey or RULER needle) is memorized on the embedded SmolLM2 with the library's
defaults but for its last ``--window`` context tokens, as in condition (b) of the efficacy table;
then the window and the question are read in one forward pass, and for the question's last token
(whose prediction is the answer's first token) every kNN layer's search is scored against the
whole memory, per query head:

- ``needle_rank``: how many stored memories score above the needle's best token (0: the needle
  comes first; it is retrieved when the rank is below ``top_k``);
- ``topk_needle_tokens``: how many of the needle's tokens are among the ``top_k`` winners (its
  digits, not only its first words, must come back for the answer to be read out);
- ``topk_distinct_tokens`` / ``topk_most_copies``: among the ``top_k`` winners, how many distinct
  token ids, and how many copies of the most repeated one (near-duplicate filler keys crowding the
  top-k: a repeated haystack stores the same token in the same context many times over).

    python bench/diagnose_knn_recall.py --probe passkey --length 8k --depth 0.75 --seed 0 \\
        --out bench/results/knn-recall-diagnosis.json

A needle in the last ``--window`` tokens is read locally, so nothing in the memory can be missed;
a miss there is the memory's reads pulling the answer elsewhere. For such a prompt the report holds,
per kNN layer, the memory's share of the question's last query's attention (the joint softmax's
weight on the retrieved memories, mean and max over query heads), the greedy answer, and the answers
with the memory read switched off in each third of the layers (``no_memory_in``).

Results are added to ``--out`` (one entry per prompt), with the machine, load and seconds.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections import Counter
from pathlib import Path

import torch

import memlayers.hf as mh
import memlayers.hf.knn as knn_wrapper
from memlayers.hf.state import memory_wrappers
from memlayers.probes import needle_sample, passkey_sample, string_match_all
from memlayers.probes.haystack import parse_size


def _needle_token_positions(tok, context: str, needle: str) -> list:
    """Token indices (of ``tok.encode(context, add_special_tokens=True)``) that overlap ``needle``."""
    start = context.index(needle)
    end = start + len(needle)
    enc = tok(context, add_special_tokens=True, return_offsets_mapping=True)
    return [i for i, (a, b) in enumerate(enc["offset_mapping"]) if a < end and b > start and b > a]


def _record_searches(wrappers):
    """Replace each wrapper's memory search by one that keeps its last query batch (restorer returned)."""
    seen = {}
    originals = []
    for i, w in enumerate(wrappers):
        mem = w.memory
        original = mem.search

        def search(q, k, *args, _i=i, _orig=original, **kwargs):
            seen[_i] = q.detach().clone()
            return _orig(q, k, *args, **kwargs)

        mem.search = search
        originals.append((mem, original))

    def restore():
        for mem, original in originals:
            mem.search = original

    return seen, restore


def _layer_report(mem, q_last, needle_slots, slot_tokens, top_ks):
    """Per query head: the needle's rank in the exact search and what the top-k holds."""
    n = mem.filled
    keys = mem.keys[0, :, :n].float()  # [Hkv, n, D]
    group = q_last.shape[0] // keys.shape[0]
    needle_set = set(needle_slots.tolist())
    heads = []
    for h in range(q_last.shape[0]):
        scores = keys[h // group] @ q_last[h].float()  # [n]
        best_needle = scores[needle_slots].max()
        rank = int((scores > best_needle).sum())
        k = max(top_ks)
        winners = scores.topk(min(k, n)).indices.tolist()
        entry = {"needle_rank": rank}
        for top_k in top_ks:
            counts = Counter(slot_tokens[s] for s in winners[:top_k])
            entry[f"top{top_k}_needle_tokens"] = len(needle_set.intersection(winners[:top_k]))
            entry[f"top{top_k}_distinct_tokens"] = len(counts)
            entry[f"top{top_k}_most_copies"] = counts.most_common(1)[0][1]
        heads.append(entry)
    return heads


def _memory_shares(model, ids: torch.Tensor) -> list:
    """Per kNN layer (in order), the memories' share of the last query's joint attention, per query head."""
    shares = []
    combine = knn_wrapper.combine_memory

    def spy(out_l, lse_l, out_m, lse_m, *args, **kwargs):
        last_l, last_m = lse_l[0, :, -1], lse_m[0, :, -1]
        shares.append(torch.exp(last_m - torch.logaddexp(last_l, last_m)).tolist())
        return combine(out_l, lse_l, out_m, lse_m, *args, **kwargs)

    knn_wrapper.combine_memory = spy
    try:
        model(ids)
    finally:
        knn_wrapper.combine_memory = combine
    return shares


def _answer(model, tok, ids: torch.Tensor, expected, max_new_tokens: int) -> dict:
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, pad_token_id=tok.eos_token_id)
    response = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    return {"response": response, "score": string_match_all(response, expected)}


def _in_window(model, tok, wrappers, ids: torch.Tensor, expected, max_new_tokens: int) -> dict:
    """The memory's weight per layer and the answers with each third of the layers not reading it."""
    shares = _memory_shares(model, ids)
    layers = [{"layer": w.layer_index, "memory_share_mean": round(sum(s) / len(s), 3),
               "memory_share_max": round(max(s), 3)} for w, s in zip(wrappers, shares)]
    report = {"layers": layers, "answer": _answer(model, tok, ids, expected, max_new_tokens), "no_memory_in": {}}
    n = len(wrappers)
    for part in range(3):
        off = wrappers[part * n // 3:(part + 1) * n // 3]
        if not off:
            continue
        for w in off:  # an instance attribute over the method, deleted afterwards
            w.holds_memories = lambda: False
        try:
            answer = _answer(model, tok, ids, expected, max_new_tokens)
        finally:
            for w in off:
                del w.holds_memories
        report["no_memory_in"][f"{off[0].layer_index}-{off[-1].layer_index}"] = answer
    return report


@torch.no_grad()
def diagnose(model, tok, probe: str, length: int, depth: float, seed: int, window: int, top_ks,
             max_new_tokens: int = 16) -> dict:
    sample = (passkey_sample if probe == "passkey" else needle_sample)(tok, length, depth, seed=seed)
    context = tok.encode(sample.context, add_special_tokens=True)
    needle_pos = _needle_token_positions(tok, sample.context, sample.needles[0])
    earlier = context[:-window]
    needle_pos = [p for p in needle_pos if p < len(earlier)]  # those in the memory
    wrappers = memory_wrappers(model, ("knn",))
    t0 = time.perf_counter()
    mh.reset_memory(model)
    mh.memorize(model, torch.tensor([earlier]), progress=False)
    memorize_s = time.perf_counter() - t0
    ids = torch.tensor([context[-window:] + tok.encode(sample.query, add_special_tokens=False)])
    entry = {"probe": probe, "length": length, "depth": depth, "seed": seed, "window": window,
             "memorized_tokens": len(earlier), "memorize_s": round(memorize_s, 1)}
    if not needle_pos:
        entry["needle_in_window"] = True
        entry.update(_in_window(model, tok, wrappers, ids, sample.expected, max_new_tokens))
        return entry
    seen, restore = _record_searches(wrappers)
    try:
        model(ids)
    finally:
        restore()
    layers = []
    for i, w in enumerate(wrappers):
        mem = w.memory
        slot_pos = mem.positions[0, :mem.filled].tolist()
        slot_of = {p: s for s, p in enumerate(slot_pos)}
        needle_slots = torch.tensor([slot_of[p] for p in needle_pos])
        slot_tokens = [earlier[p] for p in slot_pos]
        heads = _layer_report(mem, seen[i][0, :, -1], needle_slots, slot_tokens, top_ks)
        ranks = [h["needle_rank"] for h in heads]
        summary = {"layer": w.layer_index, "needle_rank_min": min(ranks), "needle_rank_median": sorted(ranks)[len(ranks) // 2]}
        for k in top_ks:
            summary[f"heads_needle_in_top{k}"] = sum(r < k for r in ranks)
            summary[f"top{k}_needle_tokens_mean"] = round(sum(h[f"top{k}_needle_tokens"] for h in heads) / len(heads), 1)
            summary[f"top{k}_distinct_tokens_mean"] = round(sum(h[f"top{k}_distinct_tokens"] for h in heads) / len(heads), 1)
        summary["heads"] = heads
        layers.append(summary)
    entry.update({"needle_tokens": len(needle_pos), "layers": layers})
    return entry


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--probe", choices=("passkey", "needle"), default="passkey")
    ap.add_argument("--length", default="8k")
    ap.add_argument("--depth", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--top-k", default="32,64", help="comma-separated top-k sizes to report")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("bench/results/knn-recall-diagnosis.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    top_ks = [int(k) for k in args.top_k.split(",")]
    length = parse_size(args.length, name="length")
    model, tok = mh.load_pretrained("smollm2")
    mh.attach(model, mh.KNNMemoryConfig())
    t0 = time.perf_counter()
    entry = diagnose(model, tok, args.probe, length, args.depth, args.seed, args.window, top_ks)
    entry["seconds"] = round(time.perf_counter() - t0, 1)
    entry["load_avg"] = round(os.getloadavg()[0], 2)
    results = json.loads(args.out.read_text()) if args.out.exists() else {
        "what": __doc__.split("\n\n")[0], "config": mh.KNNMemoryConfig().to_dict(),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "threads": args.threads},
        "prompts": {}}
    results["prompts"][f"{args.probe}|{length}|{args.depth}|{args.seed}"] = entry
    args.out.write_text(json.dumps(results, indent=1))
    for s in entry["layers"]:
        print(s["layer"], {k: v for k, v in s.items() if k not in ("heads", "layer")})
    if entry.get("needle_in_window"):
        print("answer:", entry["answer"], "without memory in layers:", entry["no_memory_in"])


if __name__ == "__main__":
    main()
