"""Several processes under torchrun (DistributedDataParallel, gloo on the CPU, 2 processes on 2 cores):
the same result as one process, restarts that resume bit for bit, a stop at the same step on every
rank, an out-of-memory error on one rank only, two "nodes" through a c10d rendezvous, and a resume
with another number of processes."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import FAST, SCRIPT, assert_same_weights, cli_env, load_state, run_cli

# Every run here trains from scratch (the shipped base model is for width 24 anyway).
ARGS = [*FAST, "--base-model", "none"]


def torchrun(args: list[str], cwd: Path, nproc: int = 2, faults: str | None = None, extra: list[str] | None = None,
             timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """``torchrun --standalone --nproc_per_node=N scripts/train_finetuned.py ARGS``, waited for."""
    env = cli_env(cwd, **({"TRAIN_FAULTS": faults} if faults else {}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *(extra or []),
           str(SCRIPT), *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def model_diff(a: Path, b: Path) -> float:
    sa, sb = load_state(a)["model"], load_state(b)["model"]
    return max(float((sa[k].double() - sb[k].double()).abs().max()) for k in sa)


@pytest.fixture(scope="module")
def two_process_run(tiny_idx: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted 2-process run: what the interrupted 2-process runs must reproduce bit for bit."""
    work = tmp_path_factory.mktemp("ddp")
    proc = torchrun([*ARGS, "--data", str(tiny_idx), "--output-dir", "out"], work)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "all 2 processes hold identical weights (sha256 " in proc.stdout  # checked after every epoch
    assert proc.stdout.count("completed 3 epochs") == 1  # rank 0 speaks for the run
    manifest = json.loads((work / "out" / "config_finetuned.json").read_text())
    assert manifest["resolved"]["processes"] == 2 and manifest["resolved"]["batch_size"] == 64  # the global batch
    return work / "out"


