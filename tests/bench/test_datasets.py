"""Tests of clustermac.datasets on fixture folders written here in both ground-truth formats."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from clustermac import compute_map, revisited_map
from clustermac.bench.datasets import (
    DatasetNotFoundError,
    RetrievalDataset,
    load_classic,
    load_dataset,
    load_revisited,
    read_distractor_list,
    write_classic,
    write_revisited,
)


def touch_images(folder: Path, names, extension=".jpg") -> None:
    """Empty files stand in for images: the loaders only look at names."""
    for name in names:
        path = folder / (name + extension)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")


def write_lines(path: Path, lines) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{line}\n" for line in lines))


OXFORD_IMAGES = [f"all_souls_{i:06d}" for i in range(1, 7)] + [f"radcliffe_camera_{i:06d}" for i in range(1, 5)]


@pytest.fixture
def oxford_root(tmp_path: Path) -> Path:
    """A tiny Oxford-style folder: jpg/ + gt_files_170407/, query names with oxc1_."""
    root = tmp_path / "oxford5k"
    touch_images(root / "jpg", OXFORD_IMAGES)
    gt = root / "gt_files_170407"
    queries = {
        ("all_souls", 1): ("oxc1_all_souls_000001 136.5 34.1 648.5 955.7", [2, 3], [4], [5]),
        ("all_souls", 2): ("oxc1_all_souls_000002 1 2 30 40", [1], [], [6]),
        ("all_souls", 10): ("oxc1_all_souls_000003 0 0 10.25 20", [4], [5], []),
        ("radcliffe_camera", 1): ("oxc1_radcliffe_camera_000001 5 6 7 8", [], [2, 3], [1]),
    }
    for (landmark, number), (query_line, good, ok, junk) in queries.items():
        stem = gt / f"{landmark}_{number}"
        write_lines(Path(f"{stem}_query.txt"), [query_line])
        prefix = "all_souls" if landmark == "all_souls" else "radcliffe_camera"
        for kind, numbers in (("good", good), ("ok", ok), ("junk", junk)):
            write_lines(Path(f"{stem}_{kind}.txt"), [f"{prefix}_{n:06d}" for n in numbers])
    return root


def test_load_classic_oxford(oxford_root: Path):
    dataset = load_classic(oxford_root / "gt_files_170407", oxford_root / "jpg", "oxford5k")
    assert dataset.name == "oxford5k"
    assert dataset.images == sorted(OXFORD_IMAGES)
    # Ordered by landmark, then numerically: all_souls_1, _2, _10, radcliffe_camera_1.
    assert dataset.queries == ["all_souls_000001", "all_souls_000002", "all_souls_000003", "radcliffe_camera_000001"]
    assert dataset.query_landmarks == ["all_souls", "all_souls", "all_souls", "radcliffe_camera"]
    assert dataset.query_boxes[0] == (136.5, 34.1, 648.5, 955.7)
    assert dataset.query_boxes[2] == (0.0, 0.0, 10.25, 20.0)
    index = {name: i for i, name in enumerate(dataset.images)}
    assert dataset.gnd[0] == {
        "ok": sorted([index["all_souls_000002"], index["all_souls_000003"], index["all_souls_000004"]]),
        "junk": [index["all_souls_000005"]],
    }
    assert dataset.gnd[3] == {
        "ok": [index["radcliffe_camera_000002"], index["radcliffe_camera_000003"]],
        "junk": [index["radcliffe_camera_000001"]],
    }
    assert not dataset.has_revisited
    assert dataset.classic_gnd() == dataset.gnd
    assert dataset.image_path(0) == oxford_root / "jpg" / (dataset.images[0] + ".jpg")
    assert dataset.query_path(3) == oxford_root / "jpg" / "radcliffe_camera_000001.jpg"
    with pytest.raises(ValueError, match="no Easy/Hard split"):
        dataset.revisited_gnd()
    with pytest.raises(ValueError, match="out of range"):
        dataset.image_path(len(dataset.images))


def test_load_classic_paris_subfolders_and_imlist(tmp_path: Path):
    """Paris keeps images in per-landmark sub-folders and has no oxc1_ prefix; an imlist fixes order."""
    image_dir = tmp_path / "paris"
    touch_images(image_dir / "defense", ["paris_defense_000001", "paris_defense_000002"])
    touch_images(image_dir / "eiffel", ["paris_eiffel_000001", "paris_eiffel_000002"])
    (image_dir / "eiffel" / "notes.txt").write_text("not an image")
    gt = tmp_path / "gt"
    write_lines(gt / "eiffel_1_query.txt", ["paris_eiffel_000001 1 2 3 4"])
    write_lines(gt / "eiffel_1_good.txt", ["", "paris_eiffel_000002", ""])  # blank lines are skipped
    write_lines(gt / "eiffel_1_ok.txt", [])
    write_lines(gt / "eiffel_1_junk.txt", ["paris_defense_000002"])
    dataset = load_classic(gt, image_dir, "paris6k")
    assert dataset.images == [
        "paris_defense_000001",
        "paris_defense_000002",
        "paris_eiffel_000001",
        "paris_eiffel_000002",
    ]
    assert dataset.gnd == [{"ok": [3], "junk": [1]}]
    assert dataset.image_path(3) == image_dir / "eiffel" / "paris_eiffel_000002.jpg"
    assert dataset.query_path(0) == image_dir / "eiffel" / "paris_eiffel_000001.jpg"

    order = ["paris_eiffel_000002", "paris_defense_000002", "paris_eiffel_000001"]
    write_lines(gt / "paris6k_imlist.txt", order)
    dataset = load_classic(gt, image_dir, "paris6k")
    assert dataset.images == order
    assert dataset.gnd == [{"ok": [0], "junk": [1]}]


@pytest.mark.parametrize(
    "file_name, lines, message",
    [
        ("all_souls_1_query.txt", ["oxc1_all_souls_000001 1 2 3"], r"all_souls_1_query\.txt: line 1: .*3 numbers"),
        ("all_souls_1_query.txt", ["oxc1_all_souls_000001 1 2 x 4"], r"all_souls_1_query\.txt: line 1: .*non-numeric"),
        ("all_souls_1_query.txt", ["oxc1_all_souls_000001 5 2 3 4"], r"all_souls_1_query\.txt: line 1: .*x1 < x2"),
        ("all_souls_1_query.txt", ["oxc1_all_souls_000001 1 2 nan 4"], r"all_souls_1_query\.txt: line 1"),
        ("all_souls_1_query.txt", ["oxc1_all_souls_000999 1 2 3 4"], r"all_souls_1_query\.txt: line 1: no image"),
        ("all_souls_1_query.txt", ["oxc1_all_souls_000001 1 2 3 4", "x 1 2 3 4"], r"all_souls_1_query\.txt: line 2"),
        ("all_souls_1_query.txt", [], r"all_souls_1_query\.txt: line 1: expected exactly one line"),
        (
            "all_souls_1_good.txt",
            ["all_souls_000002", "all_souls_000999"],
            r"all_souls_1_good\.txt: line 2: .*not a database image",
        ),
        (
            "all_souls_1_good.txt",
            ["all_souls_000002 all_souls_000003"],
            r"all_souls_1_good\.txt: line 1: .*one image name",
        ),
        ("all_souls_1_junk.txt", ["all_souls_000002"], r"all_souls_1_junk\.txt: line 1: .*both positive and junk"),
    ],
)
def test_load_classic_malformed_files(oxford_root: Path, file_name, lines, message):
    write_lines(oxford_root / "gt_files_170407" / file_name, lines)
    with pytest.raises(ValueError, match=message):
        load_classic(oxford_root / "gt_files_170407", oxford_root / "jpg", "oxford5k")


def test_load_classic_missing_pieces(oxford_root: Path):
    gt, jpg = oxford_root / "gt_files_170407", oxford_root / "jpg"
    (gt / "all_souls_2_ok.txt").unlink()
    with pytest.raises(ValueError, match=r"all_souls_2_ok\.txt"):
        load_classic(gt, jpg, "oxford5k")
    write_lines(gt / "all_souls_2_ok.txt", [])
    write_lines(gt / "oxford5k_imlist.txt", ["all_souls_000001", "all_souls_000404"])
    with pytest.raises(ValueError, match=r"oxford5k_imlist\.txt: line 2: no image named 'all_souls_000404'"):
        load_classic(gt, jpg, "oxford5k")
    write_lines(gt / "oxford5k_imlist.txt", ["all_souls_000001", "all_souls_000002", "all_souls_000001"])
    with pytest.raises(ValueError, match=r"oxford5k_imlist\.txt: line 3: .*already listed on line 1"):
        load_classic(gt, jpg, "oxford5k")
    (gt / "oxford5k_imlist.txt").unlink()
    with pytest.raises(DatasetNotFoundError, match="not a folder"):
        load_classic(gt, oxford_root / "nowhere", "oxford5k")
    empty = oxford_root / "empty"
    empty.mkdir()
    with pytest.raises(DatasetNotFoundError, match="no ground-truth files"):
        load_classic(empty, jpg, "oxford5k")


def test_load_classic_skip_missing(oxford_root: Path):
    gt = oxford_root / "gt_files_170407"
    write_lines(gt / "all_souls_2_junk.txt", ["all_souls_000006", "all_souls_000777"])
    dataset = load_classic(gt, oxford_root / "jpg", "oxford5k", skip_missing=True)
    assert dataset.gnd[1]["junk"] == [dataset.images.index("all_souls_000006")]


# --- revisited pickles ----------------------------------------------------------------------


REVISITED_IMAGES = [f"db_{i:03d}" for i in range(8)]


def revisited_content():
    return {
        "imlist": list(REVISITED_IMAGES),
        "qimlist": ["query_a", "query_b"],
        "gnd": [
            {"bbx": [1.0, 2.0, 30.5, 40.0], "easy": [0, 3], "hard": [5], "junk": [7]},
            {"bbx": [0, 0, 5, 5], "easy": [], "hard": [1, 2], "junk": []},
        ],
    }


@pytest.fixture
def revisited_root(tmp_path: Path) -> Path:
    root = tmp_path / "rtoy"
    touch_images(root / "jpg", REVISITED_IMAGES + ["query_a", "query_b"])
    (root / "gnd_rtoy.pkl").write_bytes(pickle.dumps(revisited_content(), protocol=2))
    return root


def test_load_revisited(revisited_root: Path):
    dataset = load_revisited(revisited_root / "gnd_rtoy.pkl", revisited_root / "jpg")
    assert dataset.name == "rtoy"
    assert dataset.images == REVISITED_IMAGES and dataset.queries == ["query_a", "query_b"]
    assert dataset.query_boxes == [(1.0, 2.0, 30.5, 40.0), (0.0, 0.0, 5.0, 5.0)]
    assert dataset.has_revisited
    assert dataset.revisited_gnd()[0] == {"easy": [0, 3], "hard": [5], "junk": [7], "bbx": (1.0, 2.0, 30.5, 40.0)}
    assert dataset.classic_gnd() == [{"ok": [0, 3, 5], "junk": [7]}, {"ok": [1, 2], "junk": []}]
    assert dataset.query_path(1) == revisited_root / "jpg" / "query_b.jpg"


def test_load_classic_style_pickle(revisited_root: Path):
    """Classic ground truth in a pickle ('ok'/'junk', no 'bbx'; names with extensions)."""
    content = {
        "imlist": [name + ".jpg" for name in REVISITED_IMAGES],
        "qimlist": ["query_a.jpg", "query_b"],
        "gnd": [{"ok": [4, 1], "junk": [2]}, {"ok": [0]}],
    }
    path = revisited_root / "gnd_toy5k.pkl"
    path.write_bytes(pickle.dumps(content))
    dataset = load_revisited(path, revisited_root / "jpg")
    assert dataset.name == "toy5k" and not dataset.has_revisited
    assert dataset.images == REVISITED_IMAGES and dataset.queries == ["query_a", "query_b"]
    assert dataset.gnd == [{"ok": [1, 4], "junk": [2]}, {"ok": [0], "junk": []}]
    assert dataset.query_boxes == [None, None]


def test_classic_and_revisited_views_give_same_medium_map(revisited_root: Path):
    dataset = load_revisited(revisited_root / "gnd_rtoy.pkl", revisited_root / "jpg")
    ranks = np.stack([np.random.default_rng(q).permutation(len(dataset.images)) for q in range(2)], axis=1)
    assert compute_map(ranks, dataset.classic_gnd())[0] == pytest.approx(
        revisited_map(ranks, dataset.revisited_gnd())["medium"]["map"]
    )


def malformed(change):
    content = revisited_content()
    change(content)
    return content


@pytest.mark.parametrize(
    "content, message",
    [
        (malformed(lambda c: c["gnd"][1].pop("easy")), r"\['gnd'\]\[1\] lacks \['easy'\]"),
        (malformed(lambda c: c["gnd"][0]["hard"].append(8)), r"\['gnd'\]\[0\]\['hard'\]: index 8 is out of range"),
        (malformed(lambda c: c["gnd"][0]["hard"].append(-1)), r"\['gnd'\]\[0\]\['hard'\]: index -1 is out of range"),
        (malformed(lambda c: c["gnd"][0].update(bbx=[1, 2, 3])), r"\['gnd'\]\[0\]\['bbx'\]"),
        (malformed(lambda c: c["gnd"][0].update(junk=[0])), r"gnd\[0\]: image 0 is in both"),
        (malformed(lambda c: c["gnd"].pop()), r"\['gnd'\] has 1 entries; expected a list of 2"),
        (malformed(lambda c: c.pop("qimlist")), r"lacks the key\(s\) \['qimlist'\]"),
        (malformed(lambda c: c["imlist"].append(3)), r"\['imlist'\]\[8\] = 3"),
        (malformed(lambda c: c["gnd"][0].update(easy="0 3")), r"\['easy'\]: expected a list"),
        ([1, 2, 3], "expected a dict"),
    ],
)
def test_load_revisited_malformed(revisited_root: Path, content, message):
    path = revisited_root / "gnd_rtoy.pkl"
    path.write_bytes(pickle.dumps(content))
    with pytest.raises(ValueError, match=message) as error:
        load_revisited(path, revisited_root / "jpg")
    assert str(path) in str(error.value)


class RunsCommand:
    """Pickles as a call to os.system: loading it with pickle.load would run the command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_load_revisited_refuses_code_and_classes(revisited_root: Path, tmp_path: Path):
    path = revisited_root / "gnd_rtoy.pkl"
    marker = tmp_path / "command_ran"
    content = revisited_content()
    content["gnd"][0]["bbx"] = RunsCommand(marker)
    path.write_bytes(pickle.dumps(content))
    with pytest.raises(ValueError, match=r"refused to load: the pickle references (posix|os|nt)\.system"):
        load_revisited(path, revisited_root / "jpg")
    assert not marker.exists()

    content = revisited_content()
    content["gnd"][0]["easy"] = np.array([0, 3])
    path.write_bytes(pickle.dumps(content))
    with pytest.raises(ValueError, match=r"refused to load.*numpy.*NumPy arrays"):
        load_revisited(path, revisited_root / "jpg")

    content = revisited_content()
    content["extra"] = Path("x")
    path.write_bytes(pickle.dumps(content))
    with pytest.raises(ValueError, match="refused to load: the pickle references pathlib"):
        load_revisited(path, revisited_root / "jpg")


