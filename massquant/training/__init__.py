"""Training-time mitigations: model surgery plus a short fine-tune (or a small from-scratch run).

- ``recipe``: the YAML recipe as dataclasses (``load_recipe``);
- ``surgery``: choose mitigations (registry syntax), apply and record them in the config;
- ``loop``: the plain PyTorch training loop (AdamW, warm-up + cosine/linear, clipping, bf16 autocast);
- ``checkpoint``: Hugging Face directories that rebuild the new modules on load;
- ``runner``: one ``massquant train`` run (evaluate before, train, save, reload, evaluate after).

Submodules are imported where used: ``load_model`` reaches ``checkpoint`` for every
directory it opens, and should not pay for the evaluation stack.
"""
