"""The label review: the area under the margin of every training image, kept as training state.

Units check the margin and the tracker's bookkeeping on hand-made logits; end-to-end runs check that
label_review.csv names the real images with their given labels, and that a run interrupted by real
signals and a kill writes the very file an uninterrupted run writes (the sums live in the checkpoint).
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

import pytest
import torch

from conftest import FAST, load_state, run_cli


def read_review(out: Path) -> list[dict[str, str]]:
    with open(out / "label_review.csv", encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def test_margin_is_the_given_logit_minus_the_best_other():
    from cnn_finetune.training.label_review import margins

    logits = torch.tensor([[2.0, 5.0, 1.0], [2.0, 5.0, 1.0], [0.0, 0.0, 3.0]])
    labels = torch.tensor([1, 0, 2])
    assert margins(logits, labels).tolist() == [3.0, -3.0, 3.0]


def test_tracker_adds_committed_margins_only_and_restores_its_state():
    from cnn_finetune.training.label_review import MarginTracker

    t = MarginTracker(4, "cpu")
    logits = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    t.observe(torch.tensor([0, 3]), logits, torch.tensor([0, 0]))
    t.commit(torch.tensor(True))
    t.observe(torch.tensor([0]), logits[:1], torch.tensor([1]))
    t.commit(torch.tensor(False))  # a skipped (non-finite) step adds nothing
    t.observe(torch.tensor([1]), torch.tensor([[float("nan"), 0.0]]), torch.tensor([0]))
    t.commit(torch.tensor(True))  # a NaN margin is not counted either
    t.observe(torch.tensor([2]), logits[:1], torch.tensor([0]))
    t.discard()  # a step redone after out-of-memory: its margins come again
    t.commit(torch.tensor(True))
    state = t.state_dict()
    assert state["margin_sum"].tolist() == [1.0, 0.0, 0.0, -2.0] and state["times_seen"].tolist() == [1, 0, 0, 1]
    other = MarginTracker(4, "cpu")
    other.load_state_dict(state)
    assert torch.equal(other.sums, t.sums) and torch.equal(other.counts, t.counts)
    other.load_state_dict(state, owner=False)  # another rank of a resumed DDP run starts its share at 0
    assert other.sums.abs().sum() == 0
    assert torch.isnan(t.scores()[1]) and t.scores()[3] == -2.0


def test_review_names_each_idx_image_with_its_given_label(reference_run: Path, tiny_idx: Path):
    from cnn_finetune.data.loader import load_dataset

    rows = read_review(reference_run)
    assert len(rows) == 360 and [int(r["rank"]) for r in rows] == list(range(1, 361))
    scores = [float(r["score"]) for r in rows]
    assert scores == sorted(scores)  # most suspect (lowest area under the margin) first
    assert all(int(r["times_seen"]) == 3 for r in rows)  # 3 epochs, each image once per epoch
    ds = load_dataset(tiny_idx, use_cache=False)
    seen = set()
    for r in rows:
        m = re.fullmatch(re.escape(str(tiny_idx)) + r"\[(\d+)\]", r["image"])
        assert m, r["image"]
        i = int(m.group(1))
        assert ds.class_names[int(ds.labels[i])] == r["given_label"]
        seen.add(i)
    assert len(seen) == 360  # the training images, each once (the other 40 are the validation split)
    state = load_state(reference_run / "checkpoint_last.pth")["label_review"]
    assert state["margin_sum"].shape == (360,) and int(state["times_seen"].sum()) == 3 * 360


@pytest.mark.long
def test_label_review_is_the_same_after_real_signals_and_a_kill(reference_run: Path, tiny_idx: Path, tmp_path: Path):
    args = [*FAST, "--data", str(tiny_idx), "--output-dir", "out"]
    for fault, code in (("sigint@4", 130), ("sigterm@9", 143), ("kill@14", -9)):
        proc = run_cli(args, cwd=tmp_path, faults=fault)
        assert proc.returncode == code, (fault, proc.stderr[-2000:])
    proc = run_cli(args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "out"
    assert (out / "label_review.csv").read_bytes() == (reference_run / "label_review.csv").read_bytes()
    a = load_state(reference_run / "checkpoint_last.pth")["label_review"]
    b = load_state(out / "checkpoint_last.pth")["label_review"]
    assert torch.equal(a["margin_sum"], b["margin_sum"]) and torch.equal(a["times_seen"], b["times_seen"])


@pytest.mark.long
def test_flipped_labels_rank_near_the_top(tmp_path: Path, tiny_idx: Path):
    """Ten wrong labels among 400 digits: most of them are in the top 10% of the review list."""
    import numpy as np

    from cnn_finetune.data.loader import load_dataset, write_idx

    ds = load_dataset(tiny_idx, use_cache=False)
    labels = ds.labels.clone()
    flipped = torch.arange(5, 400, 40)  # one per class
    labels[flipped] = (labels[flipped] + 5) % 10
    write_idx(tmp_path / "flip-images-idx3-ubyte.gz", ds.images[:, 0].numpy())
    write_idx(tmp_path / "flip-labels-idx1-ubyte.gz", labels.numpy().astype(np.uint8))
    data = tmp_path / "flip-images-idx3-ubyte.gz"
    proc = run_cli([*FAST, "--data", str(data), "--epochs", "8", "--lr", "0.01", "--output-dir", "out"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    rows = read_review(tmp_path / "out")
    top = {r["image"] for r in rows[: len(rows) // 10]}
    in_train = [f"{data}[{i}]" for i in flipped.tolist() if any(r["image"] == f"{data}[{i}]" for r in rows)]
    found = [name for name in in_train if name in top]
    assert len(found) >= 0.6 * len(in_train), (found, in_train)
