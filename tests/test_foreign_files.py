"""What a training run never touches: files outside its output folder, whatever a checkpoint says.

A checkpoint's SHA-256 has no key, so a forged one verifies: these tests forge checkpoints the way
an attacker would (edit the state, compute the checksum again) and prove, by hashing a tree of
sentinel files before and after the real command, that nothing outside the output folder is deleted,
moved or written, and that a forged checkpoint is refused like a damaged one (the previous one is
used, or the run stops with exit 2), never acted on.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from conftest import FAST, assert_same_weights, load_state, run_cli

# Stopped by SIGINT after step 8 of 18 (epoch 2, step 2): checkpoint_last.pth at step 8,
# checkpoint_prev.pth at the end of epoch 1 (step 6); one best-K file (--keep-best 1).
KEEP = ["--keep-best", "1"]


def tree(folder: Path, skip: tuple[str, ...] = ()) -> dict[str, str]:
    """Relative path -> what is there (a file's SHA-256, 'dir', or a link's target), for every entry."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)
        if rel.parts[0] in skip or rel.parts[0].startswith(tuple(f"{s}." for s in skip)):
            continue
        out[str(rel)] = (f"link:{os.readlink(p)}" if p.is_symlink() else "dir" if p.is_dir()
                         else hashlib.sha256(p.read_bytes()).hexdigest())
    return out


def plant_sentinels(root: Path) -> None:
    """A home-like folder and a file beside the output folder: what a forged name would point at."""
    for rel, text in {"notes.txt": "my notes", "home/.bashrc": "alias ll='ls -l'", "home/.ssh/id_ed25519": "secret key",
                      "home/Documents/thesis.tex": "chapter 1"}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


