"""Every option massquant accepts, declared once, grouped by concern.

Each group feeds ``massquant`` flags (``--calib-samples``), recipe keys
(``calib_samples: 8``) and lm-eval ``model_args`` (``calib_samples=8``).
Adding an option is one entry here plus the code that reads it
(``settings.py`` turns values into loading, text, spec, policy and task
objects). The defaults below are the defaults of every surface.
"""

from __future__ import annotations

from massquant.backends import BACKENDS
from massquant.config import MAX_SEED, MAX_SEQUENCES, MAX_SIZE
from massquant.data.calibration import DEFAULT_CALIBRATION_TEXT
from massquant.data.text import BOS_POLICIES, DEFAULT_TEXT, TEXT_SOURCES
from massquant.massive import CRITERIA, DEFAULT_TARGET, DETECTION_MODES, MASSIVE_POLICIES, TARGETS, MassiveCriteria
from massquant.models.loading import ATTENTION_IMPLEMENTATIONS, DEFAULT_MODEL, DEVICES, DTYPES, MODEL_ALIASES
from massquant.options.registry import Option, declare
from massquant.quantizers.formats import FORMATS
from massquant.quantizers.spec import ACTIVATION_GRANULARITIES, KV_GRANULARITIES

COUNT = dict(low=1, high=MAX_SIZE)  # tokens, windows, batch sizes
SEQUENCES = dict(low=1, high=MAX_SEQUENCES)  # sequences held in memory at once

MODEL = declare(
    "model", "model",
    Option("model", str, DEFAULT_MODEL, f"alias ({', '.join(MODEL_ALIASES)}), a .gguf file, a model directory or a hub id", axis=True),
    Option("dtype", str, "float32", "weight and compute dtype", choices=tuple(DTYPES)),
    Option("device", str, "cpu", "cpu, cuda, or auto (accelerate device_map='auto')", choices=tuple(DEVICES)),
    Option("trust_remote_code", bool, False, "allow model code from the hub (off unless asked)"),
    Option("attn_implementation", str, "sdpa", "attention implementation", choices=tuple(ATTENTION_IMPLEMENTATIONS)),
)

TEXT = declare(
    "text", "text and windows",
    Option("data", str, DEFAULT_TEXT, f"a corpus ({', '.join(TEXT_SOURCES)}) or a path to a UTF-8 text file", axis=True),
    Option("seq_len", int, None, "tokens per window or sequence (default: 2048 or the model's maximum, whichever is smaller)", axis=True, **COUNT),
    Option("stride", int, None, "sliding-window stride; each window scores only its new tokens (default: non-overlapping windows)", **COUNT),
    Option("max_tokens", int, None, "use only the first N tokens of the text", **COUNT),
    Option("bos", str, "auto", "prepend BOS to each window or sequence: auto (when the tokenizer has one), always, never", choices=BOS_POLICIES),
    Option("batch_size", int, 1, "windows per forward pass", **COUNT),
    Option("n_seqs", int, 8, "random sequences of the text (locate, errors)", **SEQUENCES),
)

QUANTIZATION = declare(
    "quantization", "quantization",
    Option("spec", str, [], "a spec; repeat or comma-separate to compare several in one run", many=True, metavar="SPEC"),
    Option("bits", int, None, "weight bits (alone: weight-only quantization)", low=1, high=16),
    Option("format", str, "int", f"number format of weights and activations: int, {', '.join(f for f in FORMATS if f != 'int')}", metavar="FMT"),
    Option("group_size", int, None, "weight group size (default: 128 at 4 bits and below, else per channel)", **COUNT),
    Option("act_bits", int, None, "activation bits (inputs of every decoder linear)", low=1, high=16),
    Option("act_granularity", str, None, "activation scales per token (default) or per tensor; also applies to the --spec specs", choices=ACTIVATION_GRANULARITIES),
    Option("kv_bits", int, None, "KV-cache bits (keys after RoPE, and values)", low=1, high=16),
    Option("kv_granularity", str, None, "KV scales per head and token (default), token, group or tensor; also applies to the --spec specs", choices=KV_GRANULARITIES),
    Option("asym", bool, False, "asymmetric integer quantization (a zero point) for the flag-built spec"),
    Option("backend", str, ["fake"], f"quantization backend ({', '.join(BACKENDS)}); several compare backends", many=True, choices=lambda: tuple(BACKENDS), metavar="NAME"),
    Option("include", str, [], "quantize only linears whose name matches one of these regexes", many=True, metavar="REGEX"),
    Option("exclude", str, [], "keep linears whose name matches in full precision", many=True, metavar="REGEX"),
    Option("quantize_lm_head", bool, False, "also quantize the output projection (kept in full precision by default)"),
    Option("bnb_threshold", float, 6.0, "LLM.int8 outlier threshold of --backend bnb", low=0),
    description="A spec names what is quantized: w<fmt>[g<N>] a<fmt> kv<fmt> with -modifiers, fmt = 2..8 (int), fp8, "
    "fp8e5m2, mxfp4, nvfp4 (nf4/fp4 with --backend bnb). Examples: w4g128, w8a8, w4a8-token, w8a8kv8, "
    "wfp8afp8, wmxfp4amxfp4, w8a8-tensor, a8-static-p99.9, w4g64-asym-mse.",
)

CALIBRATION = declare(
    "calibration", "calibration",
    Option("calib_data", str, DEFAULT_CALIBRATION_TEXT, "text for static ranges, GPTQ, massive-site detection and calibrated mitigations"),
    Option("calib_samples", int, 16, "calibration sequences", **SEQUENCES),
    Option("calib_seq_len", int, 512, "tokens per calibration sequence", **COUNT),
)

