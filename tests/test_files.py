"""The shared file helpers of issue 12 (clustermac.files): output_lock, remove_stale_temporaries,
crash_point and publish_folder / current_version. Other processes are real subprocesses, each
bounded by ``timeout=`` and synchronised on what they print, never on sleeps."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading

import pytest

import clustermac
from clustermac.files import (
    atomic_write_bytes,
    crash_point,
    current_version,
    lock_path,
    output_lock,
    publish_folder,
    remove_stale_temporaries,
    temporary_file_beside,
)

TIMEOUT = 60


def python(code, *args, env=None, **kwargs):
    environment = dict(os.environ)
    environment.pop("CLUSTERMAC_CRASH_AT", None)
    environment.update(env or {})
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *map(str, args)],
        env=environment,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        **kwargs,
    )


TRY_LOCK = """
    import sys
    import clustermac
    from clustermac.files import output_lock
    try:
        with output_lock(sys.argv[1], command="second"):
            print("acquired")
    except clustermac.OutputLockedError as error:
        print("locked", error.holder.get("pid"), error.holder.get("command"), error)
        sys.exit(3)
"""


# --- output_lock -----------------------------------------------------------------------------------


def test_a_second_process_is_refused_and_told_the_holder(tmp_path):
    out = tmp_path / "d.npy"
    with output_lock(out, command="clustermac extract x") as path:
        assert path == lock_path(out) == tmp_path / ".d.npy.lock"
        holder = json.loads(path.read_text())
        assert holder["pid"] == os.getpid() and holder["command"] == "clustermac extract x"
        result = python(TRY_LOCK, out)
        assert result.returncode == 3, result.stderr
        assert result.stdout.startswith(f"locked {os.getpid()} clustermac extract x")
        assert f"pid {os.getpid()}" in result.stdout and "another clustermac process" in result.stdout
        with output_lock(out):  # nested in the holding thread: allowed
            pass
        assert python(TRY_LOCK, out).returncode == 3  # still held after the nested block
    assert path.read_text() == ""  # released: no stale holder record
    assert python(TRY_LOCK, out).stdout.strip() == "acquired"


def test_another_thread_of_the_same_process_is_a_second_writer(tmp_path):
    out = tmp_path / "d.npy"
    outcome = []

    def second_writer():
        try:
            with output_lock(out):
                outcome.append("acquired")
        except clustermac.OutputLockedError as error:
            outcome.append(error)

    with output_lock(out):
        thread = threading.Thread(target=second_writer)
        thread.start()
        thread.join(TIMEOUT)
    assert len(outcome) == 1 and isinstance(outcome[0], clustermac.OutputLockedError)
    assert outcome[0].holder["pid"] == os.getpid()


def test_the_kernel_releases_the_lock_of_a_killed_holder(tmp_path):
    out = tmp_path / "d.npy"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from clustermac.files import output_lock\n"
            "with output_lock(sys.argv[1], command='victim'):\n"
            "    print('held', flush=True); sys.stdin.read()",
            str(out),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(clustermac.OutputLockedError, match=f"pid {holder.pid}"):
            with output_lock(out):
                pass
        holder.send_signal(signal.SIGKILL)
        assert holder.wait(timeout=TIMEOUT) == -signal.SIGKILL
    finally:
        if holder.poll() is None:
            holder.kill()
    with output_lock(out):  # no stale lock to guess about, though the record is stale
        assert json.loads(lock_path(out).read_text())["pid"] == os.getpid()


# --- remove_stale_temporaries -----------------------------------------------------------------------


def test_remove_stale_temporaries_removes_only_this_outputs(tmp_path):
    out = tmp_path / "d"
    fd, mine = temporary_file_beside(out)
    os.close(fd)
    fd, other = temporary_file_beside(tmp_path / "d.json")  # another output's, maybe being written
    os.close(fd)
    (tmp_path / ".d.tmp-1234").mkdir()
    (tmp_path / ".d.tmp-1234" / "x").write_text("x")
    keep = ["d", "d.json", "d.parts", "dd.abcdefgh.tmp", "d.ABCDEFGH.txt"]
    for name in keep:
        (tmp_path / name).write_text("keep")
    with output_lock(out):
        removed = remove_stale_temporaries(out)
    assert sorted(p.name for p in removed) == sorted([os.path.basename(mine), ".d.tmp-1234"])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*keep, os.path.basename(other), ".d.lock"])
    assert remove_stale_temporaries(tmp_path / "missing" / "x") == []


# --- crash_point ---------------------------------------------------------------------------------------

CRASHER = """
    from clustermac.files import crash_point
    for i in range(1, 4):
        try:
            crash_point("step")
        except KeyboardInterrupt:
            print("interrupted", i, flush=True)
            raise SystemExit(130)
        print(i, flush=True)
