"""What subcommands share: the declared options as flags, one-line argparse errors, where results go."""

from __future__ import annotations

import argparse
import random
import sys

import torch

from massquant.config import MAX_SIZE
from massquant.data.calibration import calibration_batch
from massquant.errors import UserError
from massquant.models.loading import max_sequence_length
from massquant.reporting.results import ensure_writable_dir, to_json, write_json_atomic
from massquant.reporting.tables import TABLE_FORMATS
from massquant.variants import Variant


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad flag as one line (UserError) instead of usage plus exit."""

    def error(self, message):
        raise UserError(f"{message} (see '{self.prog} --help')")


def positive_int(text: str) -> int:
    """argparse type of command-specific counts (declared options carry their own ranges)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if not 1 <= value <= MAX_SIZE:
        raise argparse.ArgumentTypeError(f"expected a positive integer (at most {MAX_SIZE}), got {value}")
    return value


def sampled_sequences(args, loaded, count: int, bos: bool = True) -> torch.Tensor:
    """``count`` random sequences of ``--seq-len`` tokens of ``--data``, refused when longer than the model allows."""
    longest = max_sequence_length(loaded.model)
    if longest is not None and args.seq_len > longest:
        raise UserError(f"--seq-len {args.seq_len} is longer than the model's maximum of {longest} tokens")
    return calibration_batch(loaded.tokenizer, args.data, count, args.seq_len, args.seed, bos=bos)


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("output")
    group.add_argument("--out", metavar="DIR", help="write results.json (and plots, where any) into DIR")
    group.add_argument("--json", action="store_true", help="print the results JSON to stdout instead of the table")
    group.add_argument("--table-format", default="github", choices=TABLE_FORMATS, help="tabulate format of printed tables (default: github)")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


class ResultSink:
    """Where a command's JSON goes: checked before work starts, rewritten atomically as results arrive.

    A write that fails mid-run (a full disk) does not stop the computation: the results are still printed
    at the end, then the command fails with the write error, so nothing computed is lost."""

    def __init__(self, args, filename: str = "results.json"):
        self.directory = ensure_writable_dir(args.out) if args.out else None
        self.filename = filename
        self.print_json = args.json
        self.write_error: UserError | None = None

    def save(self, payload: dict) -> None:
        if self.directory:
            try:
                write_json_atomic(self.directory / self.filename, payload)
            except UserError as error:
                self.write_error = error
            else:
                self.write_error = None

    def finish(self, payload: dict, table: str) -> None:
        self.save(payload)
        if self.print_json:
            print(to_json(payload))
        else:
            print(table)
            if self.directory and self.write_error is None:
                print(f"\nresults: {self.directory / self.filename}", file=sys.stderr)
        if self.write_error is not None:
            raise UserError(f"{self.write_error} (the results are printed above)")


def needs_calibration(variants_to_run: list[Variant]) -> bool:
    return any(variant.needs_calibration for variant in variants_to_run)