def forge(path: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    """Change a checkpoint's state and compute its SHA-256 again, as anyone can (the checksum has no key)."""
    from cnn_finetune.files.checkpoint import content_digest

    payload = torch.load(path, map_location="cpu", weights_only=True)
    edit(payload["state"])
    payload["sha256"] = content_digest(payload["state"])
    torch.save(payload, path)


def stopped_run(tiny_idx: Path, root: Path) -> list[str]:
    args = [*FAST, *KEEP, "--data", str(tiny_idx), "--output-dir", str(root / "out")]
    proc = run_cli(args, cwd=root, faults="sigint@8")
    assert proc.returncode == 130, proc.stderr[-2000:]
    plant_sentinels(root)
    return args


def forged_names(root: Path) -> dict[str, str]:
    """Names a forged best-K entry may hold; the symbolic link is planted in the output folder."""
    link = root / "out" / "best_epoch009_val_acc0.9999.pth"
    link.symlink_to(root / "notes.txt")
    return {"absolute": str(root / "home" / ".ssh" / "id_ed25519"), "relative": "../notes.txt",
            "pattern_with_dirs": "best_epoch001_/../../notes.txt", "checkpoint": "checkpoint_last.pth",
            "symlink": link.name}


def worst_entry(name: str) -> Callable[[dict[str, Any]], None]:
    """A best-K list whose only entry names ``name`` with the worst metric: the next epoch pushes it out."""
    def edit(state: dict[str, Any]) -> None:
        state["best_keeper"]["entries"] = [{"metric": -1.0, "tiebreak": 99.0, "epoch": 1, "file": name}]
    return edit


@pytest.mark.parametrize("kind", ["absolute", "relative", "pattern_with_dirs", "checkpoint", "symlink"])
def test_a_forged_best_k_name_is_refused_and_deletes_nothing(tiny_idx: Path, tmp_path: Path, kind: str):
    args = stopped_run(tiny_idx, tmp_path)
    name = forged_names(tmp_path)[kind]
    for ckpt in ("checkpoint_last.pth", "checkpoint_prev.pth"):  # an attacker forges both
        forge(tmp_path / "out" / ckpt, worst_entry(name))
    outside, inside = tree(tmp_path, skip=("out", "cache")), tree(tmp_path / "out")
    proc = run_cli(args, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "best_keeper.entries[0].file" in proc.stderr and "damaged or forged" in proc.stderr
    assert f"no valid checkpoint in {tmp_path / 'out'}" in proc.stderr and "Traceback" not in proc.stderr
    assert tree(tmp_path, skip=("out", "cache")) == outside  # nothing outside deleted, moved or written
    assert tree(tmp_path / "out") == inside  # a refused run touches nothing at all


def _negative_epoch(s: dict[str, Any]) -> None:
    s["position"].update(epoch=-1, global_step=-4)


def _step_past_the_end(s: dict[str, Any]) -> None:
    s["position"].update(step=50, global_step=56)


def _global_step_off(s: dict[str, Any]) -> None:
    s["position"]["global_step"] = 3


def _set_aside_past_the_split(s: dict[str, Any]) -> None:
    s["set_aside"] = {"epoch": 1, "images": torch.tensor([3, 10**6]), "note": "on"}


FORGED_FIELDS = {"best_keeper.entries[0].file": worst_entry("../notes.txt"), "position.epoch": _negative_epoch,
                 "position.step": _step_past_the_end, "position.global_step": _global_step_off,
                 "set_aside": _set_aside_past_the_split}


@pytest.mark.parametrize("field", list(FORGED_FIELDS))
def test_a_forged_last_checkpoint_falls_back_to_the_previous_one(reference_run: Path, tiny_idx: Path, tmp_path: Path,
                                                                  field: str):
    args = stopped_run(tiny_idx, tmp_path)
    forge(tmp_path / "out" / "checkpoint_last.pth", FORGED_FIELDS[field])
    outside = tree(tmp_path, skip=("out", "cache"))
    proc = run_cli(args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"checkpoint_last.pth holds an unusable value in {field}" in proc.stderr
    assert "using checkpoint_prev.pth: the newer checkpoint is damaged" in proc.stdout
    assert tree(tmp_path, skip=("out", "cache")) == outside
    # Resumed from the end of epoch 1 instead: the same model as an uninterrupted run, bit for bit.
    assert_same_weights(reference_run / "checkpoint_last.pth", tmp_path / "out" / "checkpoint_last.pth")
    assert [p.name.split(".damaged-")[0] for p in (tmp_path / "out").glob("*.damaged-*")] == ["checkpoint_last.pth"]
    assert load_state(tmp_path / "out" / "checkpoint_last.pth")["finished"]["reason"] == "completed"


def _weights_of_another_shape(s: dict[str, Any]) -> None:
    s["model"][next(iter(s["model"]))] = torch.zeros(3)


def _optimizer_state_of_another_model(s: dict[str, Any]) -> None:
    s["optimizer"]["state"] = {0: {"momentum_buffer": torch.zeros(2)}}


@pytest.mark.parametrize("edit", [_weights_of_another_shape, _optimizer_state_of_another_model])
def test_forged_weights_or_optimizer_state_are_bad_input_not_a_traceback(tiny_idx: Path, tmp_path: Path, edit):
    args = stopped_run(tiny_idx, tmp_path)
    for ckpt in ("checkpoint_last.pth", "checkpoint_prev.pth"):
        forge(tmp_path / "out" / ckpt, edit)
    before = tree(tmp_path, skip=("cache",))
    proc = run_cli(args, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"{tmp_path / 'out' / 'checkpoint_last.pth'} does not fit the model of its own settings" in proc.stderr
    assert "damaged or forged" in proc.stderr and "Traceback" not in proc.stderr
    assert tree(tmp_path, skip=("cache",)) == before


# --- only an earlier run is ever moved aside ---------------------------------------------------------------


def plant_home(folder: Path) -> None:
    for rel, text in {".bashrc": "export PATH", ".ssh/id_ed25519": "secret key", "Documents/thesis.tex": "chapter 1"}.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_text(text)


def plant_class_folders(folder: Path) -> None:
    for c in ("0", "1", "2"):
        (folder / c).mkdir(parents=True)
        (folder / c / "img.png").write_bytes(b"\x89PNG not really")


@pytest.mark.parametrize("plant, names", [(plant_class_folders, "0, 1, 2"), (plant_home, ".bashrc, .ssh, Documents")])
def test_no_resume_never_moves_a_folder_that_is_not_a_run(tiny_idx: Path, tmp_path: Path, plant, names: str):
    plant(tmp_path / "mine")
    before = tree(tmp_path, skip=("cache",))
    args = [*FAST, "--data", str(tiny_idx), "--output-dir", "mine"]
    proc = run_cli([*args, "--no-resume"], cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert (f"--no-resume moves aside only the folder of an earlier run, and mine holds files that are not this "
            f"program's ({names}); nothing was moved") in proc.stderr
    assert tree(tmp_path, skip=("cache",)) == before and not [p for p in tmp_path.iterdir() if ".old-" in p.name]
    # Without --no-resume: refused too, and not called the files of an earlier run (they are not).
    proc = run_cli(args, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"mine holds files that are not this program's ({names}) and no checkpoint" in proc.stderr
    assert "earlier run (" not in proc.stderr and "use --no-resume" not in proc.stderr
    assert tree(tmp_path, skip=("cache",)) == before


def test_no_resume_still_moves_a_run_folder_with_exports_and_file_manager_files(tiny_idx: Path, tmp_path: Path):
    args = [*FAST, "--epochs", "1", "--data", str(tiny_idx), "--output-dir", "out"]
    assert run_cli(args, cwd=tmp_path).returncode == 0
    (tmp_path / "out" / "export").mkdir()  # export.py's default folder, beside the model
    (tmp_path / "out" / "export" / "model.onnx").write_bytes(b"onnx")
    (tmp_path / "out" / ".DS_Store").write_bytes(b"finder")
    before = tree(tmp_path / "out")
    proc = run_cli([*args, "--no-resume"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    moved = [p for p in tmp_path.iterdir() if p.name.startswith("out.old-")]
    assert len(moved) == 1 and tree(moved[0]) == before


# --- the output folder and the data stay apart -------------------------------------------------------------


def image_folder(root: Path, per_class: int = 12) -> Path:
    """A plain <class>/ tree of real PNG files, two classes."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for k in range(per_class):
            arr = rng.integers(0, 60, (28, 28), dtype=np.uint8)
            arr[4:24, (6 if c == "a" else 16):(12 if c == "a" else 22)] = 255
            Image.fromarray(arr).save(root / c / f"{k}.png")
    return root


@pytest.mark.parametrize("flag", ["--data", "--val-data", "--test-data"])
def test_an_output_folder_inside_the_data_is_refused_and_creates_nothing(tiny_idx: Path, tmp_path: Path, flag: str):
    image_folder(tmp_path / "data")
    before = tree(tmp_path, skip=("cache",))
    data = [] if flag == "--data" else ["--data", str(tiny_idx)]
    for extra in ([], ["--no-resume"]):
        proc = run_cli([*FAST, *data, flag, "data", "--output-dir", "data/run", *extra], cwd=tmp_path)
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert f"--output-dir data/run is inside the data folder data ({flag})" in proc.stderr
        assert tree(tmp_path, skip=("cache",)) == before  # data/run was not created


@pytest.mark.parametrize("flag", ["--data", "--val-data", "--test-data"])
def test_data_inside_the_output_folder_is_refused_and_nothing_is_moved(tiny_idx: Path, tmp_path: Path, flag: str):
    image_folder(tmp_path / "out" / "mydata")
    before = tree(tmp_path, skip=("cache",))
    data = [] if flag == "--data" else ["--data", str(tiny_idx)]
    for extra in ([], ["--no-resume"]):
        proc = run_cli([*FAST, *data, flag, "out/mydata", "--output-dir", "out", *extra], cwd=tmp_path)
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert f"the data out/mydata ({flag}) is inside --output-dir out" in proc.stderr
        assert tree(tmp_path, skip=("cache",)) == before
