"""Ground truth of the Oxford5k / Paris6k retrieval benchmarks, classic and revisited.

Two on-disk formats are read and written:

* Classic (Philbin et al. 2007/2008): a folder of text files ``<landmark>_<n>_query.txt``
  (one line ``name x1 y1 x2 y2``; Oxford names carry an ``oxc1_`` prefix, Paris ones do not)
  and ``<landmark>_<n>_{good,ok,junk}.txt`` (one image name per line). Positives are
  good + ok; junk images are ignored by the evaluation.
* Revisited (Radenovic et al., CVPR 2018): a pickle ``gnd_<name>.pkl`` holding a dict with
  ``imlist`` (database names), ``qimlist`` (query names) and ``gnd`` (per query: ``bbx``,
  ``easy``, ``hard``, ``junk`` index lists). It is read with an unpickler that refuses every
  class and function reference, since unpickling such a reference can run arbitrary code.

Where the data are published (facts, for the error messages below):
Oxford Buildings https://www.robots.ox.ac.uk/~vgg/data/oxbuildings/ (``oxbuild_images.tgz``,
``gt_files_170407.tgz``); Paris https://www.robots.ox.ac.uk/~vgg/data/parisbuildings/
(``paris_1.tgz``, ``paris_2.tgz``, ``paris_120310.tgz``); revisited ground truth
http://cmp.felk.cvut.cz/revisitop/ (``gnd_roxford5k.pkl``, ``gnd_rparis6k.pkl``).
"""

from __future__ import annotations

import bisect
import dataclasses
import io
import math
import os
import pickle
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from numbers import Real
from pathlib import Path
from typing import Any

from .._typing import PathLike
from ..errors import CorruptFileError
from ..files import atomic_write_bytes
from ..images import IMAGE_EXTENSIONS

__all__ = [
    "DatasetNotFoundError",
    "RetrievalDataset",
    "load_classic",
    "load_dataset",
    "load_revisited",
    "read_distractor_list",
    "write_classic",
    "write_revisited",
]

Box = tuple[float, float, float, float]

_OXFORD_QUERY_PREFIX = "oxc1_"
_GROUND_TRUTH_FILE = re.compile(r"^(?P<stem>(?P<landmark>.+)_(?P<number>\d+))_(?P<kind>good|ok|junk|query)\.txt$")
_GROUND_TRUTH_KINDS = ("good", "ok", "junk", "query")

_OXFORD_SOURCE = "https://www.robots.ox.ac.uk/~vgg/data/oxbuildings/"
_PARIS_SOURCE = "https://www.robots.ox.ac.uk/~vgg/data/parisbuildings/"
_REVISITED_SOURCE = "http://cmp.felk.cvut.cz/revisitop/"

# What each known dataset needs in its folder, and where it is published.
_DATASET_REQUIREMENTS = {
    "oxford5k": (
        f"Oxford5k (classic) needs, from {_OXFORD_SOURCE}: the images oxbuild_images.tgz "
        "extracted into DATA_ROOT/jpg/ (or DATA_ROOT/oxbuild_images/) and the ground truth "
        "gt_files_170407.tgz extracted into DATA_ROOT/gt/ (or DATA_ROOT/gt_files_170407/), "
        "giving files such as gt/all_souls_1_query.txt, _good.txt, _ok.txt, _junk.txt."
    ),
    "paris6k": (
        f"Paris6k (classic) needs, from {_PARIS_SOURCE}: the images paris_1.tgz and paris_2.tgz "
        "extracted into DATA_ROOT/jpg/ (or DATA_ROOT/paris/; sub-folders are searched) and the "
        "ground truth paris_120310.tgz extracted into DATA_ROOT/gt/, giving files such as "
        "gt/defense_1_query.txt, _good.txt, _ok.txt, _junk.txt."
    ),
    "roxford5k": (
        f"Revisited Oxford (roxford5k) needs gnd_roxford5k.pkl from {_REVISITED_SOURCE} "
        "(http://cmp.felk.cvut.cz/revisitop/data/datasets/roxford5k/gnd_roxford5k.pkl) in "
        f"DATA_ROOT/, and the Oxford images (oxbuild_images.tgz from {_OXFORD_SOURCE}) "
        "extracted into DATA_ROOT/jpg/."
    ),
    "rparis6k": (
        f"Revisited Paris (rparis6k) needs gnd_rparis6k.pkl from {_REVISITED_SOURCE} "
        "(http://cmp.felk.cvut.cz/revisitop/data/datasets/rparis6k/gnd_rparis6k.pkl) in "
        f"DATA_ROOT/, and the Paris images (paris_1.tgz, paris_2.tgz from {_PARIS_SOURCE}) "
        "extracted into DATA_ROOT/jpg/."
    ),
}


class DatasetNotFoundError(FileNotFoundError, ValueError):
    """A dataset folder is missing or incomplete; the message says which files are needed."""


# ----------------------------------------------------------------------------------------------
# The dataset record
# ----------------------------------------------------------------------------------------------


