"""massquant: what low precision does to a Hugging Face causal LM, and whether its massive activations decide it.

Python API (notebooks)::

    import massquant as mq
    loaded = mq.load_model("smollm2-135m")
    windows = mq.build_windows(loaded.tokenizer, mq.load_text("enwiki-sample"),
                               mq.PerplexityConfig(seq_len=512, max_tokens=4096), 8192)
    with mq.quantize_(loaded.model, "w8a8") as handle:   # or a QuantSpec
        print(mq.perplexity(loaded.model, windows).ppl)
    # leaving the block (or handle.undo()) restores the model exactly
"""

import logging

# Import-time notices from optional kernels (torchao's CUDA-only libraries) say nothing
# about the user's run; keep the terminal for progress, tables and errors.
for _noisy in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_noisy).setLevel(logging.ERROR)

from massquant.data.text import load_text  # noqa: E402  (after the logging set-up)
from massquant.errors import UserError
from massquant.evaluation.perplexity import PerplexityConfig, build_windows, perplexity
from massquant.models.loading import ModelConfig, load_model
from massquant.quantizers.spec import QuantSpec, TensorQuantSpec, parse_spec
from massquant.wrapping.quantize import QuantizationHandle, quantize_
import massquant.training.checkpoint  # noqa: F401,E402  (registers the reader that rebuilds trained checkpoints)

__all__ = [
    "ModelConfig",
    "PerplexityConfig",
    "QuantSpec",
    "QuantizationHandle",
    "TensorQuantSpec",
    "UserError",
    "build_windows",
    "load_model",
    "load_text",
    "parse_spec",
    "perplexity",
    "quantize_",
]
