"""Fuzz every file loader: malformed files made from a valid one (seeded truncations, byte
flips, forged header fields, forged JSON / pickle content) must raise CorruptFileError (or the
loader's documented exception) and nothing else; a load that succeeds must give an object that
can be used without reading out of bounds.

All cases of one loader run in ONE subprocess (a crash, e.g. a segfault inside FAISS, shows as
its exit code; the seed is printed). CLUSTERMAC_FUZZ_CASES raises the number of cases per loader
(default 1000), CLUSTERMAC_FUZZ_SEED changes the seed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

CASES = int(os.environ.get("CLUSTERMAC_FUZZ_CASES", "1000"))
SEED = int(os.environ.get("CLUSTERMAC_FUZZ_SEED", "20261203"))
DATA = Path(__file__).resolve().parent / "data" / "v0.1.0"
TIMEOUT = 300

FUZZER = r'''
import copy, hashlib, json, os, pickle, random, resource, shutil, sys, tempfile, traceback
from pathlib import Path

import numpy as np

# Address space capped: a forged size that slipped through would be a MemoryError (an escape,
# reported) instead of swapping the machine.
resource.setrlimit(resource.RLIMIT_AS, (16 << 30, 16 << 30))

import clustermac as cm
from clustermac import CorruptFileError
from clustermac.bench.datasets import DatasetNotFoundError, load_classic, load_revisited
from clustermac.descriptors.whitening import load_whitening_file, save_whitening_file

LOADER, SEED, CASES, DATA = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
rng = random.Random(SEED)
work = Path(tempfile.mkdtemp(prefix="cm-fuzz-"))
EXTREMES = [0, 1, 0x7F, 0xFF, 2**15, 2**31 - 1, 2**31, 2**32 - 1, 2**40, 2**62, 2**63 - 1, 2**64 - 1]
JSON_VALUES = [None, -1, 0, 1, 7, 2**70, 1e308, -1e308, 3.5, float("nan"), "", "x", "\u00e9\u0000", [], {},
               [1, 2], ["a", 1], {"a": 1}, True, False]


def mutate_bytes(data: bytes, header: int = 128) -> bytes:
    kind = rng.randrange(4)
    if kind == 0 or not data:
        return data[: rng.randrange(len(data))] if data else b""
    out = bytearray(data)
    if kind == 1:
        for _ in range(rng.choice([1, 1, 2, 4, 16])):
            out[rng.randrange(len(out))] ^= rng.randrange(1, 256)
        return bytes(out)
    width = rng.choice([1, 2, 4, 8])
    limit = min(len(out), header) if kind == 2 else len(out)
    position = rng.randrange(limit)
    value = rng.choice(EXTREMES) & ((1 << (8 * width)) - 1)
    out[position : position + width] = value.to_bytes(width, "little")[: len(out) - position]
    return bytes(out)


def forge(obj, depth=0):
    """A copy of a JSON-like object with one value replaced, removed or added."""
    obj = copy.deepcopy(obj)
    holder, key = None, None
    node = obj
    while isinstance(node, (dict, list)) and node and rng.random() < 0.7:
        holder = node
        key = rng.choice(list(node)) if isinstance(node, dict) else rng.randrange(len(node))
        node = node[key]
    if holder is None:
        return rng.choice(JSON_VALUES) if rng.random() < 0.3 else obj
    action = rng.randrange(3)
    if action == 0:
        holder[key] = rng.choice(JSON_VALUES)
    elif action == 1:
        del holder[key]
    elif isinstance(holder, dict):
        holder[rng.choice(["x", "count", "dim", "files", "version", "easy"])] = rng.choice(JSON_VALUES)
    else:
        holder.append(rng.choice(JSON_VALUES))
    return obj


def forge_json_bytes(data: bytes) -> bytes:
    try:
        return json.dumps(forge(json.loads(data))).encode()
    except ValueError:
        return mutate_bytes(data)


def sha(data: bytes) -> dict:
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


# ------------------------------------------------------------------ one valid file per loader
def make_index(backend: str, legacy: bool) -> Path:
    folder = work / "index"
    if legacy:
        shutil.copytree(DATA / ("faiss.index" if backend == "faiss" else "exact.index"), folder)
        (folder / "clustermac.json").write_text(json.dumps({"settings": {"method": "rmac"}, "image_root": None}))
        return folder
    vectors = cm.l2_normalize(np.random.default_rng(1).standard_normal((12, 8)).astype(np.float32))
    index = cm.Index(8, backend, faiss_factory="SQ8") if backend == "faiss" else cm.Index(8)
    index.add(vectors, [f"img{i}" for i in range(12)])
    index.save(folder, info={"settings": {"method": "gem"}})
    return folder


def fuzz_index(backend: str, legacy: bool):
    folder = make_index(backend, legacy)
    root = folder if legacy else folder / (folder / "CURRENT").read_text()
    files = sorted(p for p in root.iterdir() if p.is_file())
    if not legacy:
        files.append(folder / "CURRENT")
    original = {p: p.read_bytes() for p in files}
    meta_file = root / "meta.json"

    def case():
        target = rng.choice(files)
        data = original[target]
        changed = forge_json_bytes(data) if target.suffix == ".json" and rng.random() < 0.5 else mutate_bytes(data)
        target.write_bytes(changed)
        data_file = target.name in ("names.json", "vectors.npy", "faiss.index", "clustermac.json")
        if not legacy and data_file and rng.random() < 0.5:
            meta = json.loads(original[meta_file])  # a forger who also fixes the checksum
            meta["files"][target.name] = sha(changed)
            meta_file.write_bytes(json.dumps(meta).encode())
        try:
            index = cm.Index.load(folder, mmap=rng.random() < 0.5)
            if len(index):
                index.search(np.ones(index.dim, np.float32), k=3)
                if index.backend == "exact":
                    index.vectors([len(index) - 1])
            return "loaded"
        finally:
            for path, content in original.items():
                path.write_bytes(content)

    return case


def fuzz_store():
    path = work / "maps.cmfm"
    rng_np = np.random.default_rng(2)
    with cm.FeatureMapStoreWriter(path) as writer:
        for i in range(4):
            writer.add(rng_np.random((6, 3, 4)).astype(np.float32), f"m{i}", labels=[rng_np.integers(-1, 3, (3, 4))])
    original = path.read_bytes()
    table = int.from_bytes(original[8:16], "little")
    legacy = DATA / "maps.cmfm"

    def case():
        source = original if rng.random() < 0.8 else legacy.read_bytes()
        start = table if source is original else int.from_bytes(source[8:16], "little")
        if rng.random() < 0.5:  # forge a field of the preamble or the table
            out = bytearray(source)
            position = rng.choice([0, 8, 16]) if rng.random() < 0.3 else rng.randrange(start, len(out))
            width = rng.choice([1, 2, 4, 8])
            value = rng.choice(EXTREMES) & ((1 << (8 * width)) - 1)
            out[position : position + width] = value.to_bytes(width, "little")[: len(out) - position]
            data = bytes(out)
        else:
            data = mutate_bytes(source, header=64)
        file = work / "case.cmfm"
        file.write_bytes(data)
        store = cm.FeatureMapStore(file)
        for i in range(len(store)):
            int(store.codes(i).sum())
            store.labels(i)
            store.feature_map(i)
            store.scale(i)
        del store
        return "loaded"

    return case


def fuzz_whitening():
    path = work / "w.npz"
    settings = {"method": "gem", "feature_dim": 8}
    arrays = {"mean": np.arange(8, dtype=np.float32), "projection": np.eye(3, 8, dtype=np.float32)}
    save_whitening_file(path, arrays, settings)
    original = path.read_bytes()
    legacy = sorted(DATA.glob("whitening_*.npz"))

    def structured():
        contents = {k: v.copy() for k, v in arrays.items()}
        meta = {"format_version": 1, "settings": settings}
        action = rng.randrange(6)
        if action == 0:
            meta = forge(meta)
        elif action == 1:
            key = rng.choice(list(contents))
            contents[key] = contents[key].astype(rng.choice([np.float64, np.int32, np.float16, np.uint8]))
        elif action == 2:
            key = rng.choice(list(contents))
            contents[key] = contents[key].reshape(-1)[: rng.randrange(contents[key].size + 1)]
        elif action == 3:
            del contents[rng.choice(list(contents))]
        elif action == 4:
            contents[rng.choice(list(contents))].flat[0] = rng.choice([np.nan, np.inf, 0.0])
        else:
            contents["projection"][:] = 0
        import io
        buffer = io.BytesIO()
        np.savez(buffer, **contents, meta=np.frombuffer(json.dumps(meta).encode(), np.uint8))
        return buffer.getvalue()

    def case():
        roll = rng.random()
        if roll < 0.25:
            data = structured()
        else:
            data = mutate_bytes(original if roll < 0.8 else rng.choice(legacy).read_bytes())
        file = work / "case.npz"
        file.write_bytes(data)
        try:
            load_whitening_file(file, settings)
        except ValueError as error:
            if isinstance(error, CorruptFileError) or "learned for other settings" not in str(error):
                raise
            return "documented"
        return "loaded"

    return case


def fuzz_pickle():
    images = [f"db_{i:02d}" for i in range(20)]
    queries = ["q_a", "q_b"]
    (work / "jpg").mkdir()
    for name in images + queries:
        (work / "jpg" / f"{name}.jpg").write_bytes(b"")
    shared = [0, 1, 2]
    content = {
        "imlist": images,
        "qimlist": queries,
        "gnd": [
            {"bbx": [1, 2, 30, 40], "easy": shared, "hard": [5, 6], "junk": [9]},
            {"bbx": None, "easy": shared, "hard": [], "junk": [10, 11]},
        ],
    }
    original = pickle.dumps(content, protocol=4)

    def case():
        if rng.random() < 0.4:
            data = pickle.dumps(forge(content), protocol=rng.choice([2, 4]))
        else:
            data = mutate_bytes(original)
        file = work / "gnd_case.pkl"
        file.write_bytes(data)
        try:
            load_revisited(file, work / "jpg")
        except DatasetNotFoundError:
            return "documented"
        return "loaded"

    return case


def fuzz_txt():
    (work / "jpg").mkdir()
    for name in ["a_1", "a_2", "a_3", "b_1"]:
        (work / "jpg" / f"{name}.jpg").write_bytes(b"")
    gt = work / "gt"
    gt.mkdir()
    files = {
        "toy_imlist.txt": "a_1\na_2\na_3\nb_1\n",
        "a_1_query.txt": "a_1 1 2 30.5 40\n",
        "a_1_good.txt": "a_2\n",
        "a_1_ok.txt": "a_3\n",
        "a_1_junk.txt": "b_1\n",
        "b_1_query.txt": "b_1\n",
        "b_1_good.txt": "a_1\n",
        "b_1_ok.txt": "",
        "b_1_junk.txt": "",
    }
    for name, text in files.items():
        (gt / name).write_text(text)

    def case():
        name = rng.choice(list(files))
        data = files[name].encode()
        if rng.random() < 0.3:
            tokens = ["a_1", "a_2", "zz", "1", "-1e309", "nan", "2", "\u00e9", "\t", " ", "\n", "1e400", "0x10"]
            lines = data.decode().splitlines() + [" ".join(rng.choice(tokens) for _ in range(rng.randrange(6)))]
            rng.shuffle(lines)
            data = "\n".join(lines).encode()
        else:
            data = mutate_bytes(data + b"\n" if not data else data)
        (gt / name).write_bytes(data)
        try:
            load_classic(gt, work / "jpg", "toy")
        except DatasetNotFoundError:
            return "documented"
        finally:
            (gt / name).write_text(files[name])
        return "loaded"

    return case


MAKERS = {
    "index-exact": lambda: fuzz_index("exact", legacy=False),
    "index-faiss": lambda: fuzz_index("faiss", legacy=False),
    "index-exact-0.1.0": lambda: fuzz_index("exact", legacy=True),
    "index-faiss-0.1.0": lambda: fuzz_index("faiss", legacy=True),
    "feature-map-store": fuzz_store,
    "whitening": fuzz_whitening,
    "ground-truth-pkl": fuzz_pickle,
    "ground-truth-txt": fuzz_txt,
}
print(f"fuzzing {LOADER}: seed {SEED}, {CASES} cases", flush=True)
case = MAKERS[LOADER]()
outcomes = {}
for number in range(CASES):
    try:
        outcome = case()
    except CorruptFileError:
        outcome = "CorruptFileError"
    except BaseException as error:
        print(f"case {number} (seed {SEED}): {type(error).__name__} escaped: {error}", flush=True)
        traceback.print_exc()
        sys.exit(1)
    outcomes[outcome] = outcomes.get(outcome, 0) + 1
print(f"{LOADER}: {outcomes}", flush=True)
shutil.rmtree(work, ignore_errors=True)
'''

LOADERS = [
    "index-exact",
    "index-faiss",
    "index-exact-0.1.0",
    "index-faiss-0.1.0",
    "feature-map-store",
    "whitening",
    "ground-truth-pkl",
    "ground-truth-txt",
]


@pytest.mark.parametrize("loader", LOADERS)
def test_malformed_files_raise_only_our_errors(loader, tmp_path):
    if loader.startswith("index-faiss"):
        pytest.importorskip("faiss")
    script = tmp_path / "fuzz.py"
    script.write_text(FUZZER)
    result = subprocess.run(
        [sys.executable, str(script), loader, str(SEED), str(CASES), str(DATA)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env={**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)},
    )
    report = f"seed {SEED}, exit code {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    assert result.returncode == 0, report
    # Most cases are refused, and the fuzzer really reached the loader (not only one outcome).
    counts = result.stdout.strip().splitlines()[-1]
    assert "CorruptFileError" in counts, report
