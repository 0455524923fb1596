"""The massquant command: one module per subcommand, listed here."""

from __future__ import annotations

import sys

from massquant.cli import common, errors as errors_command, eval as eval_command
from massquant.cli import compare as compare_command, run as run_command
from massquant.cli import lm_eval as lm_eval_command
from massquant.cli import mitigations as mitigations_command
from massquant.cli import train as train_command
from massquant.cli import across as across_command
from massquant.cli import intervene as intervene_command
from massquant.cli import locate as locate_command
from massquant.cli import report as report_command
from massquant.cli import analyze as analyze_command
from massquant.errors import UserError
from massquant.reporting.results import record_command_line

COMMANDS = [eval_command, errors_command, run_command, compare_command, lm_eval_command, mitigations_command, train_command, intervene_command, locate_command, across_command, analyze_command, report_command]


def build_parser() -> common.ArgumentParser:
    parser = common.ArgumentParser(
        prog="massquant",
        description="What does low precision do to a Hugging Face causal LM, and do its massive activations decide the answer?",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=common.ArgumentParser)
    for command in COMMANDS:
        sub = subparsers.add_parser(command.NAME, help=command.HELP, description=command.HELP, **getattr(command, "PARSER_OPTIONS", {}))
        command.add_arguments(sub)
        sub.set_defaults(run=command.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    record_command_line(sys.argv[1:] if argv is None else list(argv))
    try:
        args = parser.parse_args(argv)
        if not getattr(args, "run", None):
            parser.print_help()
            return 2
        return args.run(args)
    except UserError as error:
        print(f"massquant: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("massquant: interrupted; finished results were saved", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