MASSIVE = declare(
    "massive", "massive activations",
    Option("massive", str, ["none"], "what quantization does with massive activations; several compare policies", many=True, choices=MASSIVE_POLICIES, metavar="POLICY"),
    Option("massive_detection", str, "calibrated", "find massive sites once on calibration data, or per forward", choices=DETECTION_MODES),
    Option("massive_threshold", float, MassiveCriteria.abs_threshold, "a massive value exceeds this magnitude", low=0),
    Option("massive_ratio", float, None, "... and this multiple of the criterion's median (default: 1000 x the layer's median |a| for sun, 64 x the median of the tokens' max |a| for prefixquant)", low=1),
    Option(
        "massive_target", str, [DEFAULT_TARGET],
        f"which massive activations a policy or intervention acts on: {', '.join(TARGETS)} (first-layer: the first layer "
        "with any, every channel massive there; dominant: the phenomenon with the largest value, at its first layer; "
        "all: every phenomenon at its own first layer); several compare targets", many=True, metavar="TARGET",
    ),
)

LOCATE = declare(
    "locate", "what counts as massive (locate)",
    Option("criterion", str, "sun", "; ".join(f"{name}: {text}" for name, text in CRITERIA.items()), choices=tuple(CRITERIA)),
    Option("k", int, None, "values per layer and sequence of the top-k criterion (default: 4)", **COUNT),
    Option("top_k", int, 10, "largest values kept per layer", **COUNT),
    Option("layer", int, None, "layer of the heat-map (default: the first massive layer, else the layer of the largest |a|)", low=0, metavar="N"),
)

MITIGATION = declare(
    "mitigation", "mitigations",
    Option("mitigation", str, ["none"], "post-hoc mitigation(s) to compare, e.g. hadamard,smoothquant:alpha=0.8 ('massquant mitigations' lists them); '+' combines", many=True, split=False, metavar="NAME[:k=v,...]"),
)

TASKS = declare(
    "tasks", "downstream tasks (lm-eval)",
    Option("tasks", str, [], "lm-eval tasks or groups", many=True, metavar="TASK[,TASK]"),
    Option("limit", float, None, "questions per task: a count, or a fraction below 1 (lm-eval's --limit; default: all)", low=0),
    Option("num_fewshot", int, None, "few-shot examples per question (default: each task's own, mostly 0)", low=0, high=MAX_SIZE),
    Option("task_batch_size", int, 1, "lm-eval requests per forward pass", **COUNT),
    Option("bootstrap", int, 1000, "paired bootstrap resamples per task Δ", low=100, high=MAX_SIZE, metavar="N"),
    Option("no_ppl", bool, False, "skip perplexity and score only the tasks (as does --data none)"),
    description="Each configuration is also scored on lm-eval tasks, in this process, with the model loaded once. "
    "Offline: massquant_arc_easy, massquant_arc_challenge, massquant_hellaswag, massquant_piqa, "
    "massquant_winogrande, massquant_boolq, massquant_openbookqa, massquant_sciq, massquant_lambada_openai, "
    "massquant_mmlu, or the group massquant_core; lm-eval's own names (hellaswag, ...) need the hub.",
)

RUN = declare(
    "run", "reproducibility",
    Option("seed", int, 0, "random seed: sampled and calibration sequences, random rotations, bootstrap", low=0, high=MAX_SEED),
)

TRAIN = declare(
    "train", "training (massquant train recipes)",
    Option("steps", int, 100, "optimizer steps", **COUNT),
    Option("optimizer", str, "adamw", "adamw: AdamW for every parameter; muon: Muon (torch.optim.Muon, RMS matched to AdamW) "
           "for the 2-D hidden matrices and AdamW for embeddings, output head, norms and scalars (as OSP, Park et al. 2025)",
           choices=("adamw", "muon")),
    Option("lr", float, 5e-5, "peak learning rate (AdamW, and Muon's through its AdamW-matched RMS)", low=1e-12),
    Option("min_lr_ratio", float, 0.1, "where cosine/linear decay ends, as a fraction of lr", low=0, high=1),
    Option("warmup_steps", int, 10, "linear warm-up steps", low=0, high=MAX_SIZE),
    Option("schedule", str, "cosine", "learning-rate schedule after warm-up", choices=("cosine", "linear", "constant")),
    Option("weight_decay", float, 0.1, "AdamW weight decay, on matrices only (norms, biases and scalars are not decayed)", low=0),
    Option("beta1", float, 0.9, "AdamW beta1", low=0, high=1),
    Option("beta2", float, 0.95, "AdamW beta2", low=0, high=1),
    Option("grad_clip", float, 1.0, "max global gradient norm; 0 disables clipping", low=0),
    Option("bf16", bool, False, "bfloat16 autocast (weights and optimizer stay float32)"),
    Option("save_every", int, 0, "also write checkpoint-<step>/ every N steps; 0: only the final checkpoint", low=0, high=MAX_SIZE),
    Option("record_every", int, 0, "per-layer massive-activation statistics every N steps and at step 0, with a fit of the "
           "top activation's trajectory (massquant.analysis.dynamics); 0: not recorded", low=0, high=MAX_SIZE),
    Option("record_sequences", int, 2, "held-out windows the record_every statistics are measured on", **SEQUENCES),
    Option("locate", bool, True, "massive-activation statistics (massquant.massive.locate) in each evaluation"),
)
