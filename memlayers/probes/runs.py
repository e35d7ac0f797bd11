"""One call per probe: build the grid, run it resumably into a folder, write the pictures.

Example (any HF causal LM; see ``memlayers probe --help`` for the command line)::

    from memlayers.probes import HFResponder, load_model, run_needle
    model, tok = load_model("path/to/model")
    run_needle(HFResponder(model, tok, max_new_tokens=128), tok, "out/needle-single",
               lengths=[1024, 4096], depths=5)
    # -> out/needle-single/cells/*.json, heatmap.png (with matplotlib: memlayers[plots]), summary.md
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Union

from torch import nn

from .generators import NEEDLE_VARIANTS, needle_sample, passkey_sample, retention_sample
from .haystack import Haystack, check_tokenizer, depth_grid
from .mqar import evaluate_mqar, mqar_data
from .plots import plot_curves, plot_heatmap, plots_available, summary_markdown
from .runner import Responder, run_cells, text_evaluator


def _sizes(name: str, values, minimum: int) -> List[int]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
        raise TypeError(f"{name} must be a non-empty list of ints, got {values!r}")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name} must hold ints, got {v!r}")
        if v < minimum:
            raise ValueError(f"{name} must hold ints >= {minimum}, got {v}")
    return sorted(set(values))


def _depths(depths, spacing: str) -> List[float]:
    if isinstance(depths, int) and not isinstance(depths, bool):
        return depth_grid(depths, spacing)
    if isinstance(depths, (str, bytes)) or not isinstance(depths, Sequence) or not depths:
        raise TypeError(f"depths must be an int (how many) or a non-empty list of floats in [0, 1], got {depths!r}")
    for d in depths:
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not math.isfinite(d) or not 0 <= d <= 1:
            raise ValueError(f"depths must be finite floats in [0, 1], got {d!r}")
    return sorted({round(float(d), 4) for d in depths})


def _responder_config(responder) -> Dict:
    if not callable(responder):
        raise TypeError(f"responder must be callable (sample -> str), got {type(responder).__name__}")
    config = getattr(responder, "config", None)
    return dict(config) if isinstance(config, dict) else {"model": getattr(responder, "__name__", type(responder).__name__)}


def write_report(out_dir, records: Sequence[Dict], *, x: str, y: str, title: str, curves: bool = False) -> List[Path]:
    """Write ``summary.md`` and, where matplotlib is installed (``plots_available()``), ``heatmap.png``
    (or ``retention.png`` when ``curves``) into ``out_dir``; returns the files written."""
    out = Path(out_dir)
    md = out / "summary.md"
    md.write_text(summary_markdown(records, x=x, y=y, title=title) + "\n")
    if not plots_available():
        return [md]
    png = (plot_curves if curves else plot_heatmap)(records, out / ("retention.png" if curves else "heatmap.png"), x=x, y=y, title=title)
    return [png, md]


def _title(probe: str, config: Dict) -> str:
    mem = config.get("memory", {}).get("kind", "none") if isinstance(config.get("memory"), dict) else "none"
    model = str(config.get("model", "?"))
    if os.path.isdir(model):  # a local folder: its name, not the whole path
        model = os.path.basename(os.path.normpath(model))
    return f"{probe}: {model}" + ("" if mem == "none" else f" + {mem} memory")


def _length_depth_cells(tokenizer, lengths, depths, spacing: str):
    """Checks shared by the ``lengths x depths`` probes; returns the shortest length and the cells."""
    check_tokenizer(tokenizer)
    lengths = _sizes("lengths", lengths, 1)
    depths = _depths(depths, spacing)
    return lengths[0], [{"context_length": L, "depth": d} for L in lengths for d in depths]


def _run_text_probe(responder, out_dir, config: Dict, cells: List[Dict], make, *, samples: int, save_prompts: bool,
                    overwrite: bool, progress: bool, plots: bool, desc: str, x: str, y: str, title: str,
                    curves: bool = False) -> List[Dict]:
    """Run ``cells`` of a text probe (``make(cell, i) -> ProbeSample``) into ``out_dir``; draw the report."""
    evaluate = text_evaluator(make, responder, samples=samples, prompts_dir=Path(out_dir) / "prompts" if save_prompts else None)
    records = run_cells(out_dir, config, cells, evaluate, overwrite=overwrite, progress=progress, desc=desc)
    if plots:
        write_report(out_dir, records, x=x, y=y, title=_title(title, config), curves=curves)
    return records


def run_needle(
    responder: Responder,
    tokenizer,
    out_dir,
    *,
    lengths: Sequence[int] = (1024, 2048, 4096),
    depths: Union[int, Sequence[float]] = 5,
    spacing: str = "linear",
    variant: str = "single",
    haystack: Optional[Haystack] = None,
    seed: int = 0,
    samples: int = 1,
    save_prompts: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    plots: bool = True,
) -> List[Dict]:
    """Needle in a haystack over ``lengths x depths`` (see ``needle_sample``); returns the records.

    ``depths``: how many (spaced by ``spacing``, ``"linear"`` or ``"sigmoid"``) or the depths
    themselves in [0, 1]. Scores are ``string_match_all`` (fraction of the asked values found)."""
    shortest, cells = _length_depth_cells(tokenizer, lengths, depths, spacing)
    if variant not in NEEDLE_VARIANTS:
        raise ValueError(f"variant must be one of {tuple(NEEDLE_VARIANTS)}, got {variant!r}")
    hay = haystack if haystack is not None else Haystack()
    config = {"probe": "needle", "variant": variant, "haystack": hay.describe(), "seed": seed, "samples": samples,
              "scorer": "string_match_all", **_responder_config(responder)}
    # the shortest length must hold the needles: fail now, not after the folder is made
    needle_sample(tokenizer, shortest, 0.0, variant=variant, seed=seed, haystack=hay)

    def make(cell, i):
        return needle_sample(tokenizer, cell["context_length"], cell["depth"], variant=variant, seed=seed, index=i, haystack=hay)

    return _run_text_probe(responder, out_dir, config, cells, make, samples=samples, save_prompts=save_prompts,
                           overwrite=overwrite, progress=progress, plots=plots, desc=f"needle/{variant}",
                           x="context_length", y="depth", title=f"needle ({variant})")


def run_passkey(
    responder: Responder,
    tokenizer,
    out_dir,
    *,
    lengths: Sequence[int] = (1024, 2048, 4096),
    depths: Union[int, Sequence[float]] = 5,
    spacing: str = "linear",
    seed: int = 0,
    samples: int = 1,
    save_prompts: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    plots: bool = True,
) -> List[Dict]:
    """Passkey retrieval over ``lengths x depths`` (see ``passkey_sample``); returns the records."""
    shortest, cells = _length_depth_cells(tokenizer, lengths, depths, spacing)
    config = {"probe": "passkey", "seed": seed, "samples": samples, "scorer": "string_match_all", **_responder_config(responder)}
    passkey_sample(tokenizer, shortest, 0.0, seed=seed)

    def make(cell, i):
        return passkey_sample(tokenizer, cell["context_length"], cell["depth"], seed=seed, index=i)

    return _run_text_probe(responder, out_dir, config, cells, make, samples=samples, save_prompts=save_prompts,
                           overwrite=overwrite, progress=progress, plots=plots, desc="passkey",
                           x="context_length", y="depth", title="passkey")


def run_retention(
    responder: Responder,
    tokenizer,
    out_dir,
    *,
    distances: Sequence[int] = (0, 256, 1024),
    loads: Sequence[int] = (0, 4, 16),
    haystack: Optional[Haystack] = None,
    seed: int = 0,
    samples: int = 1,
    save_prompts: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    plots: bool = True,
) -> List[Dict]:
    """Retention over ``distances x loads`` (see ``retention_sample``); returns the records and
    draws accuracy-vs-distance and accuracy-vs-load curves. Facts written into the weights
    (fine-tuning, memory injection) are measured by ``run_parametric_retention``."""
    check_tokenizer(tokenizer)
    distances = _sizes("distances", distances, 0)
    loads = _sizes("loads", loads, 0)
    hay = haystack if haystack is not None else Haystack()
    config = {"probe": "retention", "haystack": hay.describe(), "seed": seed, "samples": samples,
              "scorer": "string_match_all", **_responder_config(responder)}

    def make(cell, i):
        return retention_sample(tokenizer, cell["distance"], cell["load"], seed=seed, index=i, haystack=hay)

    cells = [{"distance": D, "load": M} for D in distances for M in loads]
    return _run_text_probe(responder, out_dir, config, cells, make, samples=samples, save_prompts=save_prompts,
                           overwrite=overwrite, progress=progress, plots=plots, desc="retention",
                           x="distance", y="load", title="retention", curves=True)


def run_parametric_retention(
    inject: Callable[[int], Callable[[int], Union[float, Dict]]],
    out_dir,
    *,
    batches: int,
    name: Optional[str] = None,
    config: Optional[Dict] = None,
    overwrite: bool = False,
    progress: bool = True,
    plots: bool = True,
) -> List[Dict]:
    """Retention of facts written into the weights, batch after batch (the parametric mode of the
    retention probe; ``run_retention`` measures facts held in the context).

    ``inject(b)`` writes fact batch ``b`` (called for ``b = 0, 1, ...`` in order, each once) and
    returns a responder ``facts_batch -> score`` (a float in [0, 1], or a dict with ``"score"`` and
    anything else to record) for the model as it is after batch ``b``. The cells are
    ``{"after_batch": b, "facts_batch": j}`` for ``j <= b``; returns their records, drawn as
    retention curves (score vs batches injected, one line per facts batch).

    A rerun into the same folder keeps the records there and replays the injections up to the
    first batch that has cells left (the weights are not saved, the injections are the state).

    Args:
        inject: ``b -> responder``, as above.
        batches: how many fact batches are injected.
        name, config: what the records say about the model and the method (JSON-serializable).
    """
    if not callable(inject):
        raise TypeError(f"inject must be callable (batch -> responder), got {type(inject).__name__}")
    if isinstance(batches, bool) or not isinstance(batches, int) or batches < 1:
        raise ValueError(f"batches must be an int >= 1, got {batches!r}")
    if config is not None and not isinstance(config, dict):
        raise TypeError(f"config must be a dict or None, got {type(config).__name__}")
    run_config = {"probe": "parametric_retention", "model": name or getattr(inject, "__name__", "inject"),
                  "batches": batches, **(config or {})}
    cells = [{"after_batch": b, "facts_batch": j} for b in range(batches) for j in range(b + 1)]
    injected: List[Callable] = []  # injected[b]: the responder after batch b

    def evaluate(cell):
        while len(injected) <= cell["after_batch"]:
            responder = inject(len(injected))
            if not callable(responder):
                raise TypeError(f"inject({len(injected)}) must return a responder (facts_batch -> score), "
                                f"got {type(responder).__name__}")
            injected.append(responder)
        result = injected[cell["after_batch"]](cell["facts_batch"])
        result = dict(result) if isinstance(result, dict) else {"score": result}
        score = result.get("score")
        if isinstance(score, bool) or not isinstance(score, (int, float)) or not 0 <= score <= 1:
            raise ValueError(f"the responder after batch {cell['after_batch']} must score facts batch "
                             f"{cell['facts_batch']} in [0, 1], got {score!r}")
        return {**result, "score": float(score)}

    records = run_cells(out_dir, run_config, cells, evaluate, overwrite=overwrite, progress=progress,
                        desc="parametric retention")
    if plots:
        write_report(out_dir, records, x="after_batch", y="facts_batch",
                     title=f"parametric retention: {run_config['model']}", curves=True)
    return records


def run_mqar(
    model: Union[nn.Module, Callable[[Dict], nn.Module]],
    out_dir,
    *,
    lengths: Sequence[int] = (64, 128, 256),
    kv_pairs: Sequence[int] = (4, 8, 16),
    vocab_size: int = 8192,
    examples: int = 256,
    power_a: float = 0.01,
    seed: int = 0,
    batch_size: int = 64,
    embedding=None,
    name: Optional[str] = None,
    config: Optional[Dict] = None,
    reset: Optional[Callable[[], None]] = None,
    overwrite: bool = False,
    progress: bool = True,
    plots: bool = True,
) -> List[Dict]:
    """MQAR accuracy over ``lengths x kv_pairs`` (cells with ``4 * kv_pairs > length`` are left out,
    as MQAR cannot hold them); returns the records.

    Args:
        model: an ``nn.Module`` evaluated as in ``evaluate_mqar``, or ``cell -> nn.Module`` to build
            (e.g. train) a model per cell.
        embedding: ``[V, dim]`` table for modules that take embeddings (see ``evaluate_mqar``).
        name, config: what the records say about the model.
        reset: called before each batch (e.g. to clear an attached memory's state).
    """
    if not isinstance(model, nn.Module) and not callable(model):
        raise TypeError(f"model must be an nn.Module or a callable cell -> nn.Module, got {type(model).__name__}")
    lengths = _sizes("lengths", lengths, 2)
    kv_pairs = _sizes("kv_pairs", kv_pairs, 1)
    cells = [{"seq_len": T, "num_kv_pairs": K} for T in lengths for K in kv_pairs if 4 * K <= T]
    if not cells:
        raise ValueError(f"no cell has 4 * kv_pairs <= length: lengths {lengths}, kv_pairs {kv_pairs}")
    # validates vocab_size, power_a, seed and the lengths against the vocabulary before any run
    for T in lengths:
        mqar_data(1, T, vocab_size, 1, power_a=power_a, seed=seed)
    run_config = {"probe": "mqar", "model": name or type(model).__name__, "vocab_size": vocab_size, "examples": examples,
                  "power_a": power_a, "seed": seed, **(config or {})}

    def evaluate(cell):
        data = mqar_data(examples, cell["seq_len"], vocab_size, cell["num_kv_pairs"], power_a=power_a, seed=seed)
        m = model if isinstance(model, nn.Module) else model(cell)
        res = evaluate_mqar(m, data, batch_size=batch_size, embedding=embedding, before_batch=reset)
        return {"score": res.accuracy, "correct": res.correct, "total": res.total,
                "by_distance": {str(k): v for k, v in res.by_distance.items()}}

    records = run_cells(out_dir, run_config, cells, evaluate, overwrite=overwrite, progress=progress, desc="mqar")
    if plots:
        write_report(out_dir, records, x="seq_len", y="num_kv_pairs", title=_title("MQAR", run_config))
    return records
