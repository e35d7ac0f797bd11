"""``memlayers probe needle|passkey|retention|mqar``: the probe subcommand of the command line.

``memlayers probe retention --inject FILE.py:FACTORY --batches N`` is the retention probe's
parametric mode (facts written into the weights batch after batch, ``run_parametric_retention``);
with ``--model`` it measures facts held in the context.

``memlayers/cli.py`` wires it in::

    from memlayers.probes.cli import add_probe_parser, run_probe
    add_probe_parser(subparsers)        # subparsers = parser.add_subparsers(dest="command")
    ...
    if args.command == "probe":
        return run_probe(args)

Errors in what the user typed (a missing model path, a bad option value, settings that clash with
an earlier run in ``--out``) print one line and return exit code 2, without a traceback. They are
found before any cell runs:

- ``--out`` must be a folder, or creatable as one, that can be written in.
- ``--lengths`` (``--distances``) must fit the model's positions (``max_position_embeddings`` or
  ``n_positions`` of its config); with ``--memory knn``, where the context goes into the memory, they
  must fit what the memory holds (its ``capacity``) instead.
- Earlier records in ``--out`` must be readable: a damaged cell JSON is named, to delete or redo.

Plots are optional: without matplotlib (``pip install 'memlayers[plots]'``) the run says so in one
line up front, then runs every cell and writes the records and ``summary.md`` without pictures.
A file that cannot be written during the run (disk full, permissions) is named in one line, exit 2.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
import tempfile
from pathlib import Path
from typing import Dict, Sequence

from .haystack import parse_size, parse_sizes
from .plots import PLOTS_INSTALL, plots_available

PROBES = ("needle", "passkey", "retention", "mqar")


def _sizes_type(minimum: int):
    def parse(text: str):
        try:
            return parse_sizes(text, name="value", minimum=minimum)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return parse


def _depths_type(text: str):
    """``5`` -> five spaced depths; ``0.5`` or ``0,0.25,1`` -> those depths (fractions in [0, 1])."""
    try:
        if "," not in text and "." not in text:
            n = int(text)
            if n < 1:
                raise ValueError
            return n
        depths = [float(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a count like 5 or fractions like 0,0.5,1, got {text!r}") from None
    if not depths or any(not 0 <= d <= 1 for d in depths):
        raise argparse.ArgumentTypeError(f"depths must be fractions in [0, 1], got {text!r}")
    return depths


def _positive_int(text: str) -> int:
    try:
        value = parse_size(text, name="value")
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text!r}")
    return value


def _nonnegative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text!r}")
    return value


def _option(text: str):
    if "=" not in text or not text.split("=", 1)[0]:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    if "," in value:  # layers=-2,-1 -> [-2, -1]
        return key, [_scalar(v) for v in value.split(",") if v.strip()]
    return key, _scalar(value)


def _scalar(value: str):
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(value.strip().lower(), value)


def _add_model_options(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--model", required=required, metavar="PATH_OR_NAME",
                   help="causal LM: 'smollm2' (the embedded SmolLM2-135M-Instruct), a .gguf file, a local "
                        "HuggingFace folder with config.json, weights and tokenizer, or a hub name where the "
                        "network allows")
    p.add_argument("--memory", choices=("none", "knn", "titans"), default="none",
                   help="memlayers memory to attach before probing (default: none). With memory the context "
                        "is memorized in chunks and the model answers from the question alone")
    p.add_argument("--memory-option", action="append", type=_option, default=[], metavar="KEY=VALUE",
                   help="field of the memory's config class (KNNMemoryConfig / TitansMemoryConfig); repeatable")
    p.add_argument("--chunk-size", type=_positive_int, default=512, help="tokens per memorize() call with --memory (default 512)")
    p.add_argument("--window", type=_positive_int, default=None, metavar="N",
                   help="the model reads only the last N context tokens and the question; with --memory the "
                        "context before them is memorized first (default: the whole context without memory, "
                        "none of it with memory)")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                   help="weights' dtype (default: as saved)")
    p.add_argument("--device", default=None, help="torch device, e.g. cuda or cpu (default: cuda if available)")


def _add_run_options(p: argparse.ArgumentParser, text: bool = True) -> None:
    p.add_argument("--out", required=True, type=Path, metavar="DIR",
                   help="output folder; the run goes into DIR/<probe> (records in cells/*.json, heatmap or curves "
                        "PNG, summary.md). Rerunning the same command resumes: finished cells are not redone")
    p.add_argument("--seed", type=_nonnegative_int, default=0, help="random seed of the generated prompts (default 0)")
    if text:
        p.add_argument("--samples", type=_positive_int, default=1, help="prompts per cell, scores averaged (default 1)")
        p.add_argument("--max-new-tokens", type=_positive_int, default=None,
                       help="tokens generated per answer (default: 128 needle, 16 passkey, 32 retention)")
        p.add_argument("--save-prompts", action="store_true", help="also save every prompt to DIR/<probe>/prompts/")
    p.add_argument("--overwrite", action="store_true", help="discard earlier records in the output folder instead of resuming")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_length_depth_options(p: argparse.ArgumentParser, item: str, lengths_example: str = "",
                              spacing_help: str = "spacing of N depths") -> None:
    """``--lengths``, ``--depths`` and ``--depth-spacing`` of the probes that hide ``item`` at a depth."""
    p.add_argument("--lengths", type=_sizes_type(16), default=[1024, 2048, 4096], metavar="L1,L2,...",
                   help=f"prompt lengths in tokens, k = 1024 ({lengths_example}default 1k,2k,4k); at most the model's "
                        "positions, or with --memory knn the memory's capacity")
    p.add_argument("--depths", type=_depths_type, default=5, metavar="N|D1,D2,...",
                   help=f"number of {item} depths (an integer), or the depths as fractions, e.g. 0.5 or 0,0.25,1 (default 5)")
    p.add_argument("--depth-spacing", choices=("linear", "sigmoid"), default="linear", help=spacing_help)


def add_probe_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``probe`` with its ``needle|passkey|retention|mqar`` subcommands to ``subparsers``
    (from ``parser.add_subparsers()``); returns the ``probe`` parser. Parsed args carry
    ``probe`` (the subcommand name) for ``run_probe``."""
    fmt = argparse.ArgumentDefaultsHelpFormatter
    probe = subparsers.add_parser(
        "probe", help="recall probes: needle, passkey, retention, mqar",
        description="Recall probes with exact-match scoring, one JSON record per cell, resumable runs and heatmaps.")
    sub = probe.add_subparsers(dest="probe", metavar="{needle,passkey,retention,mqar}", required=True)

    p = sub.add_parser("needle", help="needle in a haystack (RULER): depth x context length heatmap",
                       description="RULER-style needle in a haystack over a grid of context lengths and needle depths, "
                                   "scored by string_match_all (case-insensitive substring match of every expected value).")
    _add_model_options(p)
    _add_length_depth_options(p, "needle", lengths_example="e.g. 1k,4k,16k; ",
                              spacing_help="spacing of N depths; sigmoid puts more near the start and end")
    p.add_argument("--variant", choices=("single", "multikey", "multivalue", "multiquery"), default="single",
                   help="RULER task: one needle; 4 keys (3 distractors); 1 key with 4 values; 4 keys all asked")
    p.add_argument("--haystack", type=Path, default=None, metavar="FILE",
                   help="text file to use as the haystack (repeated as needed); default: RULER's noise sentence")
    _add_run_options(p)

    p = sub.add_parser("passkey", help="passkey retrieval: depth x context length heatmap",
                       description="The passkey retrieval test ('The pass key is K. Remember it. K is the pass key.') "
                                   "hidden in the noise sentence, over context lengths and depths.")
    _add_model_options(p)
    _add_length_depth_options(p, "passkey")
    _add_run_options(p)

    p = sub.add_parser("retention", help="retention / forgetting curves: accuracy vs distance and vs load, "
                                         "or vs fact batches written into the weights (--inject)",
                       description="In context (--model): write a fact, then LOAD further facts spread through "
                                   "DISTANCE intervening tokens, then ask for the first fact; curves of accuracy "
                                   "against distance and load. In the weights (--inject): fact batches written one "
                                   "after another by an injection procedure; curves of each batch's score against "
                                   "the batches written so far.")
    _add_model_options(p, required=False)
    p.add_argument("--inject", metavar="FILE.py:FACTORY|PKG.MOD:FACTORY", default=None,
                   help="parametric mode, instead of --model: FACTORY(seed=SEED, **options) returns inject, where "
                        "inject(b) writes fact batch b into the model and returns a scorer facts_batch -> score in "
                        "[0, 1] (e.g. models/continual_injection/run.py:injector). Results go into "
                        "DIR/parametric-retention")
    p.add_argument("--inject-option", action="append", type=_option, default=[], metavar="KEY=VALUE",
                   help="keyword argument of the --inject FACTORY, e.g. method=lora; repeatable")
    p.add_argument("--batches", type=_positive_int, default=None, metavar="N",
                   help="with --inject: fact batches to write one after another (required there)")
    p.add_argument("--distances", type=_sizes_type(0), default=[0, 256, 1024], metavar="D1,D2,...",
                   help="tokens between the asked fact and the question (default 0,256,1k)")
    p.add_argument("--loads", type=_sizes_type(0), default=[0, 4, 16], metavar="M1,M2,...",
                   help="further facts written after the asked one (default 0,4,16)")
    p.add_argument("--haystack", type=Path, default=None, metavar="FILE", help="filler text file (default: noise sentence)")
    _add_run_options(p)

    p = sub.add_parser("mqar", help="multi-query associative recall (Zoology) on a model or a bare module",
                       description="MQAR accuracy over sequence lengths x key-value pairs. --model: a HuggingFace "
                                   "causal LM read on raw token ids (no tokenizer). --module: a sequence mixer "
                                   "class, evaluated on random unit embeddings as a bare memory, or, with "
                                   "--train-steps, trained inside a small LM per cell first.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", metavar="PATH_OR_NAME", help="HuggingFace causal LM (local folder or hub name)")
    src.add_argument("--module", metavar="PKG.MOD:FACTORY",
                     help="import path of a callable FACTORY(dim) -> nn.Module mapping [B, T, dim] -> [B, T, dim]")
    p.add_argument("--memory", choices=("none", "knn", "titans"), default="none", help="memory to attach to --model")
    p.add_argument("--memory-option", action="append", type=_option, default=[], metavar="KEY=VALUE",
                   help="field of the memory's config class; repeatable")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto", help="--model weights' dtype")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    p.add_argument("--lengths", type=_sizes_type(4), default=[64, 128, 256], metavar="T1,T2,...",
                   help="sequence lengths (even; default 64,128,256)")
    p.add_argument("--kv-pairs", type=_sizes_type(1), default=[4, 8, 16], metavar="K1,K2,...",
                   help="key-value pairs per sequence; cells with 4*K > T are skipped (default 4,8,16)")
    p.add_argument("--vocab-size", type=_positive_int, default=None,
                   help="MQAR vocabulary (default: 8192, or the model's vocabulary if smaller)")
    p.add_argument("--examples", type=_positive_int, default=256, help="test sequences per cell (default 256)")
    p.add_argument("--power-a", type=float, default=0.01, help="power-law exponent of query gaps (default 0.01)")
    p.add_argument("--batch-size", type=_positive_int, default=64, help="sequences per forward pass (default 64)")
    p.add_argument("--dim", type=_positive_int, default=64, help="--module width (default 64)")
    p.add_argument("--layers", type=_positive_int, default=2, help="--module layers when trained (default 2)")
    p.add_argument("--train-steps", type=_nonnegative_int, default=0, help="train --module this many steps per cell (default 0)")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate for --train-steps (default 1e-3)")
    _add_run_options(p, text=False)
    return probe


