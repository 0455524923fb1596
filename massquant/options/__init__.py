"""Options: every setting declared once (``declarations.py``), the surfaces generated from it
(``registry.py``: argparse flags, recipe keys, lm-eval model_args) and the objects built from its
values (``settings.py``)."""

from massquant.options import declarations  # noqa: F401  (registers every group)
from massquant.options.registry import GROUPS, OPTIONS, Option, add_arguments, declare, extend, from_mapping, keys

__all__ = ["GROUPS", "OPTIONS", "Option", "add_arguments", "declare", "extend", "from_mapping", "keys"]
