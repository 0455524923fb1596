"""Flags shared by subcommands, mapped onto the config dataclasses in one place."""

from __future__ import annotations

import argparse
import random
import sys

import torch

from massquant.backends import BACKENDS
from massquant.massive import DEFAULT_TARGET, DETECTION_MODES, MASSIVE_POLICIES, TARGETS, MassiveCriteria, MassivePolicy
from massquant.recipes import grid
from massquant.variants import Variant
from massquant.data.calibration import DEFAULT_CALIBRATION_TEXT, calibration_batch
from massquant.data.text import DEFAULT_TEXT, TEXT_SOURCES
from massquant.config import MAX_SEED, MAX_SEQUENCES, MAX_SIZE
from massquant.errors import UserError
from massquant.evaluation.perplexity import BOS_POLICIES, PerplexityConfig
from massquant.quantizers.formats import FORMATS
from massquant.quantizers.spec import ACTIVATION_GRANULARITIES, KV_GRANULARITIES, QuantSpec, spec_text_from_flags, with_granularity
from massquant.models.loading import ATTENTION_IMPLEMENTATIONS, DEFAULT_MODEL, DEVICES, DTYPES, MODEL_ALIASES, ModelConfig, max_sequence_length
from massquant.reporting.results import ensure_writable_dir, to_json, write_json_atomic
from massquant.reporting.tables import TABLE_FORMATS


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad flag as one line (UserError) instead of usage plus exit."""

    def error(self, message):
        raise UserError(f"{message} (see '{self.prog} --help')")


def _bounded_int(text: str, low: int, high: int, kind: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {kind}, got {text!r}") from None
    if not low <= value <= high:
        raise argparse.ArgumentTypeError(f"expected {kind} (at most {high}), got {value}")
    return value


def positive_int(text: str) -> int:
    return _bounded_int(text, 1, MAX_SIZE, "a positive integer")


def sequence_count(text: str) -> int:
    """A number of sequences held in memory at once (calibration, sampled sequences)."""
    return _bounded_int(text, 1, MAX_SEQUENCES, "a positive integer")


def seed_int(text: str) -> int:
    return _bounded_int(text, 0, MAX_SEED, "a seed from 0")


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text}")
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


def add_text_argument(group) -> None:
    group.add_argument(
        "--data", default=DEFAULT_TEXT,
        help=f"a corpus ({', '.join(TEXT_SOURCES)}) or a path to a UTF-8 text file (default: {DEFAULT_TEXT})",
    )


def add_sampled_sequence_arguments(parser: argparse.ArgumentParser, title: str, count_flag: str, count: int):
    """--data, the count flag and --seq-len of commands that run random sequences of a text (locate, errors)."""
    group = parser.add_argument_group(title)
    add_text_argument(group)
    group.add_argument(count_flag, type=sequence_count, default=count, help=f"random sequences of the text (default: {count})")
    group.add_argument("--seq-len", type=positive_int, default=512, help="tokens per sequence (default: 512)")
    return group


def sampled_sequences(args, loaded, count: int, bos: bool = True) -> torch.Tensor:
    """``count`` random sequences of ``--seq-len`` tokens of ``--data``, refused when longer than the model allows."""
    longest = max_sequence_length(loaded.model)
    if longest is not None and args.seq_len > longest:
        raise UserError(f"--seq-len {args.seq_len} is longer than the model's maximum of {longest} tokens")
    return calibration_batch(loaded.tokenizer, args.data, count, args.seq_len, args.seed, bos=bos)


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("text and windows")
    add_text_argument(group)
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
    group.add_argument("--seed", type=seed_int, default=0, help="random seed (default: 0)")


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


def add_quantization_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "quantization",
        "A spec names what is quantized: w<fmt>[g<N>] a<fmt> kv<fmt> with -modifiers, fmt = 2..8 (int), fp8, "
        "fp8e5m2, mxfp4, nvfp4 (nf4/fp4 with --backend bnb). Examples: w4g128, w8a8, w4a8-token, w8a8kv8, "
        "wfp8afp8, wmxfp4amxfp4, w8a8-tensor, a8-static-p99.9, w4g64-asym-mse.",
    )
    group.add_argument("--spec", action="append", default=[], metavar="SPEC", help="a spec; repeat or comma-separate to compare several in one run")
    group.add_argument("--bits", type=int, help="weight bits (alone: weight-only quantization)")
    group.add_argument("--format", default="int", metavar="FMT", help=f"number format of weights and activations: int, {', '.join(f for f in FORMATS if f != 'int')}, nf4, fp4 (default: int)")
    group.add_argument("--group-size", type=positive_int, help="weight group size (default: 128 at 4 bits and below, else per channel)")
    group.add_argument("--act-bits", type=int, help="activation bits (inputs of every decoder linear)")
    group.add_argument("--act-granularity", choices=ACTIVATION_GRANULARITIES, help="activation scales per token (default) or per tensor; also applies to the --spec specs")
    group.add_argument("--kv-bits", type=int, help="KV-cache bits (keys after RoPE, and values)")
    group.add_argument("--kv-granularity", choices=KV_GRANULARITIES, help="KV scales per head and token (default), token, group or tensor; also applies to the --spec specs")
    symmetry = group.add_mutually_exclusive_group()
    symmetry.add_argument("--sym", dest="symmetric", action="store_true", default=True, help="symmetric integer quantization (default)")
    symmetry.add_argument("--asym", dest="symmetric", action="store_false", help="asymmetric integer quantization (zero point)")
    group.add_argument("--backend", action="append", default=[], metavar="NAME", help=f"{', '.join(BACKENDS)} (default: fake); repeat to compare backends")
    group.add_argument("--include", action="append", default=[], metavar="REGEX", help="quantize only linears whose name matches")
    group.add_argument("--exclude", action="append", default=[], metavar="REGEX", help="keep linears whose name matches in full precision")
    group.add_argument("--quantize-lm-head", action="store_true", help="also quantize the output projection (kept in full precision by default)")
    group.add_argument("--bnb-threshold", type=non_negative_float, default=6.0, help="LLM.int8 outlier threshold for --backend bnb (default: 6.0)")
    group.add_argument("--calib-data", default=DEFAULT_CALIBRATION_TEXT, help=f"text for static ranges and GPTQ (default: {DEFAULT_CALIBRATION_TEXT})")
    group.add_argument("--calib-samples", type=sequence_count, default=16, help="calibration sequences (default: 16)")
    group.add_argument("--calib-seq-len", type=positive_int, default=512, help="tokens per calibration sequence (default: 512)")


def quant_specs(args) -> list[QuantSpec]:
    """Every spec named by --spec and by the explicit flags, for every --backend."""
    settings = dict(
        include=tuple(args.include), exclude=tuple(args.exclude),
        quantize_lm_head=args.quantize_lm_head, bnb_threshold=args.bnb_threshold,
        calibration_samples=args.calib_samples,
    )
    texts = [text for option in args.spec for text in option.split(",") if text.strip()]
    from_flags = spec_text_from_flags(
        args.bits, args.format, args.group_size, args.symmetric, args.act_bits,
        args.act_granularity, args.kv_bits, args.kv_granularity,
    )
    if from_flags:
        texts.append(from_flags)
    specs = grid.parse_specs(texts, args.backend or ["fake"], **settings)
    # The granularity flags also apply to the --spec specs: `--spec w8a8 --act-granularity tensor` is w8a8-tensor.
    for target, granularity, flag, example in (
        ("a", args.act_granularity, "--act-granularity", "--spec w8a8 or --act-bits 8"),
        ("kv", args.kv_granularity, "--kv-granularity", "--spec w8kv8 or --kv-bits 8"),
    ):
        if granularity is None:
            continue
        if not any(spec.part(target) for spec in specs):
            raise UserError(f"{flag} {granularity} needs a spec that quantizes that tensor ({example})")
        specs = [with_granularity(spec, target, granularity) for spec in specs]
    return specs


def add_variant_arguments(parser: argparse.ArgumentParser) -> None:
    """Massive-activation handling and mitigations; with the specs they span the evaluated grid."""
    group = parser.add_argument_group("massive activations and mitigations")
    group.add_argument(
        "--massive", action="append", default=[], metavar="POLICY",
        help=f"what quantization does with massive activations: {', '.join(MASSIVE_POLICIES)}; comma-separate to compare (default: none)",
    )
    group.add_argument("--massive-detection", default="calibrated", choices=DETECTION_MODES, help="find massive sites once on calibration data, or per forward (default: calibrated)")
    group.add_argument("--massive-threshold", type=float, default=MassiveCriteria.abs_threshold, help="a massive value exceeds this magnitude (default: 100)")
    group.add_argument("--massive-ratio", type=float, default=MassiveCriteria.median_ratio, help="... and this multiple of its tensor's median magnitude (default: 1000)")
    add_massive_target_argument(group)
    group.add_argument(
        "--mitigation", action="append", default=[], metavar="NAME[:k=v,...]",
        help="post-hoc mitigation(s) to compare, e.g. hadamard,smoothquant:alpha=0.8 ('massquant mitigations' lists them)",
    )


def add_massive_target_argument(group) -> None:
    group.add_argument(
        "--massive-target", action="append", default=[], metavar="TARGET",
        help=f"which massive activations the policy acts on: {', '.join(TARGETS)} (first-layer: the first layer with any, "
        "every channel massive there; dominant: the phenomenon with the largest value, at its first layer; all: every "
        f"phenomenon at its own first layer); comma-separate to compare (default: {DEFAULT_TARGET})",
    )


def massive_targets(args) -> list[str]:
    return [target.strip() for option in args.massive_target for target in option.split(",") if target.strip()]


def massive_policies(args) -> list[MassivePolicy]:
    criteria = MassiveCriteria(args.massive_threshold, args.massive_ratio)
    modes = [mode.strip() for option in args.massive for mode in option.split(",") if mode.strip()]
    return grid.massive_policies(modes, args.massive_detection, criteria, massive_targets(args))


def variants(args, specs: list[QuantSpec]) -> list[Variant]:
    """The baseline first, then every mitigation x massive policy x spec (the grid recipes expand too)."""
    return grid.variant_grid(specs, massive_policies(args), grid.mitigation_variants(args.mitigation))


def needs_calibration(variants_to_run: list[Variant]) -> bool:
    return any(variant.needs_calibration for variant in variants_to_run)