"""


@pytest.mark.parametrize(
    "wanted, code, printed",
    [
        ("step:2", -signal.SIGKILL, "1\n"),
        ("step", -signal.SIGKILL, ""),
        ("step:3:INT", 130, "1\n2\ninterrupted 3\n"),
        ("other:1", 0, "1\n2\n3\n"),
        ("", 0, "1\n2\n3\n"),
    ],
)
def test_crash_point_kills_or_interrupts_at_the_nth_arrival(wanted, code, printed):
    result = python(CRASHER, env={"CLUSTERMAC_CRASH_AT": wanted})
    assert (result.returncode, result.stdout) == (code, printed), result.stderr


def test_crash_point_without_the_variable_does_nothing(monkeypatch):
    monkeypatch.delenv("CLUSTERMAC_CRASH_AT", raising=False)
    crash_point("extract.chunk_npy")


# --- publish_folder / current_version ------------------------------------------------------------------


def write_files(content):
    def write(staging):
        atomic_write_bytes(staging / "data.bin", content)

    return write


def test_publish_folder_switches_versions_atomically(tmp_path):
    folder = tmp_path / "index"
    assert current_version(folder) is None
    first = publish_folder(folder, write_files(b"one"))
    assert current_version(folder) == first and (first / "data.bin").read_bytes() == b"one"
    second = publish_folder(folder, write_files(b"two"))
    assert current_version(folder) == second and not first.exists()
    assert sorted(p.name for p in folder.iterdir()) == sorted(["CURRENT", second.name])


def test_a_failed_write_leaves_the_old_version_live(tmp_path):
    folder = tmp_path / "index"
    first = publish_folder(folder, write_files(b"one"))

    def failing(staging):
        (staging / "half").write_bytes(b"x")
        raise OSError("no space left on device")

    with pytest.raises(OSError, match="no space left"):
        publish_folder(folder, failing)
    assert current_version(folder) == first
    assert sorted(p.name for p in folder.iterdir()) == sorted(["CURRENT", first.name])


def test_a_kill_before_the_pointer_switch_leaves_the_old_version_then_is_cleaned(tmp_path):
    folder = tmp_path / "index"
    first = publish_folder(folder, write_files(b"one"))
    code = """
        import sys
        from pathlib import Path
        from clustermac.files import atomic_write_bytes, publish_folder
        publish_folder(Path(sys.argv[1]), lambda staging: atomic_write_bytes(staging / "data.bin", b"two"))
    """
    killed = python(code, folder, env={"CLUSTERMAC_CRASH_AT": "publish_folder:1"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert current_version(folder) == first and (first / "data.bin").read_bytes() == b"one"
    assert len([p for p in folder.iterdir() if p.name.startswith("v-")]) == 2  # the orphan is aside
    third = publish_folder(folder, write_files(b"three"))
    assert sorted(p.name for p in folder.iterdir()) == sorted(["CURRENT", third.name])


@pytest.mark.parametrize(
    "pointer, problem",
    [
        (b"../../etc", "not a version folder"),
        (b"v-missing", "which is missing"),
        (b"\xff\xfe", "unreadable pointer file"),
        (b"", "not a version folder"),
    ],
)
def test_a_forged_pointer_is_a_corrupt_file_error(tmp_path, pointer, problem):
    folder = tmp_path / "index"
    publish_folder(folder, write_files(b"one"))
    (folder / "CURRENT").write_bytes(pointer)
    with pytest.raises(clustermac.CorruptFileError, match=problem) as caught:
        current_version(folder)
    assert caught.value.path == folder / "CURRENT"
