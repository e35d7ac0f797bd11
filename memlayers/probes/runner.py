"""Resumable probe runs: one JSON record per grid cell, written atomically, skipped when present.

An output folder holds ``manifest.json`` (the run's settings) and ``cells/<cell>.json``. A run
restarted into the same folder with the same settings does only the cells that have no record, so
an interrupted run loses at most the cell it was on. Different settings (another model, seed, ...)
are refused rather than mixed in; the grid itself (lengths, depths) may grow between runs.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from .generators import ProbeSample
from .scoring import SCORERS

Responder = Callable[[ProbeSample], str]


def _version() -> str:
    from .._version import __version__

    return __version__


def cell_name(cell: Dict) -> str:
    """File stem of a cell: ``{"context_length": 1024, "depth": 0.5}`` -> ``context_length=1024__depth=0.5``."""
    return "__".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in cell.items())


def read_json(path: Path, what: str) -> Dict:
    """A JSON object written by this module; a damaged or foreign file is a ``ValueError`` naming it."""
    try:
        obj = json.loads(Path(path).read_text())
    except UnicodeDecodeError:
        obj = None
        problem = "not UTF-8 text"
    except json.JSONDecodeError as e:
        obj = None
        problem = f"invalid JSON: {e.msg} at line {e.lineno} column {e.colno}"
    else:
        problem = None if isinstance(obj, dict) else f"holds a {type(obj).__name__}, not a JSON object"
    if problem is None and what == "cell record" and "score" not in obj:
        problem = "has no 'score'"
    if problem is not None:
        raise ValueError(f"damaged {what} {str(path)!r}: {problem}; delete it to redo it (or rerun with --overwrite)")
    return obj


def _write_json(path: Path, obj) -> None:
    # write-then-rename: a run killed mid-write leaves no half record that would be taken as done
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def _prepare(out_dir, config: Dict, overwrite: bool) -> Path:
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out_dir {str(out)!r} exists and is not a folder")
    manifest = out / "manifest.json"
    if manifest.exists() and not overwrite:
        old = read_json(manifest, "run manifest").get("config", {})
        diff = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k))
        if diff:
            details = "; ".join(f"{k}: {old.get(k)!r} -> {config.get(k)!r}" for k in diff)
            raise ValueError(
                f"out_dir {str(out)!r} holds a run with other settings ({details}); "
                "use another output folder or overwrite=True (--overwrite)"
            )
    if overwrite:
        for sub in ("cells", "prompts"):
            shutil.rmtree(out / sub, ignore_errors=True)
    (out / "cells").mkdir(parents=True, exist_ok=True)
    _write_json(manifest, {"config": config, "memlayers_version": _version()})
    return out


def run_cells(
    out_dir,
    config: Dict,
    cells: Sequence[Dict],
    evaluate: Callable[[Dict], Dict],
    *,
    overwrite: bool = False,
    progress: bool = True,
    desc: str = "cells",
) -> List[Dict]:
    """Evaluate every cell that has no record yet and save one record per cell.

    Args:
        out_dir: the run's folder (created).
        config: the run's settings, JSON-serializable; stored in the manifest and every record.
        cells: dicts of the grid coordinates, e.g. ``{"context_length": 1024, "depth": 0.5}``.
        evaluate: ``cell -> dict`` with at least ``"score"`` (0..1); the record adds the cell, the
            config, the time taken, the memlayers version and a timestamp.
        overwrite: drop the folder's records first (also lets the settings change).

    Returns the records of all ``cells``, loaded or new, in order.
    """
    if not isinstance(config, dict):
        raise TypeError(f"config must be a dict, got {type(config).__name__}")
    cells = list(cells)
    if not cells or not all(isinstance(c, dict) and c for c in cells):
        raise ValueError("cells must be a non-empty list of non-empty dicts")
    json.dumps(config)  # fail on unserializable settings before touching the folder
    out = _prepare(out_dir, config, overwrite)
    paths = [out / "cells" / f"{cell_name(cell)}.json" for cell in cells]
    # Every earlier record is read before any new work: a damaged one fails the run up front.
    done = {i: read_json(p, "cell record") for i, p in enumerate(paths) if p.exists()}

    from tqdm import tqdm

    records = []
    bar = tqdm(cells, desc=desc, disable=not progress, unit="cell")
    if done:
        bar.set_postfix(done_before=len(done))
    for i, (cell, path) in enumerate(zip(bar, paths)):
        if i in done:
            records.append(done[i])
            continue
        t0 = time.perf_counter()
        result = evaluate(cell)
        record = {
            **cell,
            **result,
            "time_s": round(time.perf_counter() - t0, 4),
            "config": config,
            "memlayers_version": _version(),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        _write_json(path, record)
        records.append(record)
    return records


def load_records(out_dir) -> List[Dict]:
    """All cell records of a run folder (sorted by file name)."""
    cells = Path(out_dir) / "cells"
    if not cells.is_dir():
        raise ValueError(f"out_dir {str(out_dir)!r} has no cells/ folder: not a probe run")
    return [read_json(p, "cell record") for p in sorted(cells.glob("*.json"))]


def text_evaluator(
    make_sample: Callable[[Dict, int], ProbeSample],
    responder: Responder,
    *,
    samples: int = 1,
    scorer: str = "string_match_all",
    prompts_dir: Optional[Path] = None,
) -> Callable[[Dict], Dict]:
    """Build ``evaluate(cell)`` for a text probe: ``samples`` prompts per cell, each answered by
    ``responder(sample) -> str`` and scored; the cell's score is the mean.

    ``prompts_dir``: save each prompt as ``<cell>__<index>.txt`` there (for inspection)."""
    if not callable(responder):
        raise TypeError(f"responder must be callable (sample -> str), got {type(responder).__name__}")
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples must be an int >= 1, got {samples!r}")
    if scorer not in SCORERS:
        raise ValueError(f"scorer must be one of {tuple(SCORERS)}, got {scorer!r}")
    score_fn = SCORERS[scorer]

    def evaluate(cell: Dict) -> Dict:
        rows = []
        for i in range(samples):
            sample = make_sample(cell, i)
            t0 = time.perf_counter()
            response = responder(sample)
            if not isinstance(response, str):
                raise TypeError(f"responder must return a str, got {type(response).__name__}")
            row = {
                "index": i,
                "needles": sample.needles,
                "expected": sample.expected,
                "response": response,
                "score": score_fn(response, sample.expected),
                "time_s": round(time.perf_counter() - t0, 4),
                **{k: v for k, v in sample.params.items() if k not in cell},
            }
            if prompts_dir is not None:
                prompts_dir.mkdir(parents=True, exist_ok=True)
                name = f"{cell_name(cell)}__{i}.txt"
                (prompts_dir / name).write_text(sample.prompt)
                row["prompt_file"] = f"prompts/{name}"
            rows.append(row)
        return {"score": sum(r["score"] for r in rows) / len(rows), "samples": rows}

    return evaluate
