"""The sweep that chose ``KNNMemoryConfig``'s defaults: recall on the embedded SmolLM2 with kNN memory.

Condition (b) of issue 12's efficacy table, on other seeds than the table's (it uses seed 0): each
prompt (the passkey and RULER's single needle, at several lengths and depths) is memorized but for
its last ``--window`` context tokens, and the model generates greedily from those tokens and the
question; the score is the probes' exact match (``string_match_all``).

To afford many settings on a CPU, each prompt is memorized once, with memory in every layer and
the read settings ``MEMORIZE``, and the read settings are then varied on that memory: which layers read
(``layers``: the others read none), ``top_k``, ``position`` (with ``max_distance``) and ``combine``
(``"joint"`` only: ``"gate"`` needs a trained gate). A subset of layers reads the memory every layer
wrote; an attached model with ``layers=`` that subset also memorizes with reads in that subset only
(the keys the other layers store are then not needed, and the stored keys of the chosen layers differ
slightly): confirm a chosen subset end to end before making it a default.

    python bench/sweep_knn_defaults.py --cells passkey:2k:0.25,needle:4k:0.6 --out bench/results/knn-defaults.json

Results go to ``--out`` prompt by prompt (a rerun skips finished prompts), with the machine and seconds.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import time
from pathlib import Path

import torch

import memlayers.hf as mh
from memlayers.hf.knn import _max_distance
from memlayers.hf.state import memory_wrappers
from memlayers.probes import needle_sample, passkey_sample
from memlayers.probes.haystack import parse_size
from memlayers.probes.scoring import string_match_all

MAX_NEW_TOKENS = {"passkey": 10, "needle": 24}

# Every prompt is memorized with these settings (the defaults when the sweep began), so that all the
# prompts' memories are alike whatever the defaults become; the read settings below replace them.
MEMORIZE = dict(top_k=32)
SETTINGS = {
    "all-k32": dict(top_k=32),
    "all-k16": dict(top_k=16),
    "all-k64": dict(top_k=64),
    "all-k128": dict(top_k=128),
    "all-fixed": dict(top_k=32, position="fixed"),
    "all-none": dict(top_k=32, position="none"),
    "all-unclamped": dict(top_k=32, max_distance=0),
    "layers-0-23": dict(top_k=32, layers=range(0, 24)),
    "layers-4-23": dict(top_k=32, layers=range(4, 24)),
    "layers-4-29": dict(top_k=32, layers=range(4, 30)),
    "layers-12-23": dict(top_k=32, layers=range(12, 24)),
}


def _sample(tok, probe, length, depth, seed):
    if probe == "passkey":
        return passkey_sample(tok, length, depth, seed=seed)
    return needle_sample(tok, length, depth, seed=seed)


def _read_settings(wrappers, base, layers=None, **fields) -> None:
    """Give every kNN wrapper the read settings ``base`` with ``fields`` replaced; ``layers``: the
    wrappers that read (the others report an empty memory until the next call)."""
    cfg = dataclasses.replace(base, **fields)
    reading = range(len(wrappers)) if layers is None else layers
    for i, w in enumerate(wrappers):
        w.memory_config, w.max_distance = cfg, _max_distance(cfg, w.base_layer)
        if i in reading:
            w.__dict__.pop("holds_memories", None)
        else:
            w.holds_memories = lambda: False


@torch.no_grad()
def _answer(model, tok, window_ids, max_new_tokens):
    ids = torch.tensor([window_ids])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tok.eos_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", required=True, help="probe:length:depth,... e.g. passkey:2k:0.25,needle:4k:0.6")
    ap.add_argument("--settings", default=",".join(SETTINGS), help=f"comma-separated, of {list(SETTINGS)}")
    ap.add_argument("--seed", type=int, default=1000, help="prompt seed (the efficacy table uses 0)")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--chunk-size", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("bench/results/knn-defaults.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    names = [s for s in args.settings.split(",") if s]
    unknown = [s for s in names if s not in SETTINGS]
    if unknown:
        raise SystemExit(f"--settings: unknown {unknown}; known: {list(SETTINGS)}")
    cells = []
    for spec in args.cells.split(","):
        probe, length, depth = spec.split(":")
        if probe not in ("passkey", "needle"):
            raise SystemExit(f"--cells: probe must be passkey or needle, got {probe!r}")
        cells.append((probe, parse_size(length, name="length"), float(depth)))

    results = json.loads(args.out.read_text()) if args.out.exists() else {
        "what": __doc__.split("\n\n")[1].replace("\n", " "),
        "window": args.window, "chunk_size": args.chunk_size,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "threads": args.threads},
        "settings": {}, "prompts": {}}
    results["settings"].update({n: {k: (list(v) if isinstance(v, range) else v) for k, v in SETTINGS[n].items()}
                                for n in names})
    model, tok = mh.load_pretrained("smollm2")
    mh.attach(model, mh.KNNMemoryConfig(**MEMORIZE))
    wrappers = memory_wrappers(model, ("knn",))
    base = wrappers[0].memory_config
    for probe, length, depth in cells:
        key = f"{probe}|{length}|{depth}|{args.seed}"
        done = results["prompts"].setdefault(key, {"probe": probe, "length": length, "depth": depth,
                                                   "seed": args.seed, "scores": {}})
        todo = [n for n in names if n not in done["scores"]]
        if not todo:
            continue
        sample = _sample(tok, probe, length, depth, args.seed)
        context = tok.encode(sample.context, add_special_tokens=True)
        window_ids = context[-args.window:] + tok.encode(sample.query, add_special_tokens=False)
        t0 = time.perf_counter()
        _read_settings(wrappers, base)  # memorize with MEMORIZE in every layer
        mh.reset_memory(model)
        mh.memorize(model, torch.tensor([context[:-args.window]]), chunk_size=args.chunk_size, progress=False)
        done["memorize_s"] = round(time.perf_counter() - t0, 1)
        for name in todo:
            t0 = time.perf_counter()
            _read_settings(wrappers, base, **SETTINGS[name])
            response = _answer(model, tok, window_ids, MAX_NEW_TOKENS[probe])
            score = string_match_all(response, sample.expected)
            done["scores"][name] = {"score": score, "response": response,
                                    "seconds": round(time.perf_counter() - t0, 1)}
            print(f"{key} {name:14s} score={score} {response!r}", flush=True)
            tmp = args.out.with_suffix(".tmp")
            tmp.write_text(json.dumps(results, indent=1))
            tmp.replace(args.out)
    summary = {}
    for rec in results["prompts"].values():
        for name, s in rec["scores"].items():
            summary.setdefault(name, {}).setdefault(rec["probe"], []).append(s["score"])
    results["summary"] = {name: {probe: f"{sum(v):g}/{len(v)}" for probe, v in sorted(by_probe.items())}
                          for name, by_probe in summary.items()}
    args.out.write_text(json.dumps(results, indent=1))
    print(json.dumps(results["summary"], indent=1))


if __name__ == "__main__":
    main()