def test_load_revisited_broken_files(revisited_root: Path):
    path = revisited_root / "gnd_rtoy.pkl"
    whole = pickle.dumps(revisited_content())
    for data in (whole[: len(whole) // 2], b"not a pickle at all", b""):
        path.write_bytes(data)
        with pytest.raises(ValueError, match="not a readable pickle"):
            load_revisited(path, revisited_root / "jpg")
    path.write_bytes(whole)
    (revisited_root / "jpg" / "db_004.jpg").unlink()
    with pytest.raises(DatasetNotFoundError, match=r"1 image\(s\) .* missing, e\.g\. db_004\.jpg"):
        load_revisited(path, revisited_root / "jpg")


# --- layout detection -----------------------------------------------------------------------


def test_load_dataset_detects_layouts(oxford_root: Path, revisited_root: Path, tmp_path: Path):
    assert load_dataset(revisited_root).name == "rtoy"
    assert load_dataset(revisited_root, "rtoy").has_revisited
    assert load_dataset(revisited_root.parent, "rtoy").name == "rtoy"  # revisitop's parent folder
    classic = load_dataset(oxford_root)
    assert classic.name == "oxford5k" and len(classic.queries) == 4

    # gt/ + oxbuild_images/; then the *_query.txt files directly in the root.
    other = tmp_path / "other"
    other.mkdir()
    (oxford_root / "jpg").rename(other / "oxbuild_images")
    (oxford_root / "gt_files_170407").rename(other / "gt")
    assert load_dataset(other, "oxford5k").queries == classic.queries
    for path in (other / "gt").iterdir():
        path.rename(other / path.name)
    assert load_dataset(other, "oxford5k").gnd == classic.gnd

    # paris/ searched recursively.
    paris = tmp_path / "paris6k"
    touch_images(paris / "paris" / "louvre", ["paris_louvre_000001", "paris_louvre_000002"])
    write_lines(paris / "gt" / "louvre_1_query.txt", ["paris_louvre_000001 1 1 9 9"])
    write_lines(paris / "gt" / "louvre_1_good.txt", ["paris_louvre_000002"])
    write_lines(paris / "gt" / "louvre_1_ok.txt", [])
    write_lines(paris / "gt" / "louvre_1_junk.txt", [])
    assert load_dataset(paris).gnd == [{"ok": [1], "junk": []}]


def test_load_dataset_says_what_is_missing(tmp_path: Path):
    with pytest.raises(
        DatasetNotFoundError, match=r"not a folder.*robots\.ox\.ac\.uk/~vgg/data/oxbuildings/.*gt_files_170407\.tgz"
    ):
        load_dataset(tmp_path / "absent", "oxford5k")
    with pytest.raises(ValueError, match=r"parisbuildings/.*paris_120310\.tgz"):
        load_dataset(tmp_path / "absent", "paris6k")
    empty = tmp_path / "roxford5k"
    empty.mkdir()
    with pytest.raises(DatasetNotFoundError, match=r"gnd_roxford5k\.pkl not found.*cmp\.felk\.cvut\.cz/revisitop/"):
        load_dataset(empty, "roxford5k")
    (empty / "gnd_roxford5k.pkl").write_bytes(pickle.dumps(revisited_content()))
    with pytest.raises(DatasetNotFoundError, match=r"no image folder .*jpg.*oxbuild_images\.tgz"):
        load_dataset(empty)
    half = tmp_path / "half"
    write_lines(half / "gt" / "a_1_query.txt", ["x 1 2 3 4"])
    with pytest.raises(DatasetNotFoundError, match="missing the image folder jpg/"):
        load_dataset(half)
    with pytest.raises(
        DatasetNotFoundError, match=r"missing the ground-truth files.*oxbuildings.*parisbuildings.*revisitop"
    ):
        load_dataset(tmp_path)


# --- distractors ----------------------------------------------------------------------------


def test_read_distractor_list_and_with_distractors(revisited_root: Path, tmp_path: Path):
    list_path = tmp_path / "flickr100k.txt"
    write_lines(list_path, ["flickr_1", "", "sub/flickr_2.jpg", "  flickr_3  ", "other/img_4.png"])
    names = read_distractor_list(list_path)
    assert names == ["flickr_1", "sub/flickr_2.jpg", "flickr_3", "other/img_4.png"]
    dataset = load_revisited(revisited_root / "gnd_rtoy.pkl", revisited_root / "jpg")
    extended = dataset.with_distractors(names, tmp_path / "distractors")
    n = len(dataset.images)
    assert extended.images == dataset.images + ["flickr_1", "sub/flickr_2", "flickr_3", "other/img_4"]
    assert extended.gnd == dataset.gnd and len(dataset.images) == n  # original unchanged
    assert extended.image_path(0) == dataset.image_path(0)
    assert extended.image_path(n) == tmp_path / "distractors" / "flickr_1.jpg"
    assert extended.image_path(n + 1) == tmp_path / "distractors" / "sub" / "flickr_2.jpg"
    assert extended.image_path(n + 3) == tmp_path / "distractors" / "other" / "img_4.png"
    twice = extended.with_distractors(["r1m_1"], tmp_path / "r1m")
    assert twice.image_path(n + 4) == tmp_path / "r1m" / "r1m_1.jpg"
    assert twice.image_path(n) == tmp_path / "distractors" / "flickr_1.jpg"
    with pytest.raises(ValueError, match=r"names\[0\]: distractor 'db_001' is already in the database"):
        dataset.with_distractors(["db_001"], tmp_path)
    with pytest.raises(ValueError, match=r"names\[1\]: distractor 'x'"):
        dataset.with_distractors(["x", "x.jpg"], tmp_path)
    write_lines(list_path, ["a", "b", "a"])
    with pytest.raises(ValueError, match=r"flickr100k\.txt: line 3: 'a' is already listed on line 1"):
        read_distractor_list(list_path)


# --- the dataset record and the writers -----------------------------------------------------


def make_revisited(tmp_path: Path) -> RetrievalDataset:
    return RetrievalDataset(
        name="synthetic",
        image_dir=tmp_path / "jpg",
        images=["z_last", "a_first", "m_middle", "b_second"],  # deliberately not sorted
        queries=["q_one", "q_two", "q_three"],
        query_boxes=[(0.5, 1.0, 10.0, 20.25), None, (3, 4, 5, 6)],
        gnd=[
            {"easy": [2, 0], "hard": [1], "junk": [3]},
            {"easy": [], "hard": [3], "junk": []},
            {"easy": np.array([1]), "hard": [], "junk": [0, 2]},
        ],
        query_landmarks=["lake", "lake", "tower"],
    )


def test_record_normalises_and_validates(tmp_path: Path):
    dataset = make_revisited(tmp_path)
    assert dataset.gnd[0] == {"easy": [0, 2], "hard": [1], "junk": [3], "bbx": (0.5, 1.0, 10.0, 20.25)}
    assert dataset.gnd[2]["easy"] == [1] and dataset.query_boxes[2] == (3.0, 4.0, 5.0, 6.0)

    def build(**changes):
        fields = dict(
            name="x",
            image_dir=tmp_path,
            images=["a", "b"],
            queries=["q"],
            query_boxes=[None],
            gnd=[{"ok": [0], "junk": [1]}],
        )
        fields.update(changes)
        return RetrievalDataset(**fields)

    assert build().gnd == [{"ok": [0], "junk": [1]}]
    assert build(query_boxes=[np.array([1, 2, 3, 4], dtype=np.float32)]).query_boxes == [(1.0, 2.0, 3.0, 4.0)]
    for changes, message in [
        (dict(images=["a", "a"]), r"images\[1\]: name 'a' appears more than once"),
        (dict(images=["a", " b"]), r"images\[1\]"),
        (dict(queries=["q", "r"]), "one entry per query"),
        (dict(gnd=[{"ok": [2]}]), r"gnd\[0\]\['ok'\]: index 2 is out of range"),
        (dict(gnd=[{"ok": [0], "junk": [0]}]), r"gnd\[0\]: image 0 is in both 'ok' and 'junk'"),
        (dict(gnd=[{"easy": [0]}]), r"gnd\[0\]: has keys \['easy'\]"),
        (dict(gnd=[{"ok": [0], "good": [1]}]), r"gnd\[0\]: has keys"),
        (dict(gnd=[{"ok": [True]}]), "integer image indices"),
        (dict(query_boxes=[(1, 2, 3)]), r"query_boxes\[0\]"),
        (dict(query_boxes=[(3, 2, 1, 4)]), r"query_boxes\[0\]: expected finite x1 < x2"),
        (dict(query_boxes=[(1, 2, 3, 4)], gnd=[{"ok": [0], "bbx": (1, 2, 3, 5)}]), "disagrees with query_boxes"),
        (
            dict(
                queries=["q", "r"], query_boxes=[None, None], gnd=[{"ok": [0]}, {"easy": [0], "hard": [], "junk": []}]
            ),
            "mixes classic",
        ),
        (dict(query_landmarks=["has space"]), r"query_landmarks\[0\]"),
    ]:
        with pytest.raises(ValueError, match=message):
            build(**changes)


def test_revisited_round_trip_through_both_formats(tmp_path: Path):
    dataset = make_revisited(tmp_path)
    touch_images(tmp_path / "jpg", dataset.images + dataset.queries)
    write_revisited(dataset, tmp_path / "gnd_synthetic.pkl")
    loaded = load_revisited(tmp_path / "gnd_synthetic.pkl", tmp_path / "jpg")
    assert loaded.images == dataset.images and loaded.queries == dataset.queries
    assert loaded.query_boxes == dataset.query_boxes
    assert loaded.revisited_gnd() == dataset.revisited_gnd()
    assert load_dataset(tmp_path).revisited_gnd() == dataset.revisited_gnd()

    write_classic(dataset, tmp_path / "gt")
    assert sorted(p.name for p in (tmp_path / "gt").iterdir())[:4] == [
        "lake_1_good.txt",
        "lake_1_junk.txt",
        "lake_1_ok.txt",
        "lake_1_query.txt",
    ]
    assert not [p for p in tmp_path.rglob("*.tmp")]  # no temporary files left behind
    classic = load_classic(tmp_path / "gt", tmp_path / "jpg", "synthetic")
    assert classic.images == dataset.images  # the imlist keeps the unsorted database order
    assert classic.queries == dataset.queries and classic.query_boxes == dataset.query_boxes
    assert classic.classic_gnd() == dataset.classic_gnd()
    assert classic.query_landmarks == ["lake", "lake", "tower"]

    # A classic dataset round-trips through the classic files, but has no pickle form.
    write_classic(classic, tmp_path / "gt")  # same files: overwritten in place
    assert load_classic(tmp_path / "gt", tmp_path / "jpg", "synthetic").gnd == classic.gnd
    with pytest.raises(ValueError, match="no Easy/Hard split"):
        write_revisited(classic, tmp_path / "gnd_classic.pkl")
    assert not (tmp_path / "gnd_classic.pkl").exists()


def test_write_classic_refuses_what_it_cannot_represent(tmp_path: Path):
    dataset = make_revisited(tmp_path)
    (tmp_path / "gt").mkdir()
    write_lines(tmp_path / "gt" / "older_1_query.txt", ["x 1 2 3 4"])
    with pytest.raises(ValueError, match=r"already holds other ground-truth files \(older_1_query\.txt\)"):
        write_classic(dataset, tmp_path / "gt")
    unsorted = RetrievalDataset(**{**dataset.__dict__, "query_landmarks": ["tower", "lake", "lake"]})
    with pytest.raises(ValueError, match="not grouped by landmark"):
        write_classic(unsorted, tmp_path / "gt2")
    spaced = RetrievalDataset(**{**dataset.__dict__, "images": ["z last", "a_first", "m_middle", "b_second"]})
    with pytest.raises(ValueError, match="contains whitespace"):
        write_classic(spaced, tmp_path / "gt3")
    assert not (tmp_path / "gt2").exists() or not any((tmp_path / "gt2").iterdir())