def _check_name(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value or value != value.strip() or "\n" in value or "\r" in value:
        raise ValueError(
            f"{what}: expected a non-empty image name without surrounding whitespace or line breaks, received {value!r}"
        )
    return value


def _check_box(value: Any, what: str) -> Box | None:
    if value is None:
        return None
    if hasattr(value, "tolist") and not isinstance(value, (list, tuple)):
        value = value.tolist()  # a NumPy array built in memory
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 4:
        raise ValueError(f"{what}: expected None or 4 numbers (x1, y1, x2, y2), received {value!r}")
    numbers = []
    for number in value:
        if isinstance(number, bool) or not isinstance(number, Real):
            raise ValueError(f"{what}: expected 4 numbers (x1, y1, x2, y2), received {value!r}")
        numbers.append(float(number))
    x1, y1, x2, y2 = numbers
    if not all(math.isfinite(number) for number in numbers) or not (x1 < x2 and y1 < y2):
        raise ValueError(f"{what}: expected finite x1 < x2 and y1 < y2 (x1, y1, x2, y2), received {value!r}")
    return (x1, y1, x2, y2)


def _check_indices(value: Any, n_images: int, what: str) -> list[int]:
    """A ground-truth index list: integers in [0, n_images); returned sorted and de-duplicated."""
    if value is None:
        return []
    if hasattr(value, "tolist") and not isinstance(value, (list, tuple)):
        value = value.tolist()  # NumPy arrays built in memory (never from a pickle) are fine.
    if not isinstance(value, (list, tuple, set, frozenset, range)):
        raise ValueError(f"{what}: expected a list of image indices, received {type(value).__name__}")
    indices = []
    for index in value:
        if isinstance(index, bool) or not hasattr(index, "__index__"):
            raise ValueError(f"{what}: expected integer image indices, received {index!r}")
        index = int(index.__index__())
        if not 0 <= index < n_images:
            raise ValueError(
                f"{what}: index {index} is out of range; expected 0 <= index < {n_images} "
                "(the number of database images)"
            )
        indices.append(index)
    return sorted(set(indices))


@dataclass
class RetrievalDataset:
    """A retrieval benchmark: database images, queries with boxes, and the ground truth.

    Attributes:
        name: the dataset's name, e.g. ``"oxford5k"`` or ``"roxford5k"``.
        image_dir: folder of the images; image ``n`` is ``image_dir / (n + image_ext)`` unless
            ``image_locations`` or ``distractor_dirs`` say otherwise.
        images: database image names (no extension), in database order; ground-truth indices
            refer to this list.
        queries: query image names (queries may or may not also be database images).
        query_boxes: per query, ``(x1, y1, x2, y2)`` in pixels of the query image, or None.
        gnd: per query either a classic ``{'ok': [...], 'junk': [...]}`` or a revisited
            ``{'easy': [...], 'hard': [...], 'junk': [...], 'bbx': box or None}`` dict of
            database indices. Normalised on construction: sorted, de-duplicated lists;
            ``bbx`` always equals ``query_boxes``.
        image_ext: the extension of images in ``image_dir``.
        image_locations: full paths of images that are not at ``image_dir / (n + image_ext)``
            (e.g. Paris images in per-landmark sub-folders), by name.
        distractor_dirs: ``(first_index, folder, extension)`` of blocks of distractor images
            appended by :meth:`with_distractors`; image ``i >= first_index`` of a block is
            ``folder / (name + extension)``.
        query_landmarks: optional landmark name per query (classic ground-truth file names
            ``<landmark>_<n>_*.txt``).
    """

    name: str
    image_dir: Path
    images: list[str]
    queries: list[str]
    query_boxes: list[Box | None]
    gnd: list[dict]
    image_ext: str = ".jpg"
    image_locations: dict[str, Path] = field(default_factory=dict)
    distractor_dirs: list[tuple[int, Path, str]] = field(default_factory=list)
    query_landmarks: list[str] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"name: expected a non-empty string, received {self.name!r}")
        self.image_dir = Path(self.image_dir)
        self.images = [_check_name(image, f"images[{i}]") for i, image in enumerate(self.images)]
        if len(set(self.images)) != len(self.images):
            seen: set[str] = set()
            for i, image in enumerate(self.images):
                if image in seen:
                    raise ValueError(f"images[{i}]: name {image!r} appears more than once; expected unique names")
                seen.add(image)
        self.queries = [_check_name(query, f"queries[{i}]") for i, query in enumerate(self.queries)]
        n_queries = len(self.queries)
        self.query_boxes = list(self.query_boxes)
        self.gnd = list(self.gnd)
        if len(self.query_boxes) != n_queries or len(self.gnd) != n_queries:
            raise ValueError(
                f"queries, query_boxes and gnd must have one entry per query; received "
                f"{n_queries}, {len(self.query_boxes)} and {len(self.gnd)}"
            )
        self.query_boxes = [_check_box(box, f"query_boxes[{i}]") for i, box in enumerate(self.query_boxes)]
        if self.query_landmarks is not None:
            self.query_landmarks = list(self.query_landmarks)
            if len(self.query_landmarks) != n_queries:
                raise ValueError(
                    f"query_landmarks: expected one landmark per query ({n_queries}), received "
                    f"{len(self.query_landmarks)}"
                )
            for i, landmark in enumerate(self.query_landmarks):
                if not isinstance(landmark, str) or not re.fullmatch(r"[A-Za-z0-9_\-.]+", landmark):
                    raise ValueError(
                        f"query_landmarks[{i}]: expected a name of letters, digits, '_', '-' or '.', "
                        f"received {landmark!r}"
                    )
        if not isinstance(self.image_ext, str) or not self.image_ext.startswith("."):
            raise ValueError(f"image_ext: expected an extension starting with '.', received {self.image_ext!r}")
        self.image_locations = {str(name): Path(path) for name, path in dict(self.image_locations).items()}
        self.distractor_dirs = sorted(
            (int(start), Path(folder), str(extension)) for start, folder, extension in self.distractor_dirs
        )
        # Lists shared between entries (e.g. through a pickle's memo) are checked once: by identity.
        cache: dict[Any, Any] = {}
        self.gnd = [self._normalise_entry(entry, query, cache) for query, entry in enumerate(self.gnd)]
        kinds = {"revisited" if "easy" in entry else "classic" for entry in self.gnd}
        if len(kinds) > 1:
            raise ValueError(
                "gnd: mixes classic ('ok'/'junk') and revisited ('easy'/'hard'/'junk') entries; "
                "expected one kind for all queries"
            )

    def _normalise_entry(self, entry: Any, query: int, cache: dict[Any, Any]) -> dict:
        what = f"gnd[{query}]"
        if not isinstance(entry, Mapping):
            raise ValueError(f"{what}: expected a dict, received {type(entry).__name__}")
        keys = set(entry)
        if "easy" in keys or "hard" in keys:
            allowed, required = {"easy", "hard", "junk", "bbx"}, ("easy", "hard", "junk")
        else:
            allowed, required = {"ok", "junk", "bbx"}, ("ok",)
        missing = [key for key in required if key not in keys]
        unknown = sorted(str(key) for key in keys - allowed)
        if missing or unknown:
            raise ValueError(
                f"{what}: has keys {sorted(str(key) for key in keys)}; expected either classic "
                "'ok' (+ optional 'junk', 'bbx') or revisited 'easy', 'hard', 'junk' (+ optional 'bbx')"
            )
        n_images = len(self.images)
        normalised = {}
        for key in required + (("junk",) if "junk" not in required else ()):
            value = entry.get(key)
            if id(value) not in cache:
                # the value is kept in the cache so that its id stays its own
                cache[id(value)] = (value, _check_indices(value, n_images, f"{what}[{key!r}]"))
            normalised[key] = cache[id(value)][1]
        if "bbx" in entry and entry["bbx"] is not None:
            box = _check_box(entry["bbx"], f"{what}['bbx']")
            if box != self.query_boxes[query]:
                raise ValueError(
                    f"{what}['bbx'] = {box} disagrees with query_boxes[{query}] = "
                    f"{self.query_boxes[query]}; expected the same box"
                )
        lists = list(normalised.items())
        for first in range(len(lists)):
            for second in range(first + 1, len(lists)):
                pair = (id(lists[first][1]), id(lists[second][1]))
                if pair not in cache:
                    cache[pair] = set(lists[first][1]) & set(lists[second][1])
                overlap = cache[pair]
                if overlap:
                    raise ValueError(
                        f"{what}: image {min(overlap)} is in both {lists[first][0]!r} and "
                        f"{lists[second][0]!r}; expected disjoint lists"
                    )
        if "easy" in normalised:
            normalised["bbx"] = self.query_boxes[query]
        return normalised

    @property
    def has_revisited(self) -> bool:
        """True when the ground truth has the revisited Easy/Hard split."""
        return bool(self.gnd) and "easy" in self.gnd[0]

    def _path_of(self, name: str, index: int | None) -> Path:
        location = self.image_locations.get(name)
        if location is not None:
            return location
        if index is not None and self.distractor_dirs:
            block = bisect.bisect_right([start for start, _, _ in self.distractor_dirs], index) - 1
            if block >= 0:
                _, folder, extension = self.distractor_dirs[block]
                return folder / (name + extension)
        return self.image_dir / (name + self.image_ext)

    def image_path(self, i: int) -> Path:
        """Path of database image ``i``."""
        if not -len(self.images) <= i < len(self.images):
            raise ValueError(f"i: database image {i} out of range; the database has {len(self.images)} images")
        i %= len(self.images)
        return self._path_of(self.images[i], i)

    def query_path(self, i: int) -> Path:
        """Path of query image ``i`` (the whole image; crop it to ``query_boxes[i]`` as needed)."""
        if not -len(self.queries) <= i < len(self.queries):
            raise ValueError(f"i: query {i} out of range; the dataset has {len(self.queries)} queries")
        return self._path_of(self.queries[i], None)

    def classic_gnd(self) -> list[dict]:
        """Per query ``{'ok': positives, 'junk': ignored}``; for revisited sets ok = easy + hard."""
        if self.has_revisited:
            return [{"ok": sorted(entry["easy"] + entry["hard"]), "junk": list(entry["junk"])} for entry in self.gnd]
        return [{"ok": list(entry["ok"]), "junk": list(entry["junk"])} for entry in self.gnd]

    def revisited_gnd(self) -> list[dict]:
        """Per query ``{'easy', 'hard', 'junk', 'bbx'}``; a ValueError for classic sets."""
        if not self.has_revisited:
            raise ValueError(
                f"dataset {self.name!r} has classic ground truth (positives 'ok' and 'junk' only) and "
                "no Easy/Hard split; use classic_gnd() and compute_map, or load the revisited "
                f"gnd_*.pkl from {_REVISITED_SOURCE}"
            )
        return [
            {"easy": list(entry["easy"]), "hard": list(entry["hard"]), "junk": list(entry["junk"]), "bbx": entry["bbx"]}
            for entry in self.gnd
        ]

    def with_distractors(self, names: Sequence[str], image_dir: PathLike, image_ext: str = ".jpg") -> RetrievalDataset:
        """A copy with distractor images appended to the database (ground truth unchanged).

        Args:
            names: distractor names as in a distractor list; a name that ends in an image
                extension (e.g. ``"a/b.jpg"``) is stored without it and located as written.
            image_dir: the folder the names are relative to. Files are not checked (lists of a
                million names); extraction reports a missing file.
            image_ext: extension of names given without one.
        """
        folder = Path(image_dir)
        existing = set(self.images)
        new_images: list[str] = []
        new_locations: dict[str, Path] = {}
        for i, raw_name in enumerate(names):
            name = _check_name(raw_name, f"names[{i}]")
            stem, extension = os.path.splitext(name)
            if extension.lower() in IMAGE_EXTENSIONS and stem:
                if extension != image_ext:
                    new_locations[stem] = folder / name
                name = stem
            if name in existing:
                raise ValueError(
                    f"names[{i}]: distractor {name!r} is already in the database; expected names "
                    "distinct from the dataset's images and from each other"
                )
            existing.add(name)
            new_images.append(name)
        return dataclasses.replace(
            self,
            images=self.images + new_images,
            image_locations={**self.image_locations, **new_locations},
            distractor_dirs=self.distractor_dirs + [(len(self.images), folder, image_ext)],
        )


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------


