"""Flags shared by subcommands, mapped onto the config dataclasses in one place."""

from __future__ import annotations

import argparse
import random
import sys

import torch

from massquant.data.text import DEFAULT_TEXT, TEXT_SOURCES
from massquant.errors import UserError
from massquant.evaluation.perplexity import BOS_POLICIES, PerplexityConfig
from massquant.models.loading import ATTENTION_IMPLEMENTATIONS, DEFAULT_MODEL, DEVICES, DTYPES, MODEL_ALIASES, ModelConfig
from massquant.reporting.results import ensure_writable_dir, to_json, write_json_atomic
from massquant.reporting.tables import TABLE_FORMATS


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad flag as one line (UserError) instead of usage plus exit."""

    def error(self, message):
        raise UserError(f"{message} (see '{self.prog} --help')")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"alias ({', '.join(MODEL_ALIASES)}), a .gguf file, a model directory or a hub id (default: {DEFAULT_MODEL})",
    )
    group.add_argument("--dtype", default="float32", choices=list(DTYPES), help="weight and compute dtype (default: float32)")
    group.add_argument("--device", default="cpu", choices=list(DEVICES), help="cpu, cuda, or auto (device_map='auto') (default: cpu)")
    group.add_argument("--trust-remote-code", action="store_true", help="allow model code from the hub (off unless asked)")
    group.add_argument(
        "--attn", dest="attn_implementation", default="sdpa", choices=list(ATTENTION_IMPLEMENTATIONS),
        help="attention implementation (default: sdpa)",
    )


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("text and windows")
    group.add_argument(
        "--data", default=DEFAULT_TEXT,
        help=f"a corpus ({', '.join(TEXT_SOURCES)}) or a path to a UTF-8 text file (default: {DEFAULT_TEXT})",
    )
    group.add_argument("--seq-len", type=positive_int, help="tokens per window (default: 2048 or the model's maximum, whichever is smaller)")
    group.add_argument("--stride", type=positive_int, help="sliding-window stride; each window scores only its new tokens (default: non-overlapping windows)")
    group.add_argument("--max-tokens", type=positive_int, help="use only the first N tokens of the text")
    group.add_argument("--bos", default="auto", choices=BOS_POLICIES, help="prepend BOS to each window: auto (when the tokenizer has one), always, never (default: auto)")
    group.add_argument("--batch-size", type=positive_int, default=1, help="windows per forward pass (default: 1)")


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("output")
    group.add_argument("--out", metavar="DIR", help="write results.json (and plots, where any) into DIR")
    group.add_argument("--json", action="store_true", help="print the results JSON to stdout instead of the table")
    group.add_argument("--table-format", default="github", choices=TABLE_FORMATS, help="tabulate format of printed tables (default: github)")
    group.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")


def model_config(args) -> ModelConfig:
    return ModelConfig(
        model=args.model, dtype=args.dtype, device=args.device,
        trust_remote_code=args.trust_remote_code, attn_implementation=args.attn_implementation,
    )


def perplexity_config(args) -> PerplexityConfig:
    return PerplexityConfig(
        data=args.data, seq_len=args.seq_len, stride=args.stride,
        max_tokens=args.max_tokens, bos=args.bos, batch_size=args.batch_size,
    )


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


class ResultSink:
    """Where a command's JSON goes: checked before work starts, rewritten atomically as results arrive."""

    def __init__(self, args, filename: str = "results.json"):
        self.directory = ensure_writable_dir(args.out) if args.out else None
        self.filename = filename
        self.print_json = args.json

    def save(self, payload: dict) -> None:
        if self.directory:
            write_json_atomic(self.directory / self.filename, payload)

    def finish(self, payload: dict, table: str) -> None:
        self.save(payload)
        if self.print_json:
            print(to_json(payload))
        else:
            print(table)
            if self.directory:
                print(f"\nresults: {self.directory / self.filename}", file=sys.stderr)