@pytest.mark.long
def test_two_processes_train_what_one_does(two_process_run: Path, tiny_idx: Path, tmp_path: Path):
    # SGD: equal up to the order in which float gradients are summed (1e-5). With Adam, whose update of a
    # parameter with a near-zero gradient is +-lr whatever that gradient's rounding, the same rounding
    # differences grow to the size of the learning rate, so the weights are compared through SGD and
    # the 2-process AdamW run (the default recipe) through its history.
    # A gentle learning rate: with a large one this tiny, barely trained model is chaotic, and the
    # float-order differences grow from 1e-7 to 1e-3 within a few steps.
    # set_aside on: after epoch 1 the ranks sum their shares of the margins and set the same images aside.
    sgd = ["--set", "optimizer=sgd", "--lr", "0.01", "--epochs", "2", "--set", "set_aside=on"]
    assert run_cli([*ARGS, *sgd, "--data", str(tiny_idx), "--output-dir", "one"], cwd=tmp_path).returncode == 0
    proc = torchrun([*ARGS, *sgd, "--data", str(tiny_idx), "--output-dir", "two"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert model_diff(tmp_path / "one" / "checkpoint_last.pth", tmp_path / "two" / "checkpoint_last.pth") < 1e-5
    aside = [load_state(tmp_path / run / "checkpoint_last.pth")["set_aside"]["images"] for run in ("one", "two")]
    assert aside[0].numel() == 18 and torch.equal(aside[0], aside[1])
    assert run_cli([*ARGS, "--data", str(tiny_idx), "--output-dir", "adam"], cwd=tmp_path).returncode == 0
    one = json.loads((tmp_path / "adam" / "history.json").read_text())
    two = json.loads((two_process_run / "history.json").read_text())
    for a, b in zip(one, two, strict=True):
        assert a["val_acc"] == b["val_acc"] and abs(a["train_loss"] - b["train_loss"]) < 1e-3


@pytest.mark.long
def test_a_killed_worker_is_restarted_and_the_group_ends_bit_identical(two_process_run: Path, tiny_idx: Path, tmp_path: Path):
    proc = torchrun([*ARGS, "--data", str(tiny_idx), "--output-dir", "out"], tmp_path, faults="kill@9:r1",
                    extra=["--max-restarts=3"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "restart 1 by torchrun after a failure: cooling down 0.0s, then resuming" in proc.stdout
    resumed = [e for r in json.loads((tmp_path / "out" / "history.json").read_text()) for e in r["events"] if e["type"] == "resumed"]
    assert [e["global_step"] for e in resumed] == [6]  # the end of epoch 1, the last checkpoint before the kill
    assert_same_weights(two_process_run / "checkpoint_last.pth", tmp_path / "out" / "checkpoint_last.pth")


@pytest.mark.long
def test_sigint_to_torchrun_stops_every_rank_at_one_step_then_resumes(two_process_run: Path, tiny_idx: Path, tmp_path: Path):
    args = [*ARGS, "--data", str(tiny_idx), "--output-dir", "out", "--epochs", "3"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(SCRIPT), *args]
    agent = subprocess.Popen(cmd, cwd=tmp_path, env=cli_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    deadline = time.monotonic() + 120
    while not (tmp_path / "out" / "history.json").exists() and time.monotonic() < deadline and agent.poll() is None:
        time.sleep(0.05)  # epoch 1 is done: the run is in epoch 2
    agent.send_signal(signal.SIGINT)  # to the agent, which forwards it to both workers
    out, err = agent.communicate(timeout=120)
    # Both workers stop at one agreed step, rank 0 saves once and reports it; the agent then
    # reports the signal itself (torchrun's own exit code is 1, with a SignalException).
    assert out.count("SIGINT: stopped at epoch") + err.count("SIGINT: stopped at epoch") == 1, out + err[-3000:]
    assert "exitcode  : 130" in err or "got signal: 2" in err
    state = load_state(tmp_path / "out" / "checkpoint_last.pth")
    assert state["finished"] is None and state["position"]["global_step"] > 6 and state["world_size"] == 2
    shutil.copytree(tmp_path / "out", tmp_path / "single")  # for the resume with one process below
    proc = torchrun(args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_weights(two_process_run / "checkpoint_last.pth", tmp_path / "out" / "checkpoint_last.pth")
    # The same interrupted run, resumed by one process: it works, and says it is not bit-identical.
    proc = run_cli([*ARGS, "--data", str(tiny_idx), "--output-dir", "single", "--epochs", "3"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "resuming a checkpoint of 2 process(es) with 1" in proc.stdout and "not bit-identical" in proc.stdout
    assert model_diff(two_process_run / "checkpoint_last.pth", tmp_path / "single" / "checkpoint_last.pth") < 0.05


@pytest.mark.long
def test_out_of_memory_on_one_rank_micro_batches_every_rank(tiny_idx: Path, tmp_path: Path):
    args = [*ARGS, "--batch-size", "128", "--data", str(tiny_idx)]  # two batch-norm groups per rank
    assert torchrun([*args, "--output-dir", "plain"], tmp_path).returncode == 0
    proc = torchrun([*args, "--output-dir", "oom"], tmp_path, faults="oom@4:r1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "CUDA out of memory at step 4: on another process; redoing it as 2 micro-batches of 32" in proc.stdout
    state = load_state(tmp_path / "oom" / "checkpoint_last.pth")
    assert state["micro_batching"]["parts"] == 2  # rank 0 switched too: the decision is global
    assert model_diff(tmp_path / "plain" / "checkpoint_last.pth", tmp_path / "oom" / "checkpoint_last.pth") < 1e-5


@pytest.mark.long
def test_two_nodes_through_a_c10d_rendezvous(two_process_run: Path, tiny_idx: Path, tmp_path: Path):
    import socket

    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = [*ARGS, "--data", str(tiny_idx), "--output-dir", "out"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1", "--rdzv-backend=c10d",
           f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=fewshot", str(SCRIPT), *args]
    agents = [subprocess.Popen(cmd, cwd=tmp_path, env=cli_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True) for _ in range(2)]
    results = [a.communicate(timeout=300) for a in agents]
    assert [a.returncode for a in agents] == [0, 0], [r[1][-2000:] for r in results]
    assert load_state(tmp_path / "out" / "checkpoint_last.pth")["world_size"] == 2
    assert_same_weights(two_process_run / "checkpoint_last.pth", tmp_path / "out" / "checkpoint_last.pth")


def test_the_global_batch_is_shared_by_whole_batch_norm_groups():
    from cnn_finetune.training.distributed import Dist

    groups = [32, 32, 32, 32]
    assert [Dist(rank=r, world=2).shard(groups) for r in range(2)] == [(0, 64, 2), (64, 128, 2)]
    assert [Dist(rank=r, world=2).shard([32, 8]) for r in range(2)] == [(0, 32, 1), (32, 40, 1)]
    assert [Dist(rank=r, world=2).shard([20]) for r in range(2)] == [(0, 20, 1), (20, 20, 0)]  # rank 0 first
    assert [Dist(rank=r, world=2).shard([32, 32, 16]) for r in range(2)] == [(0, 64, 2), (64, 80, 1)]
    assert Dist().shard(groups) == (0, 128, 4)


def test_faults_for_one_rank():
    from cnn_finetune.errors import UserError
    from cnn_finetune.training.faults import FaultInjector

    spec = "oom@12:r1,nan@3"
    assert FaultInjector(spec, rank=1).planned["oom"] == {12} and FaultInjector(spec, rank=0).planned["oom"] == set()
    assert FaultInjector(spec, rank=0).planned["nan"] == {3} == FaultInjector(spec, rank=1).planned["nan"]
    with pytest.raises(UserError, match="rank number"):
        FaultInjector("oom@12:rx", rank=0)


def test_bad_input_under_torchrun_ends_every_worker_with_exit_2(tiny_idx: Path, tmp_path: Path):
    # A bad --data fails on local rank 0 while rank 1 waits for it to fill the cache (rank 1 ended with a
    # gloo traceback, exit 1); a missing --base-model is found by rank 0 alone. Every worker must exit 2
    # with the message, without a traceback, an abort while leaving the group (SIGABRT, "terminate called
    # without an active exception") or the agent's SIGTERM (-15) replacing its exit code.
    for bad in (["--data", str(tmp_path / "missing")], ["--data", str(tiny_idx), "--base-model", str(tmp_path / "no.pth")]):
        proc = torchrun([*FAST, *bad, "--output-dir", "out"], tmp_path)
        codes = [line.split(":")[1].split()[0] for line in proc.stderr.splitlines() if line.strip().startswith("exitcode")]
        assert codes == ["2", "2"], proc.stderr[-4000:]
        assert "does not exist" in proc.stderr and "]: Traceback" not in proc.stderr  # a worker's: [rank1]: Traceback
        assert "terminate called" not in proc.stderr
        assert not (tmp_path / "out").exists()


def test_two_processes_fine_tune_digits_with_frozen_features_as_one_does(tiny_idx: Path, tmp_path: Path):
    # Digits from the shipped base model: the default trains the head alone (the features frozen from the
    # first step). Under DistributedDataParallel the frozen parameters get no gradient: the run must still
    # go through, keep the features of the base, and train the head as one process does.
    args = [*FAST, "--width", "24", "--set", "optimizer=sgd", "--lr", "0.01", "--epochs", "2", "--data", str(tiny_idx)]
    assert run_cli([*args, "--output-dir", "one"], cwd=tmp_path).returncode == 0
    proc = torchrun([*args, "--output-dir", "two"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "freeze_features_epochs: auto: the whole run" in proc.stdout
    from cnn_finetune.config import PACKAGED_BASE_MODEL

    base, two = load_state(PACKAGED_BASE_MODEL)["model"], load_state(tmp_path / "two" / "checkpoint_last.pth")["model"]
    assert all(torch.equal(base[k], two[k]) for k in base if k.startswith("features."))
    assert model_diff(tmp_path / "one" / "checkpoint_last.pth", tmp_path / "two" / "checkpoint_last.pth") < 1e-5