def _read_lines(path: Path) -> list[tuple[int, str]]:
    """Non-blank lines of a text file as (1-based line number, stripped text)."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise CorruptFileError(path, f"not a UTF-8 text file ({error})") from None
    return [(number, line.strip()) for number, line in enumerate(text.splitlines(), start=1) if line.strip()]


def _scan_images(image_dir: Path) -> dict[str, Path]:
    """Every image file under ``image_dir`` (recursively), by name without extension."""
    found: dict[str, Path] = {}
    for folder, subfolders, files in os.walk(image_dir):
        subfolders.sort()
        for file_name in sorted(files):
            stem, extension = os.path.splitext(file_name)
            if file_name.startswith(".") or extension.lower() not in IMAGE_EXTENSIONS:
                continue
            path = Path(folder) / file_name
            if stem in found:
                raise ValueError(
                    f"image_dir: two images are named {stem!r} ({found[stem]} and {path}); "
                    "expected unique names (ground truth refers to images by name)"
                )
            found[stem] = path
    return found


def _locations_outside(
    names: Sequence[str], found: Mapping[str, Path], image_dir: Path, image_ext: str
) -> dict[str, Path]:
    """The images of ``names`` that are not at ``image_dir / (name + image_ext)``."""
    return {name: found[name] for name in names if found[name] != image_dir / (name + image_ext)}


def read_distractor_list(path: PathLike) -> list[str]:
    """Distractor image names (Flickr100k, R1M lists): one name per line, blank lines skipped.

    Raises:
        ValueError: a name listed twice or a file that is not UTF-8 text.
    """
    path = Path(path)
    names: list[str] = []
    first_line: dict[str, int] = {}
    for number, name in _read_lines(path):
        if name in first_line:
            raise CorruptFileError(path, f"line {number}: {name!r} is already listed on line {first_line[name]}")
        first_line[name] = number
        names.append(name)
    return names


def _resolve_name(name: str, known: Mapping[str, Any], strip_oxford_prefix: bool) -> str | None:
    """The image name a ground-truth line refers to, or None when no such image exists."""
    if strip_oxford_prefix and name.startswith(_OXFORD_QUERY_PREFIX) and name not in known:
        name = name[len(_OXFORD_QUERY_PREFIX) :]
    return name if name in known else None


def _parse_query_line(path: Path, number: int, line: str) -> tuple[str, Box | None]:
    fields = line.split()
    if len(fields) not in (1, 5):
        raise CorruptFileError(
            path, f"line {number}: {line!r} has {len(fields) - 1} numbers; expected 'name x1 y1 x2 y2' (4 numbers)"
        )
    if len(fields) == 1:
        return fields[0], None
    try:
        numbers = [float(value) for value in fields[1:]]
    except ValueError:
        raise CorruptFileError(
            path, f"line {number}: {line!r} has a non-numeric box; expected 'name x1 y1 x2 y2'"
        ) from None
    try:
        return fields[0], _check_box(numbers, "box")
    except ValueError:
        raise CorruptFileError(
            path, f"line {number}: box {fields[1:]} is not a box; expected finite x1 < x2 and y1 < y2"
        ) from None


def load_classic(
    gt_dir: PathLike,
    image_dir: PathLike,
    name: str,
    *,
    image_ext: str = ".jpg",
    skip_missing: bool = False,
) -> RetrievalDataset:
    """Load a classic Oxford5k / Paris6k ground-truth folder.

    Args:
        gt_dir: folder of ``<landmark>_<n>_{good,ok,junk,query}.txt`` files (and optionally
            ``<name>_imlist.txt``, one database name per line, fixing the database order).
        image_dir: folder of the images, searched recursively (Paris keeps its images in
            per-landmark sub-folders). Without an imlist, the database is every image found,
            sorted by name.
        name: the dataset's name (e.g. ``"oxford5k"``).
        image_ext: the usual image extension (images with another one are still found).
        skip_missing: drop good/ok/junk names whose image is not in the database instead of
            raising (e.g. Paris6k with its unreadable images deleted). Changes the ground truth,
            so off by default.

    Queries are ordered by landmark, then by number. Query names may carry Oxford's ``oxc1_``
    prefix; a query line with the name alone means "no box".

    Raises:
        ValueError: a malformed file (the message names the file and line), a query without
            its good/ok/junk files, or a name with no image.
        DatasetNotFoundError: ``gt_dir`` or ``image_dir`` is not a folder.
    """
    gt_dir, image_dir = Path(gt_dir), Path(image_dir)
    for folder, what in ((gt_dir, "gt_dir"), (image_dir, "image_dir")):
        if not folder.is_dir():
            raise DatasetNotFoundError(f"{what}: {folder} is not a folder")
    found = _scan_images(image_dir)
    imlist_path = gt_dir / f"{name}_imlist.txt"
    if imlist_path.is_file():
        images: list[str] = []
        listed: dict[str, int] = {}
        for number, image in _read_lines(imlist_path):
            if image in listed:
                raise CorruptFileError(
                    imlist_path, f"line {number}: {image!r} is already listed on line {listed[image]}"
                )
            if image not in found:
                raise CorruptFileError(imlist_path, f"line {number}: no image named {image!r} in {image_dir}")
            listed[image] = number
            images.append(image)
    else:
        images = sorted(found)
    if not images:
        raise DatasetNotFoundError(f"image_dir: no images ({', '.join(IMAGE_EXTENSIONS)}) found in {image_dir}")
    index_of = {image: i for i, image in enumerate(images)}

    files: dict[tuple[str, int], dict[str, Path]] = {}
    stems: dict[tuple[str, int], str] = {}
    for path in sorted(gt_dir.iterdir()):
        match = _GROUND_TRUTH_FILE.match(path.name)
        if match and path.is_file():
            key = (match["landmark"], int(match["number"]))
            files.setdefault(key, {})[match["kind"]] = path
            stems[key] = match["stem"]
    if not files:
        raise DatasetNotFoundError(
            f"gt_dir: no ground-truth files <landmark>_<n>_{{good,ok,junk,query}}.txt in {gt_dir}"
        )

    queries: list[str] = []
    boxes: list[Box | None] = []
    gnd: list[dict] = []
    landmarks: list[str] = []
    for key in sorted(files):
        kinds = files[key]
        missing = [kind for kind in _GROUND_TRUTH_KINDS if kind not in kinds]
        if missing:
            raise CorruptFileError(
                gt_dir,
                f"query {stems[key]} lacks "
                + ", ".join(f"{stems[key]}_{kind}.txt" for kind in missing)
                + "; expected all of _query, _good, _ok and _junk",
            )
        query_lines = _read_lines(kinds["query"])
        if len(query_lines) != 1:
            where = f"line {query_lines[1][0]}" if query_lines else "line 1"
            raise CorruptFileError(
                kinds["query"], f"{where}: expected exactly one line 'name x1 y1 x2 y2', found {len(query_lines)}"
            )
        number, line = query_lines[0]
        query_name, box = _parse_query_line(kinds["query"], number, line)
        resolved = _resolve_name(query_name, found, strip_oxford_prefix=True)
        if resolved is None:
            raise CorruptFileError(kinds["query"], f"line {number}: no image named {query_name!r} in {image_dir}")
        lists: dict[str, set[int]] = {}
        first_seen: dict[int, tuple[str, Path, int]] = {}
        for kind in ("good", "ok", "junk"):
            indices: set[int] = set()
            for line_number, image in _read_lines(kinds[kind]):
                if len(image.split()) != 1:
                    raise CorruptFileError(
                        kinds[kind], f"line {line_number}: {image!r}; expected one image name per line"
                    )
                resolved_image = _resolve_name(image, index_of, strip_oxford_prefix=True)
                if resolved_image is None:
                    if skip_missing:
                        continue
                    raise CorruptFileError(
                        kinds[kind],
                        f"line {line_number}: {image!r} is not a database image (not in "
                        f"{imlist_path if imlist_path.is_file() else image_dir}); pass skip_missing=True "
                        "to drop such names",
                    )
                index = index_of[resolved_image]
                earlier = first_seen.get(index)
                if earlier is not None and (earlier[0] == "junk") != (kind == "junk"):
                    raise CorruptFileError(
                        kinds[kind],
                        f"line {line_number}: {image!r} is also listed in {earlier[1]}, "
                        f"line {earlier[2]}; an image cannot be both positive and junk",
                    )
                first_seen.setdefault(index, (kind, kinds[kind], line_number))
                indices.add(index)
            lists[kind] = indices
        queries.append(resolved)
        boxes.append(box)
        gnd.append({"ok": sorted(lists["good"] | lists["ok"]), "junk": sorted(lists["junk"])})
        landmarks.append(key[0])
    try:
        return RetrievalDataset(
            name=name,
            image_dir=image_dir,
            images=images,
            queries=queries,
            query_boxes=boxes,
            gnd=gnd,
            image_ext=image_ext,
            image_locations=_locations_outside(images + queries, found, image_dir, image_ext),
            query_landmarks=landmarks,
        )
    except CorruptFileError:
        raise
    except ValueError as error:
        raise CorruptFileError(gt_dir, str(error)) from None


class _RefusingUnpickler(pickle.Unpickler):
    """Unpickler that refuses every class or function reference (only plain data loads)."""

    def find_class(self, module: str, name: str) -> Any:
        raise _ClassReference(module, name)

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent ids are not supported")


class _ClassReference(pickle.UnpicklingError):
    def __init__(self, module: str, name: str) -> None:
        super().__init__(f"{module}.{name}")
        self.module = module
        self.name = name


def _load_plain_pickle(path: Path) -> Any:
    """Load a pickle that may hold only dicts, lists, tuples, sets, strings, numbers and None."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise DatasetNotFoundError(f"{path}: cannot read ({error.strerror})") from None
    try:
        return _RefusingUnpickler(io.BytesIO(data)).load()
    except _ClassReference as reference:
        explanation = (
            f"{path}: refused to load: the pickle references {reference.module}.{reference.name}. "
            "Only plain dicts, lists, tuples, strings, numbers and None are accepted, because "
            "unpickling a class or function reference can run arbitrary code."
        )
        if reference.module.split(".")[0] == "numpy":
            explanation += (
                " It holds NumPy arrays or scalars; if you trust the file, convert them once to plain "
                "lists (e.g. with numpy's tolist() in a trusted session) and save the dict again."
            )
        raise CorruptFileError(path, explanation[len(f"{path}: ") :]) from None
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        KeyError,
        IndexError,
        AttributeError,
        UnicodeDecodeError,
        OverflowError,
        MemoryError,
        RecursionError,
    ) as error:
        raise CorruptFileError(path, f"not a readable pickle ({type(error).__name__}: {error})") from None


