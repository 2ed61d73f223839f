"""Exact search's "auto" choices cached on disk per kind of CPU (clustermac.search.path_cache).

The choices are process-wide, so every case runs in fresh child interpreters sharing a cache folder.
"""

import json

import numpy as np
import pytest

from clustermac import _core
from clustermac.kernels import kernel_record

# A child: searches an index of 3,000 rows (k = 5 <= N/8, so "auto" times its paths) with
# QUERIES queries and prints what "auto" had chosen before and after, and a digest of the result.
CHILD = """
import hashlib, json, sys
import numpy as np
import clustermac
from clustermac import _core
from clustermac.search import path_cache
rng = np.random.default_rng(0)
vectors = rng.standard_normal((3000, 64)).astype(np.float32)
index = clustermac.Index(64)
index.add(vectors, [str(i) for i in range(3000)])
queries = vectors[:QUERIES] + 0.01
before = dict(_core.auto_search_paths())
path_cache.use_cached_choices()
preset = dict(_core.auto_search_paths())
scores, indices = index.search(queries, 5)
digest = hashlib.sha256(scores.tobytes() + indices.tobytes()).hexdigest()
print(json.dumps({"before": before, "preset": preset, "after": dict(_core.auto_search_paths()), "digest": digest}))
"""


def _child(run_python, cache, queries=1, env=None):
    run = run_python(CHILD.replace("QUERIES", str(queries)), env={"CLUSTERMAC_CACHE": str(cache), **(env or {})})
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout.strip().splitlines()[-1])


def _key():
    return json.dumps(kernel_record(), sort_keys=True)


def _has_bf16() -> bool:
    try:
        _core.topk_search(np.ones((8, 4), np.float32), np.ones((1, 4), np.float32), 1, path="bf16")
    except ValueError:
        return False
    return True


def test_a_second_process_takes_the_first_ones_choice_without_timing(tmp_path, run_python):
    first = _child(run_python, tmp_path)
    assert first["before"] == first["preset"] == {} and set(first["after"]) == {"1"}
    cached = json.loads((tmp_path / "search-paths.json").read_text())
    assert cached == {"version": 1, "choices": {_key(): first["after"]}}
    second = _child(run_python, tmp_path)
    assert second["before"] == {} and second["preset"] == first["after"]  # chosen before any search: no timing
    assert second["digest"] == first["digest"]
    # Another batch size is timed and added beside the first.
    third = _child(run_python, tmp_path, queries=3)
    assert third["preset"] == first["after"] and set(third["after"]) == {"1", "3"}
    assert json.loads((tmp_path / "search-paths.json").read_text())["choices"][_key()] == third["after"]


def test_every_cached_path_gives_the_same_bits(tmp_path, run_python):
    digests = {}
    for path in ("float32", "f32scan"):
        cache = tmp_path / path
        cache.mkdir()
        (cache / "search-paths.json").write_text(json.dumps({"version": 1, "choices": {_key(): {"1": path}}}))
        result = _child(run_python, cache)
        assert result["preset"] == {"1": path}
        digests[path] = result["digest"]
    assert digests["float32"] == digests["f32scan"]


@pytest.mark.parametrize(
    "content",
    [
        b"not json",
        b'{"version": 99, "choices": {}}',
        b'{"version": 1, "choices": []}',
        b"[1, 2]",
    ],
)
def test_a_malformed_cache_is_ignored_and_replaced(tmp_path, run_python, content):
    (tmp_path / "search-paths.json").write_bytes(content)
    result = _child(run_python, tmp_path)
    assert result["preset"] == {} and set(result["after"]) == {"1"}
    assert json.loads((tmp_path / "search-paths.json").read_text())["choices"][_key()] == result["after"]


def test_choices_this_cpu_cannot_take_are_skipped(tmp_path, run_python):
    choices = {"more": "f32scan", "2": "no-such-path", "99": "float32", "1": "float32"}
    if not _has_bf16():
        choices["3"] = "bf16"
    (tmp_path / "search-paths.json").write_text(json.dumps({"version": 1, "choices": {_key(): choices}}))
    assert _child(run_python, tmp_path)["preset"] == {"1": "float32"}
    # Another kind of CPU's choices (another key) are not taken.
    other = json.dumps({**kernel_record(), "cpu": "another CPU"}, sort_keys=True)
    (tmp_path / "search-paths.json").write_text(json.dumps({"version": 1, "choices": {other: {"1": "float32"}}}))
    assert _child(run_python, tmp_path)["preset"] == {}


def test_a_cache_that_cannot_be_written_only_costs_the_timing(tmp_path, run_python):
    blocker = tmp_path / "a-file"
    blocker.write_text("the cache folder would be inside this file")
    result = _child(run_python, blocker / "cache")
    assert set(result["after"]) == {"1"} and not (blocker / "cache").exists()


def test_preset_keeps_a_choice_already_made_in_the_process(run_python):
    run = run_python(
        """
        from clustermac import _core
        assert _core.preset_auto_search_paths({"1": "float32"}) == ["1"]
        assert _core.preset_auto_search_paths({"1": "f32scan"}) == ["1"]  # accepted, but "1" is already chosen
        print(_core.auto_search_paths())
        """
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "{'1': 'float32'}"


def test_the_in_process_functions_check_their_input():
    with pytest.raises(TypeError):
        _core.preset_auto_search_paths(["1", "float32"])
    assert _core.preset_auto_search_paths({}) == []
    assert isinstance(_core.auto_search_paths(), dict)
