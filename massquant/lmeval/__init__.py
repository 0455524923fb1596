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

from massquant.lmeval.data import TASK_DIRECTORY
from massquant.lmeval.model import MassquantLM, weights_left_as_they_are


def task_manager(include_path: str | list[str] | None = None):
    """lm-eval's TaskManager with massquant's offline tasks (``massquant_*``) next to lm-eval's own."""
    from lm_eval.tasks import TaskManager

    extra = [include_path] if isinstance(include_path, str) else list(include_path or [])
    return TaskManager(include_path=[str(TASK_DIRECTORY), *extra])


__all__ = ["MassquantLM", "TASK_DIRECTORY", "task_manager", "weights_left_as_they_are"]