def _plain_name_list(value: Any, path: Path, key: str) -> list[str]:
    """Image names from a pickle; a name given with an image extension is stored without it."""
    if not isinstance(value, (list, tuple)):
        raise CorruptFileError(path, f"[{key!r}] is a {type(value).__name__}; expected a list of image names")
    names = []
    for i, name in enumerate(value):
        if not isinstance(name, str) or not name or name != name.strip():
            raise CorruptFileError(path, f"[{key!r}][{i}] = {name!r:.80}; expected an image name (non-empty string)")
        stem, extension = os.path.splitext(name)
        names.append(stem if stem and extension.lower() in IMAGE_EXTENSIONS else name)
    return names


def load_revisited(pkl_path: PathLike, image_dir: PathLike, *, image_ext: str = ".jpg") -> RetrievalDataset:
    """Load a revisited ground truth ``gnd_<name>.pkl`` (roxford5k / rparis6k layout).

    The pickle is read with an unpickler that refuses every class or function reference:
    only plain dicts, lists, tuples, strings, numbers and None load (NumPy arrays do not).
    Pickles of the classic sets with ``ok``/``junk`` per query (and no ``easy``/``hard``) load
    as classic datasets; ``bbx`` may be absent (no box). Names given with an image extension
    are stored without it.

    Args:
        pkl_path: the pickle; the dataset's name is taken from ``gnd_<name>.pkl``.
        image_dir: the folder of the images (``jpg/`` in the revisitop layout), searched
            recursively; every database and query image must be there.
        image_ext: the usual image extension.

    Raises:
        ValueError: a malformed or unsafe pickle (the message names the file and the entry),
            an index out of range, or missing images.
        DatasetNotFoundError: the pickle or ``image_dir`` is missing.
    """
    pkl_path, image_dir = Path(pkl_path), Path(image_dir)
    if not pkl_path.is_file():
        raise DatasetNotFoundError(f"pkl_path: {pkl_path} is not a file")
    if not image_dir.is_dir():
        raise DatasetNotFoundError(f"image_dir: {image_dir} is not a folder")
    content = _load_plain_pickle(pkl_path)
    try:
        images, queries, boxes, gnd = _revisited_content(content, pkl_path)
    except CorruptFileError:
        raise
    except ValueError as error:  # from the shared checks, which do not know the file
        raise CorruptFileError(pkl_path, str(error)) from None
    found = _scan_images(image_dir)
    absent = [image for image in images + queries if image not in found]
    name = pkl_path.stem[len("gnd_") :] if pkl_path.stem.startswith("gnd_") else pkl_path.stem
    if absent:
        raise DatasetNotFoundError(
            f"{image_dir}: {len(absent)} image(s) listed in {pkl_path} are missing, e.g. "
            f"{absent[0]}{image_ext}; expected every database and query image there. "
            + (_requirements(name) if name in _DATASET_REQUIREMENTS else "")
        )
    try:
        return RetrievalDataset(
            name=name,
            image_dir=image_dir,
            images=images,
            queries=queries,
            query_boxes=boxes,
            gnd=gnd,
            image_ext=image_ext,
            image_locations=_locations_outside(images + queries, found, image_dir, image_ext),
        )
    except ValueError as error:
        raise CorruptFileError(pkl_path, str(error)) from None


