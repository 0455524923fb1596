"""massquant lm-eval: lm-eval's own command line, with ``--model massquant`` and massquant's offline tasks.

lm-eval 0.4.13 reads no plugin entry points: a model type exists only once the
module registering it has been imported. This command imports it, puts
massquant's task directory on lm-eval's include path (next to any
``--include_path`` given), and runs lm-eval's CLI on exactly the arguments
that follow, so every lm-eval flag and subcommand (run, ls, validate) works:

    massquant lm-eval --model massquant --model_args pretrained=smollm2-135m,spec=w8a8 \\
        --tasks massquant_arc_easy --limit 20
"""

from __future__ import annotations

import argparse
import sys

NAME = "lm-eval"
HELP = "lm-eval's command line (same arguments) with --model massquant and the massquant_* offline tasks"
# Every argument belongs to lm-eval, '--help' included: this parser recognizes no option of its own.
PARSER_OPTIONS = {"prefix_chars": "+", "add_help": False}


def add_arguments(parser) -> None:
    parser.add_argument("lm_eval_arguments", nargs=argparse.REMAINDER, help="lm-eval's arguments, e.g. --model massquant --model_args ... --tasks ...")


def run(args) -> int:
    return forward(list(args.lm_eval_arguments))


def forward(arguments: list[str]) -> int:
    """Run lm-eval's CLI on ``arguments`` (what follows ``lm_eval`` on its command line); its exit status."""
    from lm_eval._cli import HarnessCLI
    from lm_eval.utils import setup_logging

    import massquant.lmeval  # registers --model massquant
    from massquant.lmeval.model import check_model_args

    saved = sys.argv
    sys.argv = ["lm-eval", *arguments]  # lm-eval's parser reads sys.argv (it inserts 'run' for the legacy form)
    try:
        setup_logging()
        cli = HarnessCLI()
        namespace = cli.parse_args()
        if getattr(namespace, "model", None) == "massquant":  # fail before lm-eval indexes its tasks (slow)
            check_model_args(namespace.model_args or {})
        if hasattr(namespace, "include_path"):  # run, ls and validate build their TaskManager from it
            namespace.include_path = [str(massquant.lmeval.TASK_DIRECTORY), *([namespace.include_path] if namespace.include_path else [])]
        cli.execute(namespace)
    except SystemExit as exit_request:  # lm-eval's argparse exits on --help and on bad arguments
        code = exit_request.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    finally:
        sys.argv = saved
    return 0
