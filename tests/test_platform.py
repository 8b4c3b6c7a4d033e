"""What must work on Linux, macOS and Windows: the output folder's lock, renames over open files,
and signals that exist only on POSIX. CI runs on Linux; the Windows branches are exercised here by
reproducing the condition they handle (a failing rename), not on Windows itself."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cnn_finetune.files import checkpoint
from cnn_finetune.files.checkpoint import atomic_write_bytes, replace_file
from cnn_finetune.errors import UserError
from cnn_finetune.files.rundir import LOCK, RunDir


def test_the_lock_refuses_a_second_holder_and_is_free_again_after(tmp_path: Path):
    run = RunDir(tmp_path / "out")
    run.create()
    with run.lock():
        with pytest.raises(UserError, match="another training run is using .*out") as err:
            with run.lock():
                pass
        assert err.value.exit_code == 2 and err.value.path == str(run.path)
    with run.lock():  # released: taken again at once
        assert (run / LOCK).is_file()


@pytest.mark.skipif(not Path("/proc/self/fdinfo").is_dir(), reason="needs /proc to read a descriptor's open flags")
def test_the_lock_file_is_held_open_read_only(tmp_path: Path):
    # A descriptor open for writing would keep the file system from being remounted read-only while
    # a run holds the lock (tests/test_faults.py remounts one for real when it may).
    run = RunDir(tmp_path)
    with run.lock():
        fds = [fd for fd in os.listdir("/proc/self/fd") if os.path.realpath(f"/proc/self/fd/{fd}") == str(run / LOCK)]
        assert len(fds) == 1
        flags = next(line for line in Path(f"/proc/self/fdinfo/{fds[0]}").read_text().splitlines() if line.startswith("flags:"))
        assert int(flags.split()[1], 8) & os.O_ACCMODE == os.O_RDONLY


def test_the_lock_contends_with_filelock_in_another_process(tmp_path: Path):
    """The same primitive as filelock.FileLock: another program that locks the file with it keeps us out."""
    run = RunDir(tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, filelock
        with filelock.FileLock({str(run / LOCK)!r}):
            print("held", flush=True)
            sys.stdin.readline()
        """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match="another training run"):
            with run.lock():
                pass
    finally:
        holder.communicate("\n", timeout=30)
    with run.lock():
        pass


def test_a_rename_over_a_file_held_open_is_retried_on_windows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    # Windows refuses os.replace while another program has the target open (PermissionError); the
    # atomic writer retries. Here the refusal is reproduced for the first two attempts.
    target = tmp_path / "history.json"
    target.write_text("old")
    real_replace, calls = os.replace, []

    def refusing_twice(src: os.PathLike[str], dst: os.PathLike[str]) -> None:
        calls.append(dst)
        if len(calls) <= 2:
            raise PermissionError(13, "The process cannot access the file because it is being used by another process")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", refusing_twice)
    monkeypatch.setattr(checkpoint, "RETRY_BLOCKED_RENAMES", True)  # as on Windows
    atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new" and len(calls) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["history.json"]  # no temporary file left
    calls.clear()
    monkeypatch.setattr(checkpoint, "RETRY_BLOCKED_RENAMES", False)  # elsewhere a refusal is a real error: no retry
    (tmp_path / "a").write_text("a")
    with pytest.raises(PermissionError):
        replace_file(tmp_path / "a", target)
    assert len(calls) == 1


def test_signal_handling_needs_no_posix_only_signal():
    from cnn_finetune.training import signals

    assert set(signals.EXIT_CODES) >= {signal.SIGINT, signal.SIGTERM}
    assert (signal.SIGHUP in signals.EXIT_CODES) == hasattr(signal, "SIGHUP")
    source = Path(signals.__file__).read_text()
    assert source.count("signal.SIGHUP") == 1 and 'hasattr(signal, "SIGHUP")' in source  # used only behind the guard
    # SIGALRM (the look-again timer after an import) is touched only where setitimer exists.
    first = source.index("signal.SIGALRM")
    assert 'hasattr(signal, "setitimer") and' in source[first - 200:first]