def _revisited_content(content: Any, pkl_path: Path) -> tuple[list[str], list[str], list[Box | None], list[dict]]:
    """Names, boxes and ground truth of an unpickled revisited file, checked.

    A pickle can share one list object between many entries through its memo (a few bytes per
    reference), so each distinct index list is checked once, by identity, and the checked list
    is shared the same way: a small file cannot make the check take minutes or the memory blow up.
    """
    if not isinstance(content, dict):
        raise CorruptFileError(
            pkl_path, f"holds a {type(content).__name__}; expected a dict with 'imlist', 'qimlist', 'gnd'"
        )
    missing = [key for key in ("imlist", "qimlist", "gnd") if key not in content]
    if missing:
        raise CorruptFileError(pkl_path, f"lacks the key(s) {missing}; expected 'imlist', 'qimlist' and 'gnd'")
    images = _plain_name_list(content["imlist"], pkl_path, "imlist")
    queries = _plain_name_list(content["qimlist"], pkl_path, "qimlist")
    raw_gnd = content["gnd"]
    if not isinstance(raw_gnd, (list, tuple)) or len(raw_gnd) != len(queries):
        size = len(raw_gnd) if isinstance(raw_gnd, (list, tuple)) else type(raw_gnd).__name__
        raise CorruptFileError(
            pkl_path, f"['gnd'] has {size} entries; expected a list of {len(queries)} (one per query)"
        )
    gnd: list[dict] = []
    boxes: list[Box | None] = []
    checked: dict[int, list[int]] = {}  # id(list in the pickle) -> its checked indices
    for query, entry in enumerate(raw_gnd):
        where = f"['gnd'][{query}]"
        if not isinstance(entry, dict):
            raise CorruptFileError(
                pkl_path, f"{where} is a {type(entry).__name__}; expected a dict with 'bbx', 'easy', 'hard', 'junk'"
            )
        # The classic sets are also published as pickles with 'ok'/'junk' per query.
        classic_entry = "ok" in entry and "easy" not in entry and "hard" not in entry
        keys = ("ok", "junk") if classic_entry else ("easy", "hard", "junk")
        missing = [key for key in keys if key not in entry and not (classic_entry and key == "junk")]
        if missing:
            raise CorruptFileError(
                pkl_path,
                f"{where} lacks {missing}; expected the keys 'bbx', 'easy', 'hard', 'junk' "
                "(or 'ok', 'junk' for a classic ground truth)",
            )
        try:
            boxes.append(_check_box(entry.get("bbx"), f"{where}['bbx']"))
        except ValueError as error:
            raise CorruptFileError(pkl_path, str(error)) from None
        lists = {}
        for key in keys:
            value = entry.get(key)
            if id(value) not in checked:
                try:
                    checked[id(value)] = _check_indices(value, len(images), f"{where}[{key!r}]")
                except ValueError as error:
                    raise CorruptFileError(pkl_path, str(error)) from None
            lists[key] = checked[id(value)]
        gnd.append(lists)
    return images, queries, boxes, gnd


