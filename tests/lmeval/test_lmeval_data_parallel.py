"""Data-parallel lm-eval: two CPU processes (torchrun, gloo) each build the same variant and score half the
requests; rank 0 writes per-question results identical to one process's."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest
import torch

from massquant.errors import UserError
from massquant.lmeval import parallel
from tests.conftest import run_cli

LIMIT = 6  # questions; 4 choices each, so 24 loglikelihood requests


def test_state_hash_sees_every_byte_and_ranks_that_differ_are_refused(monkeypatch):
    model = torch.nn.Linear(4, 3)
    before = parallel.state_sha256(model)
    assert parallel.state_sha256(model) == before
    with torch.no_grad():
        model.weight.view(torch.int32)[1, 2] ^= 1  # one bit of one weight
    assert parallel.state_sha256(model) != before
    model.register_buffer("amax", torch.tensor(1.0))  # a calibrated range is part of the variant too
    with_range = parallel.state_sha256(model)
    model.amax.fill_(2.0)
    assert parallel.state_sha256(model) != with_range
    monkeypatch.setattr(parallel, "gathered", lambda value: [value, "0" * 64])
    with pytest.raises(UserError, match="different variants"):
        parallel.check_identical_weights(model)


def _samples(directory) -> dict[int, dict]:
    path = next(directory.rglob("samples_massquant_arc_easy_*.jsonl"))
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return {row["doc_id"]: {key: row[key] for key in ("resps", "filtered_resps", "acc", "acc_norm")} for row in rows}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_two_processes_score_half_each_and_match_one_process(tiny_llama_dir, tmp_path):
    arguments = [
        "lm-eval", "--model", "massquant", "--model_args", f"pretrained={tiny_llama_dir},spec=w8a8,bos=never",
        "--tasks", "massquant_arc_easy", "--limit", str(LIMIT), "--device", "cpu", "--log_samples",
    ]
    single = run_cli(*arguments, "--output_path", tmp_path / "one")
    assert single.returncode == 0, single.stderr[-2000:]
    launched = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
         "-m", "massquant", *arguments, "--output_path", str(tmp_path / "two")],
        capture_output=True, text=True, timeout=900,
    )
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert "on rank 1..." in launched.stderr  # lm-eval built rank 1's share of the requests

    one, two = _samples(tmp_path / "one"), _samples(tmp_path / "two")
    assert sorted(two) == list(range(LIMIT)) and two == one  # every question once, scored bit-identically

    written = [json.loads(path.read_text()) for path in (tmp_path / "two").rglob("results_*.json")]
    assert len(written) == 1  # rank 0 alone writes
    record = written[0]["config"]["data_parallel"]
    assert record["processes"] == 2
    hashes = record["weights_sha256_per_rank"]
    assert len(hashes) == 2 and hashes[0] == hashes[1] and len(hashes[0]) == 64
    assert record["requests_per_rank"] == [{"loglikelihood": 4 * LIMIT // 2}] * 2
    assert "data_parallel" not in json.loads(next((tmp_path / "one").rglob("results_*.json")).read_text())["config"]
