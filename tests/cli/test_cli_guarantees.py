"""Issue 12 on the command line: one writer per output, colliding outputs and bad settings
refused before any work, named crash points during `clustermac extract` (a resume gives the
bytes of an uninterrupted run), Ctrl-C, a full disk, a read-only folder.

Every run is a real `python -m clustermac.cli` subprocess bounded by ``timeout=``; runs are
synchronised on the lock file's holder record, never on sleeps. The backbone is the tiny ONNX
stand-in of tests/conftest.py. ``CLUSTERMAC_FAULT_POINTS=50`` runs 50 crash scenarios instead of 10.
"""

from __future__ import annotations

import json
import os
import random
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import clustermac
from clustermac.descriptors.store import manifest_path
from clustermac.files import lock_path, output_lock

TIMEOUT = 60
CHUNK = 2


@pytest.fixture
def setup(tmp_path, pooling_model):
    """(model, image folder): six small PNGs and one broken file, so chunks carry a failure."""
    model, _, _ = pooling_model(tmp_path / "tiny.onnx", 512, 16, preset="vgg16")
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(3)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
    (folder / "img3b.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    return model, folder


def command(model, folder, out, method="mac", *extra):
    return [
        sys.executable, "-m", "clustermac.cli", "extract", str(folder), "--out", str(out), "--quiet",
        "--backbone", str(model), "--threads", "1", "--method", method, "--chunk-size", str(CHUNK), *extra,
    ]  # fmt: skip


def environment(crash_at=None):
    env = dict(os.environ)
    env.pop("CLUSTERMAC_CRASH_AT", None)
    if crash_at:
        env["CLUSTERMAC_CRASH_AT"] = crash_at
    return env


def run(args, crash_at=None, **kwargs):
    return subprocess.run(args, env=environment(crash_at), capture_output=True, text=True, timeout=TIMEOUT, **kwargs)


def wait_for_holder(output, process):
    """Block until ``process`` holds the lock of ``output`` (its PID is in the lock file)."""
    deadline = time.monotonic() + TIMEOUT
    path = lock_path(Path(output))
    while time.monotonic() < deadline:
        assert process.poll() is None, f"the writer ended early: {process.communicate()}"
        try:
            holder = json.loads(path.read_text() or "{}")
        except (OSError, ValueError):
            holder = {}
        if holder.get("pid") == process.pid:
            return holder
        time.sleep(0.002)
    raise AssertionError("the writer never took the lock")


def files_beside(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def one_line_error(stderr, code_text):
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("clustermac: error:"), stderr
    assert "Traceback" not in stderr and code_text in lines[0]


# --- 1. one writer per output -------------------------------------------------------------------


def test_two_concurrent_extracts_on_one_output(tmp_path, setup):
    model, folder = setup
    reference = tmp_path / "ref" / "d.npy"
    assert run(command(model, folder, reference)).returncode == 0
    out = tmp_path / "out" / "d.npy"
    first = subprocess.Popen(command(model, folder, out, "mac"), env=environment(), stderr=subprocess.PIPE, text=True)
    try:
        holder = wait_for_holder(out, first)
        # extract takes the manifest's lock just after the descriptors' one: stopping the writer
        # between the two would let the d.npz writer below in (seen once in CI).
        wait_for_holder(manifest_path(out), first)
        os.kill(first.pid, signal.SIGSTOP)  # it holds both locks while the others start
        try:
            second = run(command(model, folder, out, "gem"))
            # d.npz shares the manifest d.json: refused as well.
            third = run(command(model, folder, out.with_suffix(".npz"), "gem"))
        finally:
            os.kill(first.pid, signal.SIGCONT)
        assert first.wait(timeout=TIMEOUT) == 0, first.stderr.read()
    finally:
        if first.poll() is None:
            first.kill()
    assert second.returncode == 3 and third.returncode == 3
    one_line_error(second.stderr, f"pid {first.pid}")
    assert "another clustermac process is writing this output" in second.stderr and holder["host"] in second.stderr
    assert not out.with_suffix(".npz").exists()
    # The winner's output is exactly an undisturbed MAC run.
    assert out.read_bytes() == reference.read_bytes()
    assert out.with_suffix(".json").read_bytes() == reference.with_suffix(".json").read_bytes()


def test_fit_whitening_holds_the_lock(tmp_path, setup):
    model, folder = setup
    (folder / "img3b.png").unlink()
    out = tmp_path / "w.npz"
    args = [sys.executable, "-m", "clustermac.cli", "fit-whitening", str(folder), "--out", str(out), "--quiet"]
    args += ["--backbone", str(model), "--method", "mac"]
    with output_lock(out, command="pytest"):
        locked = run(args)
    assert locked.returncode == 3 and not out.exists()
    one_line_error(locked.stderr, f"pid {os.getpid()}")
    assert run(args).returncode == 0 and out.is_file()


# --- 3. and 6. refused before any work ----------------------------------------------------------


@pytest.mark.parametrize(
    "out, extra, message",
    [
        ("x.json", [], "the manifest would be written over the descriptors"),
        ("images/img0.png", [], "would overwrite the input image"),
        ("images", [], "is a directory"),
        ("tiny.onnx", [], "would overwrite the input file"),
        ("tiny.npy", ["--onnx", "tiny.json"], "its manifest"),
    ],
)
def test_colliding_outputs_are_usage_errors(tmp_path, setup, out, extra, message):
    model, folder = setup
    if extra:
        (tmp_path / "tiny.json").write_text("{}")
        extra = ["--onnx", str(tmp_path / extra[1])]
    before = files_beside(tmp_path)
    image = (folder / "img0.png").read_bytes()
    result = run(command(model, folder, tmp_path / out, "mac", *extra))
    assert result.returncode == 2
    one_line_error(result.stderr, message)
    assert files_beside(tmp_path) == before and (folder / "img0.png").read_bytes() == image


def test_fit_whitening_refuses_to_overwrite_an_image(tmp_path, setup):
    model, folder = setup
    args = [sys.executable, "-m", "clustermac.cli", "fit-whitening", str(folder), "--out", str(folder / "img1.png")]
    result = run([*args, "--backbone", str(model)])
    assert result.returncode == 2
    one_line_error(result.stderr, "would overwrite the input image")


@pytest.mark.parametrize(
    "option", [["--max-size", "0"], ["--max-size", "3.5"], ["--pca-dim", "0"], ["--n-clusters", "5", "0"]]
)
def test_a_bad_setting_is_a_usage_error_not_bad_images(tmp_path, setup, option):
    model, folder = setup
    result = run(command(model, folder, tmp_path / "d.npy", "clustermac", *option))
    assert result.returncode == 2 and f"argument {option[0]}: expected an integer >= 1" in result.stderr
    assert not (tmp_path / "d.npy").exists() and not (tmp_path / "d.json").exists()


# --- 8. named crash points; a resume gives the bytes of an uninterrupted run --------------------

# 7 names in chunks of 2: 4 chunks; the clean-up removes 4 records, 4 data files and run.json.
SINGLE_POINTS = (
    [f"extract.chunk_npy:{n}" for n in (1, 2, 3, 4)]
    + [f"extract.chunk_json:{n}" for n in (1, 2, 3, 4)]
    + ["extract.before_npy_rename:1", "extract.after_npy_rename:1", "extract.after_manifest:1"]
    + [f"extract.cleanup:{n}" for n in range(1, 10)]
)
CI_SCENARIOS = [
    ["extract.chunk_npy:1"],
    ["extract.chunk_json:2"],
    ["extract.chunk_npy:4"],
    ["extract.chunk_json:4"],
    ["extract.before_npy_rename:1"],
    ["extract.after_npy_rename:1"],
    ["extract.after_manifest:1"],
    ["extract.cleanup:2"],
    ["extract.cleanup:6"],
    ["extract.chunk_json:1", "extract.before_npy_rename:1"],  # killed again while resuming
]


def scenarios():
    count = int(os.environ.get("CLUSTERMAC_FAULT_POINTS", "10"))
    if count <= len(CI_SCENARIOS):
        return CI_SCENARIOS[:count]
    rng = random.Random(12)
    chosen = [*CI_SCENARIOS, *([p] for p in SINGLE_POINTS if [p] not in CI_SCENARIOS)]
    while len(chosen) < count:
        chosen.append(rng.sample(SINGLE_POINTS, 2))
    return chosen[:count]


def test_crash_points_then_resume_give_the_uninterrupted_bytes(tmp_path, setup):
    model, folder = setup
    reference = tmp_path / "ref" / "d.npy"
    assert run(command(model, folder, reference)).returncode == 0
    expected = (reference.read_bytes(), reference.with_suffix(".json").read_bytes())
    assert json.loads(expected[1])["failed"].keys() == {"img3b.png"}
    for k, crashes in enumerate(scenarios()):
        out = tmp_path / f"run{k}" / "d.npy"
        for i, crash_at in enumerate(crashes):
            killed = run(command(model, folder, out), crash_at=crash_at)
            # A resume may finish before a later crash point is reached (fewer chunks to do).
            allowed = (-signal.SIGKILL,) if i == 0 else (-signal.SIGKILL, 0)
            assert killed.returncode in allowed, (crash_at, killed.stderr)
        resumed = run(command(model, folder, out))
        assert resumed.returncode == 0, (crashes, resumed.stderr)
        assert (out.read_bytes(), out.with_suffix(".json").read_bytes()) == expected, crashes
        # No temporary file, no parts folder: only the pair and the two lock files.
        assert files_beside(out.parent) == [".d.json.lock", ".d.npy.lock", "d.json", "d.npy"], crashes
        vectors, _ = clustermac.load_descriptors(out)
        assert vectors.shape == (6, 512)


# --- 5. Ctrl-C, a full disk, a read-only folder -------------------------------------------------


def previous_output(tmp_path, model, folder):
    out = tmp_path / "out" / "d.npy"
    assert run(command(model, folder, out, "mac")).returncode == 0
    return out, out.read_bytes(), out.with_suffix(".json").read_bytes()


def assert_untouched(out, data, manifest):
    assert out.read_bytes() == data and out.with_suffix(".json").read_bytes() == manifest
    assert not [p for p in out.parent.rglob("*") if p.name.endswith(".tmp")]
    clustermac.load_descriptors(out)


@pytest.mark.parametrize(
    "step, published",
    [("extract.chunk_json:2", False), ("extract.before_npy_rename:1", True), ("extract.after_manifest:1", True)],
)
def test_ctrl_c_cleans_up_and_never_leaves_a_mixed_pair(tmp_path, setup, step, published):
    """Ctrl-C (SIGINT at a named step): exit 130 with one line, no temporary file, and either the
    previous pair untouched or, once publishing has begun, the whole new pair (Ctrl-C waits for
    the two renames); the same command then finishes from the finished chunks."""
    model, folder = setup
    out, data, manifest = previous_output(tmp_path, model, folder)
    reference = tmp_path / "ref" / "d.npy"
    assert run(command(model, folder, reference, "gem")).returncode == 0
    interrupted = run(command(model, folder, out, "gem"), crash_at=f"{step}:INT")
    assert interrupted.returncode == 130, interrupted.stderr
    assert interrupted.stderr.strip() == "clustermac: interrupted"
    assert not [p for p in out.parent.rglob("*") if p.name.endswith(".tmp")]
    if published:
        assert out.read_bytes() == reference.read_bytes()
        assert out.with_suffix(".json").read_bytes() == reference.with_suffix(".json").read_bytes()
    else:
        assert_untouched(out, data, manifest)
    assert run(command(model, folder, out, "gem")).returncode == 0
    assert out.read_bytes() == reference.read_bytes()
    assert files_beside(out.parent) == [".d.json.lock", ".d.npy.lock", "d.json", "d.npy"]


def test_a_full_disk_is_a_clear_error_and_keeps_the_previous_output(tmp_path, setup):
    model, folder = setup
    out, data, manifest = previous_output(tmp_path, model, folder)
    # Files may grow to 8000 bytes: the chunks (2 x 512 floats) fit, the 6-row result does not.
    # Python ignores SIGXFSZ, so the write fails with EFBIG as it would with ENOSPC.
    limit = 8000

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    full = run(command(model, folder, out, "gem"), preexec_fn=small_files)
    assert full.returncode == 2
    one_line_error(full.stderr, "cannot write the descriptors (File too large)")
    assert str(out) in full.stderr
    assert_untouched(out, data, manifest)
    # Space again: the same command finishes from the finished chunks.
    assert run(command(model, folder, out, "gem")).returncode == 0
    assert clustermac.load_descriptors(out)[1]["settings"]["method"] == "gem"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_output_folder_is_a_clear_error(tmp_path, setup):
    model, folder = setup
    out, data, manifest = previous_output(tmp_path, model, folder)
    os.chmod(out.parent, 0o555)
    try:
        result = run(command(model, folder, out, "gem"))
    finally:
        os.chmod(out.parent, 0o755)
    assert result.returncode == 2
    one_line_error(result.stderr, "Permission denied")
    assert_untouched(out, data, manifest)