def _requirements(name: str | None) -> str:
    if name in _DATASET_REQUIREMENTS:
        return _DATASET_REQUIREMENTS[name]
    return (
        "Expected one of these layouts: (revisited) DATA_ROOT/gnd_<name>.pkl + DATA_ROOT/jpg/; "
        "(classic) DATA_ROOT/gt/ (or gt_files_170407/, or the *_query.txt files in DATA_ROOT) + "
        "DATA_ROOT/jpg/ (or oxbuild_images/ or paris/). " + " ".join(_DATASET_REQUIREMENTS.values())
    )


def _holds_ground_truth(folder: Path) -> bool:
    return any(folder.glob("gnd_*.pkl")) or any(
        candidate.is_dir() and any(candidate.glob("*_query.txt"))
        for candidate in (folder / "gt", folder / "gt_files_170407", folder)
    )


def _download_hint(root: Path, name: str | None) -> str:
    """The `clustermac datasets download` command that lays out a known dataset at ``root``."""
    name = name if name is not None else root.name
    if name not in _DATASET_REQUIREMENTS:
        return ""
    parent = root.parent if root.name == name else root
    return f" To download it: clustermac datasets download {name} --root {parent}"


def load_dataset(data_root: PathLike, name: str | None = None) -> RetrievalDataset:
    """Load a dataset folder, detecting its layout (see :func:`_load_dataset`); a missing or
    incomplete known dataset's error ends with the `clustermac datasets download` command to run."""
    try:
        return _load_dataset(data_root, name)
    except DatasetNotFoundError as error:
        raise DatasetNotFoundError(f"{error}{_download_hint(Path(data_root), name)}") from None


