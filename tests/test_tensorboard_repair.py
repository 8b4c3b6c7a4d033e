"""TensorBoard event files after a resume: damaged records are skipped one by one (the TFRecord framing
carries a CRC of each length and each payload), and a wrong kind of path where the files go is bad input."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import FAST, SCRIPT, cli_env, run_cli
from test_logs import scalars

ARGS = [*FAST, "--base-model", "none", "--logger", "tensorboard"]


@pytest.fixture(scope="module")
def interrupted(tiny_idx: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run stopped by SIGINT at step 9 (of 18), with its event file holding steps 1-9 and more; copied by each test."""
    pytest.importorskip("tensorboardX")
    work = tmp_path_factory.mktemp("board")
    proc = run_cli([*ARGS, "--data", str(tiny_idx), "--output-dir", "out"], cwd=work, faults="sigint@9")
    assert proc.returncode == 130, proc.stderr[-2000:]
    assert [step for step, _ in scalars(work / "out" / "tensorboard", "train/loss")][:9] == list(range(1, 10))
    return work / "out"


def records(path: Path) -> list[tuple[int, int, int, str]]:
    """(start, end, step, first tag) of each record of an intact event file."""
    from tensorboardX.proto import event_pb2

    data, pos, found = path.read_bytes(), 0, []
    while pos < len(data):
        (size,) = struct.unpack("<Q", data[pos:pos + 8])
        event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + size])
        tag = event.summary.value[0].tag if event.summary.value else ""
        found.append((pos, pos + 16 + size, event.step, tag))
        pos += 16 + size
    return found


def event_file(out: Path) -> Path:
    (path,) = (out / "tensorboard").glob("events.out.tfevents.*")
    return path


def damage(path: Path, how: str) -> None:
    """Damage the record of step 3's train/loss: its length, or its payload; or add a foreign record
    (both CRCs right, a payload that is no Event) after it."""
    from tensorboardX.record_writer import masked_crc32c

    data = bytearray(path.read_bytes())
    start, end, _, _ = next(r for r in records(path) if r[2:] == (3, "train/loss"))
    if how == "length":
        data[start + 5] ^= 0x40  # a length of terabytes: the old trim kept only what came before it
    elif how == "payload":
        data[start + 12] = 0xFF  # no protobuf field starts so: the old trim raised DecodeError
    else:
        payload, header = b"\xff\xff\xff", struct.pack("<Q", 3)
        data[end:end] = header + struct.pack("<I", masked_crc32c(header)) + payload + struct.pack("<I", masked_crc32c(payload))
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["length", "payload", "foreign"])
def test_a_damaged_event_record_costs_that_record_only(interrupted: Path, tiny_idx: Path, tmp_path: Path, how: str):
    shutil.copytree(interrupted, tmp_path / "out")
    damage(event_file(tmp_path / "out"), how)
    proc = run_cli([*ARGS, "--data", str(tiny_idx), "--output-dir", "out"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    board = tmp_path / "out" / "tensorboard"
    lost = [] if how == "foreign" else [3]  # the damaged record itself; every step before the checkpoint else
    assert [step for step, _ in scalars(board, "train/loss")] == [s for s in range(1, 19) if s not in lost]
    assert [step for step, _ in scalars(board, "train/lr")] == list(range(1, 19))
    assert [step for step, _ in scalars(board, "epoch/val_acc")] == [6, 12, 18]
    assert "damaged byte(s) of TensorBoard events skipped" in proc.stderr


def tree(folder: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``folder`` with its size and modification time."""
    return {str(p.relative_to(folder)): (p.lstat().st_size, p.lstat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("what", ["folder is a file", "event file is a folder", "event file is a FIFO"])
def test_a_wrong_kind_of_path_for_the_event_files_is_bad_input(interrupted: Path, tiny_idx: Path, tmp_path: Path,
                                                               what: str):
    out = tmp_path / "out"
    shutil.copytree(interrupted, out)
    if what == "folder is a file":
        shutil.rmtree(out / "tensorboard")
        (out / "tensorboard").write_text("my notes\n")
        named = out / "tensorboard"
    elif what == "event file is a folder":
        named = out / "tensorboard" / "events.out.tfevents.mine"
        named.mkdir()
        (named / "keep.txt").write_text("mine\n")
    else:
        named = out / "tensorboard" / "events.out.tfevents.fifo"
        os.mkfifo(named)
    before = tree(out)
    # A subprocess with a time limit: a FIFO that is opened blocks for ever.
    proc = subprocess.run([sys.executable, str(SCRIPT), *ARGS, "--data", str(tiny_idx), "--output-dir", "out"],
                          cwd=tmp_path, env=cli_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert str(named.relative_to(tmp_path)) in proc.stderr and "--logger none" in proc.stderr
    assert tree(out) == before  # nothing touched, the user's path least of all