class _UsageError(Exception):
    pass


def _memory_setup(model, args):
    from .hf import attach_memory

    options = dict(args.memory_option)
    return attach_memory(model, args.memory, options)


def _check_out(out: Path) -> None:
    """``--out`` is a folder, or can be made one, that this process can write in (nothing is created)."""
    existing = out
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        raise _UsageError(f"--out {str(out)!r}: {str(existing)!r} exists and is not a folder")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise _UsageError(f"--out {str(out)!r}: cannot write in {str(existing)!r} ({e.strerror or e})") from None


def _model_positions(name_or_path: str):
    """``(positions, config field)`` from a HF model's config (read without its weights), or ``None``
    when the config cannot be read here (loading the model reports that) or names no limit."""
    try:
        from transformers import AutoConfig

        from ..hf.pretrained import model_source

        folder, gguf_file = model_source(os.path.expanduser(name_or_path))  # "smollm2", a .gguf file, a folder
        kwargs = {"gguf_file": gguf_file} if gguf_file else {}
        config = AutoConfig.from_pretrained(folder, local_files_only=True, **kwargs)
    except Exception:  # noqa: BLE001 - any failure is reported by load_model with its reason
        return None
    for field in ("max_position_embeddings", "n_positions"):
        value = getattr(config, field, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value, field
    return None


def _knn_capacity(options: Dict):
    """Tokens the kNN memory will hold with these ``--memory-option`` values (None: unknown here)."""
    try:
        from ..hf import KNNMemoryConfig

        return KNNMemoryConfig(**options).capacity
    except Exception:  # noqa: BLE001 - bad options are reported when the memory is attached
        return None


def _check_lengths(option: str, lengths: Sequence[int], model: str, memory: str, options: Dict,
                   window=None) -> None:
    """Before the model loads: the longest prompt must fit the model's positions, or with kNN memory
    (the context goes into the memory) what the memory holds; with a ``window`` and no memory the
    model reads only the window and the question."""
    longest = max(lengths)
    if memory == "knn":
        capacity = _knn_capacity(options)
        if isinstance(capacity, int) and longest > capacity:
            raise _UsageError(f"{option}: {longest} tokens exceed what the kNN memory holds ({capacity} tokens); "
                              "give shorter lengths or a larger --memory-option capacity=N")
        return
    if window is not None and memory == "none":
        return  # the model reads the window and the question only
    limit = _model_positions(model)
    if limit is not None and longest > limit[0]:
        raise _UsageError(f"{option}: {longest} tokens exceed the model's {limit[0]} positions ({limit[1]})")


def _device(args):
    import torch

    if args.device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise _UsageError(f"--device: not a torch device: {args.device!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise _UsageError("--device cuda: no CUDA device is available here")
    return args.device


def _run_text(args) -> Path:
    from .haystack import Haystack
    from .hf import HFResponder, load_model
    from .runs import run_needle, run_passkey, run_retention

    haystack = None
    if getattr(args, "haystack", None) is not None:
        haystack = Haystack.from_file(args.haystack)
    name = f"needle-{args.variant}" if args.probe == "needle" else args.probe
    out = args.out / name
    if args.probe == "retention":
        _check_lengths("--distances", args.distances, args.model, args.memory, dict(args.memory_option), args.window)
    else:
        _check_lengths("--lengths", args.lengths, args.model, args.memory, dict(args.memory_option), args.window)
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=_device(args))
    memory_config = _memory_setup(model, args)
    default_tokens = {"needle": 128, "passkey": 16, "retention": 32}[args.probe]
    responder = HFResponder(model, tokenizer, max_new_tokens=args.max_new_tokens or default_tokens,
                            memory=args.memory != "none", chunk_size=args.chunk_size, window=args.window,
                            name=args.model, memory_config=memory_config)
    common = dict(seed=args.seed, samples=args.samples, save_prompts=args.save_prompts,
                  overwrite=args.overwrite, progress=not args.no_progress)
    if args.probe == "needle":
        run_needle(responder, tokenizer, out, lengths=args.lengths, depths=args.depths, spacing=args.depth_spacing,
                   variant=args.variant, haystack=haystack, **common)
    elif args.probe == "passkey":
        run_passkey(responder, tokenizer, out, lengths=args.lengths, depths=args.depths, spacing=args.depth_spacing, **common)
    else:
        run_retention(responder, tokenizer, out, distances=args.distances, loads=args.loads, haystack=haystack, **common)
    return out


def _load_factory(spec: str, option: str = "--module"):
    """``package.module:NAME`` or ``path/to/file.py:NAME`` -> the callable NAME."""
    mod_name, _, attr = spec.rpartition(":")
    if not mod_name or not attr:
        raise _UsageError(f"{option} must look like package.module:Factory or file.py:Factory, got {spec!r}")
    try:
        if mod_name.endswith(".py"):
            path = Path(mod_name).expanduser()
            if not path.is_file():
                raise _UsageError(f"{option}: no such file: {mod_name!r}")
            module_spec = importlib.util.spec_from_file_location(f"memlayers_probe_{path.stem}", path)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(mod_name)
        factory = getattr(module, attr)
    except (ImportError, AttributeError) as e:
        raise _UsageError(f"{option}: cannot import {spec!r}: {e}") from None
    if not callable(factory):
        raise _UsageError(f"{option}: {spec!r} is not callable")
    return factory


# The in-context retention options, with their defaults: with --inject none of them applies.
_CONTEXT_ONLY = {"--distances": ("distances", [0, 256, 1024]), "--loads": ("loads", [0, 4, 16]),
                 "--haystack": ("haystack", None), "--samples": ("samples", 1),
                 "--max-new-tokens": ("max_new_tokens", None), "--save-prompts": ("save_prompts", False),
                 "--memory": ("memory", "none"), "--memory-option": ("memory_option", []),
                 "--chunk-size": ("chunk_size", 512), "--window": ("window", None), "--dtype": ("dtype", "auto"),
                 "--device": ("device", None)}


def _check_retention_mode(args) -> None:
    """Exactly one of ``--model`` / ``--inject``; the other mode's options refused by name."""
    if args.inject is None:
        if args.model is None:
            raise _UsageError("give --model (facts in the context) or --inject (facts written into the weights)")
        for option in ("--inject-option", "--batches"):
            if getattr(args, option[2:].replace("-", "_")) not in (None, []):
                raise _UsageError(f"{option} applies to --inject, not to --model")
        return
    if args.model is not None:
        raise _UsageError("--model and --inject exclude each other: --inject's factory builds its own model "
                          "(give it one with --inject-option model=...)")
    if args.batches is None:
        raise _UsageError("--inject needs --batches N (the fact batches to write one after another)")
    for option, (attr, default) in _CONTEXT_ONLY.items():
        if getattr(args, attr) != default:
            raise _UsageError(f"{option} applies to --model (facts in the context), not to --inject")


def _run_parametric(args) -> Path:
    """``--inject``: the factory's injections through ``run_parametric_retention``, resumable."""
    from .runs import run_parametric_retention

    factory = _load_factory(args.inject, "--inject")
    options = dict(args.inject_option)
    if "seed" in options:
        raise _UsageError("--inject-option seed=...: give --seed instead")
    out = args.out / "parametric-retention"
    inject = factory(seed=args.seed, **options)
    if not callable(inject):
        raise _UsageError(f"--inject: {args.inject}(...) returned {type(inject).__name__}, not a callable "
                          "batch -> scorer")
    run_parametric_retention(inject, out, batches=args.batches, name=args.inject,
                             config={"inject_options": options, "seed": args.seed},
                             overwrite=args.overwrite, progress=not args.no_progress)
    return out


def _run_mqar(args) -> Path:
    import torch

    from .mqar import MQARModel, train_mqar
    from .runs import run_mqar

    out = args.out / "mqar"
    device = _device(args)
    common = dict(lengths=args.lengths, kv_pairs=args.kv_pairs, examples=args.examples, power_a=args.power_a,
                  seed=args.seed, batch_size=args.batch_size, overwrite=args.overwrite, progress=not args.no_progress)
    if args.model is not None:
        from .hf import load_model

        # MQAR feeds whole sequences to the model, with or without memory: its positions bound them
        _check_lengths("--lengths", args.lengths, args.model, "none", {})
        model, _ = load_model(args.model, dtype=args.dtype, device=device, tokenizer=False)
        memory_config = _memory_setup(model, args)
        model_vocab = model.get_output_embeddings().weight.shape[0]
        vocab = args.vocab_size or min(8192, model_vocab)
        if vocab > model_vocab:
            raise _UsageError(f"--vocab-size {vocab} exceeds the model's vocabulary ({model_vocab})")
        reset = None
        if args.memory != "none":
            from ..hf import reset_memory

            def reset():
                reset_memory(model)

        run_mqar(model, out, vocab_size=vocab, name=args.model, config={"memory": memory_config},
                 reset=reset, **common)
        return out

    if args.memory != "none":
        raise _UsageError("--memory applies to --model; a --module is the memory itself")
    factory = _load_factory(args.module)
    vocab = args.vocab_size or 8192
    config = {"module": args.module, "dim": args.dim, "train_steps": args.train_steps}
    if args.train_steps:
        config.update(layers=args.layers, lr=args.lr)

        def build(cell):
            torch.manual_seed(args.seed)
            model = MQARModel([factory(args.dim) for _ in range(args.layers)], vocab, args.dim).to(device)
            train_mqar(model, vocab_size=vocab, seq_len=cell["seq_len"], num_kv_pairs=cell["num_kv_pairs"],
                       steps=args.train_steps, lr=args.lr, power_a=args.power_a, seed=args.seed + 1000)
            return model

        run_mqar(build, out, vocab_size=vocab, name=args.module, config=config, **common)
    else:
        torch.manual_seed(args.seed)
        module = factory(args.dim)
        if not isinstance(module, torch.nn.Module):
            raise _UsageError(f"--module: {args.module}({args.dim}) returned {type(module).__name__}, not an nn.Module")
        module = module.to(device)
        g = torch.Generator().manual_seed(args.seed)
        table = torch.nn.functional.normalize(torch.randn(vocab, args.dim, generator=g), dim=-1).to(device)
        run_mqar(module, out, vocab_size=vocab, embedding=table, name=args.module, config=config, **common)
    return out


def run_probe(args: argparse.Namespace) -> int:
    """Run the probe that ``args`` (parsed by a parser set up with ``add_probe_parser``) names.

    Returns 0 on success, 2 on bad input (message on stderr), 130 when interrupted (finished cells
    are kept; the same command resumes)."""
    from .hf import MemoryUnavailableError, ModelLoadError

    prog = f"memlayers probe {getattr(args, 'probe', '')}".strip()
    if getattr(args, "probe", None) not in PROBES:
        print(f"{prog}: error: choose a probe: {', '.join(PROBES)}", file=sys.stderr)
        return 2
    try:
        _check_out(args.out)
        if args.probe == "retention":
            _check_retention_mode(args)
        parametric = args.probe == "retention" and args.inject is not None
        if args.memory == "none" and args.memory_option:
            raise _UsageError("--memory-option needs --memory knn or titans")
        if not plots_available():
            print(f"{prog}: note: matplotlib is not installed, so the run writes its records and summary.md "
                  f"but no plots ({PLOTS_INSTALL})", file=sys.stderr)
        if parametric:
            out = _run_parametric(args)
        else:
            out = _run_mqar(args) if args.probe == "mqar" else _run_text(args)
    except (_UsageError, ModelLoadError, MemoryUnavailableError, ValueError, TypeError, OSError) as e:
        # bad input or an unwritable file, reported in one line; MEMLAYERS_DEBUG=1 shows the traceback
        if os.environ.get("MEMLAYERS_DEBUG"):
            raise
        if isinstance(e, OSError) and e.filename is not None:
            e = f"{str(e.filename)!r}: {e.strerror or e}"
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted; finished cells are saved, run the same command again to resume", file=sys.stderr)
        return 130
    files = sorted(p.name for p in out.iterdir() if p.is_file())
    print(f"{prog}: results in {out}/ ({', '.join(files)})")
    return 0
