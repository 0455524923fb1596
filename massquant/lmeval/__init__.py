"""lm-evaluation-harness integration: the ``massquant`` model type and offline tasks.

lm-eval 0.4.13 finds models only in its own registry, filled by imports (it
reads no package entry points), so importing this package is what registers
``--model massquant``::

    import lm_eval
    import massquant.lmeval  # registers the model type

    results = lm_eval.simple_evaluate(
        model="massquant", model_args="pretrained=smollm2-135m,spec=w8a8",
        tasks=["massquant_arc_easy"], task_manager=massquant.lmeval.task_manager(), limit=20,
    )

On the command line, ``massquant lm-eval ARGS`` is lm-eval's own CLI with this
package imported first and massquant's task directory on the include path.
"""

from __future__ import annotations

from massquant.lmeval.data import TASK_DIRECTORY, task_manager
from massquant.lmeval.hflm import weights_left_as_they_are
from massquant.lmeval.model import MassquantLM

__all__ = ["MassquantLM", "TASK_DIRECTORY", "task_manager", "weights_left_as_they_are"]