def _load_dataset(data_root: PathLike, name: str | None = None) -> RetrievalDataset:
    """Load a dataset folder, detecting its layout.

    * Revisited (revisitop layout): ``DATA_ROOT/gnd_<name>.pkl`` and images in ``DATA_ROOT/jpg/``.
      Chosen when ``name`` names such a pickle (or is roxford5k/rparis6k), or when ``name`` is
      None and the folder holds exactly one ``gnd_*.pkl``.
    * Classic: ground truth in ``DATA_ROOT/gt/``, ``DATA_ROOT/gt_files_170407/`` or directly in
      ``DATA_ROOT``; images in ``DATA_ROOT/jpg/``, ``DATA_ROOT/oxbuild_images/`` or
      ``DATA_ROOT/paris/`` (searched recursively). The name defaults to the folder's name.

    Raises:
        DatasetNotFoundError: the folder is missing or incomplete; the message lists the files
            needed and where they are published.
        ValueError: a malformed ground-truth file.
    """
    root = Path(data_root)
    if not root.is_dir():
        raise DatasetNotFoundError(f"data_root: {root} is not a folder. {_requirements(name or root.name)}")
    # revisitop keeps each dataset in DATA_ROOT/<name>/: accept the parent folder too.
    if name is not None and (root / name).is_dir() and not _holds_ground_truth(root):
        root = root / name
    pickles = sorted(root.glob("gnd_*.pkl"))
    pickle_path: Path | None = None
    if name is not None and (root / f"gnd_{name}.pkl").is_file():
        pickle_path = root / f"gnd_{name}.pkl"
    elif name is None and len(pickles) == 1:
        pickle_path = pickles[0]
    elif name is None and len(pickles) > 1:
        raise ValueError(
            f"data_root: {root} holds several ground truths ({', '.join(p.name for p in pickles)}); "
            "pass name= to choose one"
        )
    elif name in ("roxford5k", "rparis6k"):
        raise DatasetNotFoundError(f"{root}: gnd_{name}.pkl not found. {_requirements(name)}")
    if pickle_path is not None:
        image_dir = root / "jpg"
        if not image_dir.is_dir():
            dataset_name = pickle_path.stem[len("gnd_") :]
            raise DatasetNotFoundError(
                f"{root}: found {pickle_path.name} but no image folder {image_dir}. {_requirements(dataset_name)}"
            )
        return load_revisited(pickle_path, image_dir)

    dataset_name = name if name is not None else root.name
    gt_dir = next(
        (
            folder
            for folder in (root / "gt", root / "gt_files_170407", root)
            if folder.is_dir() and any(folder.glob("*_query.txt"))
        ),
        None,
    )
    image_dir = next(
        (folder for folder in (root / "jpg", root / "oxbuild_images", root / "paris") if folder.is_dir()),
        None,
    )
    if gt_dir is None or image_dir is None:
        lacking = []
        if gt_dir is None:
            lacking.append("the ground-truth files (*_query.txt, *_good.txt, *_ok.txt, *_junk.txt) in gt/")
        if image_dir is None:
            lacking.append("the image folder jpg/")
        raise DatasetNotFoundError(
            f"{root}: no dataset here: missing {' and '.join(lacking)}. {_requirements(dataset_name)}"
        )
    return load_classic(gt_dir, image_dir, dataset_name)


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------


def _format_number(value: float) -> str:
    return repr(int(value)) if float(value).is_integer() else repr(float(value))


def write_classic(dataset: RetrievalDataset, gt_dir: PathLike) -> None:
    """Write the ground truth as classic text files into ``gt_dir`` (created if needed).

    Files: ``<landmark>_<n>_{query,good,ok,junk}.txt`` per query (landmark from
    ``dataset.query_landmarks``, else ``query``) and ``<name>_imlist.txt`` with the database
    order. For revisited sets, easy goes to ``_good`` and hard to ``_ok`` (the classic loader
    reads good + ok as positives). Each file is written atomically.

    Raises:
        ValueError: a name with whitespace, landmarks whose sorted file order differs from the
            query order, or ``gt_dir`` already holding other ground-truth files.
    """
    gt_dir = Path(gt_dir)
    for image in dataset.images + dataset.queries:
        if len(image.split()) != 1:
            raise ValueError(f"dataset: image name {image!r} contains whitespace; the classic format cannot hold it")
    landmarks = dataset.query_landmarks or ["query"] * len(dataset.queries)
    counts: dict[str, int] = {}
    keys = []
    for landmark in landmarks:
        counts[landmark] = counts.get(landmark, 0) + 1
        keys.append((landmark, counts[landmark]))
    if keys != sorted(keys):
        raise ValueError(
            "dataset.query_landmarks: queries are not grouped by landmark in sorted order, so the "
            "loader (which orders queries by landmark, then number) would reorder them; sort the "
            "queries by landmark or set query_landmarks=None"
        )
    contents: dict[str, str] = {f"{dataset.name}_imlist.txt": "".join(f"{image}\n" for image in dataset.images)}
    for query, (landmark, number) in enumerate(keys):
        stem = f"{landmark}_{number}"
        box = dataset.query_boxes[query]
        line = dataset.queries[query]
        if box is not None:
            line += " " + " ".join(_format_number(value) for value in box)
        entry = dataset.gnd[query]
        good, ok = (entry["easy"], entry["hard"]) if dataset.has_revisited else (entry["ok"], [])
        contents[f"{stem}_query.txt"] = line + "\n"
        for kind, indices in (("good", good), ("ok", ok), ("junk", entry["junk"])):
            contents[f"{stem}_{kind}.txt"] = "".join(f"{dataset.images[i]}\n" for i in indices)
    gt_dir.mkdir(parents=True, exist_ok=True)
    stale = sorted(
        path.name
        for path in gt_dir.iterdir()
        if (_GROUND_TRUTH_FILE.match(path.name) or path.name.endswith("_imlist.txt")) and path.name not in contents
    )
    if stale:
        raise ValueError(
            f"gt_dir: {gt_dir} already holds other ground-truth files ({', '.join(stale[:3])}"
            f"{', ...' if len(stale) > 3 else ''}) that the loader would mix in; write to an empty folder"
        )
    for file_name, text in contents.items():
        atomic_write_bytes(gt_dir / file_name, text.encode("utf-8"))


def write_revisited(dataset: RetrievalDataset, pkl_path: PathLike) -> None:
    """Write the ground truth as a revisited pickle (``imlist``, ``qimlist``, ``gnd``), atomically.

    The pickle holds only lists, dicts, strings, numbers and None, so :func:`load_revisited`
    reads it back. Name it ``gnd_<name>.pkl`` for :func:`load_dataset`.

    Raises:
        ValueError: the dataset has classic ground truth only (no Easy/Hard split).
    """
    pkl_path = Path(pkl_path)
    gnd = [
        {
            "bbx": list(entry["bbx"]) if entry["bbx"] is not None else None,
            "easy": entry["easy"],
            "hard": entry["hard"],
            "junk": entry["junk"],
        }
        for entry in dataset.revisited_gnd()
    ]
    content = {"imlist": list(dataset.images), "qimlist": list(dataset.queries), "gnd": gnd}
    pkl_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(pkl_path, pickle.dumps(content, protocol=4))
