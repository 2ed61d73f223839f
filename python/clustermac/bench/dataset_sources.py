"""Where the Oxford / Paris benchmarks and the 1M distractors are published: the catalogue that
`clustermac datasets download` reads.

Facts, with their sources:

* Oxford Buildings (Philbin et al., CVPR 2007), https://www.robots.ox.ac.uk/~vgg/data/oxbuildings/:
  images ``oxbuild_images-v1.tgz`` (the VGG site renamed ``oxbuild_images.tgz`` to ``-v1``; the
  cnnimageretrieval-pytorch and revisitop download scripts use the new names) and the classic
  ground truth ``gt_files_170407.tgz``. The page says 5,062 images; the archive and the published
  ground-truth image list (``gnd_oxford5k.pkl``) hold 5,063. 55 queries.
* Paris (Philbin et al., CVPR 2008), https://www.robots.ox.ac.uk/~vgg/data/parisbuildings/:
  ``paris_1-v1.tgz``, ``paris_2-v1.tgz`` (6,412 images in per-landmark folders, some unreadable)
  and the ground truth ``paris_120310.tgz``; the published image list (``gnd_paris6k.pkl``) has
  6,392 images. 55 queries.
* The classic ground truth as pickles (``gnd_oxford5k.pkl``, ``gnd_paris6k.pkl``), published by
  cnnimageretrieval-pytorch at http://cmp.felk.cvut.cz/cnnimageretrieval/data/test/<name>/.
* Revisited Oxford and Paris (Radenovic et al., CVPR 2018), http://cmp.felk.cvut.cz/revisitop/:
  ``gnd_roxford5k.pkl`` (4,993 images, 70 queries) and ``gnd_rparis6k.pkl`` (6,322 images,
  70 queries) at http://cmp.felk.cvut.cz/revisitop/data/datasets/<name>/; the same files are also
  served by cnnimageretrieval-pytorch (its ``test/<name>/`` folder). The images are the Oxford /
  Paris archives above.
* The revisitop 1M distractors: the list http://ptak.felk.cvut.cz/revisitop/revisitop1m/revisitop1m.txt
  (one path per line, relative to the ``jpg/`` folder) and the images in 100 archives
  http://ptak.felk.cvut.cz/revisitop/revisitop1m/jpg/revisitop1m.{1..100}.tar.gz
  (revisitop's ``python/download.py``).

No host publishes a SHA-256 or a byte size for any of these files (the VGG pages give MD5 sums
only for their SIFT/word files, which are not downloaded here), so every ``sha256`` and ``size``
below is None: the files are checked structurally instead (a readable archive, the image counts
above, every ground-truth name present). Use ``--record-checksums FILE`` to write the values of a
verified download, and ``--checksums FILE`` to hold a later download to them.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["CATALOGUE", "DatasetSource", "RemoteFile"]

#: What a downloaded file is and where its content goes inside the dataset folder.
FILE_KINDS = ("images", "ground_truth", "pickle", "list", "distractors")


@dataclass(frozen=True)
class RemoteFile:
    """One published file.

    Attributes:
        name: the file name on disk (and on a ``--mirror`` host: ``PREFIX/name``); unique across
            the catalogue, so one mirror folder can hold every file.
        urls: the official hosts, tried in order before any ``--mirror``.
        kind: ``images`` (an archive of images, extracted flat into ``jpg/``), ``ground_truth``
            (an archive of classic ``*.txt`` files, extracted flat into ``gt/``), ``pickle`` (a
            ``gnd_*.pkl`` placed as it is), ``list`` (a text file placed as it is) or
            ``distractors`` (an archive whose paths are kept under ``jpg/``).
        size: the published size in bytes, or None when none is published.
        sha256: the published SHA-256 (hex), or None when none is published.
    """

    name: str
    urls: tuple[str, ...]
    kind: str
    size: int | None = None
    sha256: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in FILE_KINDS:
            raise ValueError(f"kind: expected one of {FILE_KINDS}, received {self.kind!r}")
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise ValueError(f"name: expected a plain file name, received {self.name!r}")


@dataclass(frozen=True)
class DatasetSource:
    """A dataset as published: its files and the facts its download is checked against.

    Attributes:
        name: the dataset's name (also its folder under ``--root`` and the ``--dataset`` of
            ``clustermac evaluate``).
        files: what to download, in order.
        database_images: images in the published ground truth's database (None: not checked).
        queries: queries in the published ground truth (None: not checked).
        description: one line for ``clustermac datasets list``.
        per_file: unpack and publish each archive on its own (the 1M distractors: resumable per
            archive, usable before all are there) instead of the whole folder at once.
    """

    name: str
    files: tuple[RemoteFile, ...]
    database_images: int | None = None
    queries: int | None = None
    description: str = ""
    per_file: bool = False


_VGG = "https://www.robots.ox.ac.uk/~vgg/data"
_CNNIMAGERETRIEVAL = "http://cmp.felk.cvut.cz/cnnimageretrieval/data/test"
_REVISITOP = "http://cmp.felk.cvut.cz/revisitop/data/datasets"
_REVISITOP1M = "http://ptak.felk.cvut.cz/revisitop/revisitop1m"

#: Number of image archives of the revisitop 1M distractors (revisitop's download.py).
REVISITOP1M_ARCHIVES = 100

_OXFORD_IMAGES = RemoteFile("oxbuild_images-v1.tgz", (f"{_VGG}/oxbuildings/oxbuild_images-v1.tgz",), "images")
_PARIS_IMAGES = (
    RemoteFile("paris_1-v1.tgz", (f"{_VGG}/parisbuildings/paris_1-v1.tgz",), "images"),
    RemoteFile("paris_2-v1.tgz", (f"{_VGG}/parisbuildings/paris_2-v1.tgz",), "images"),
)


def _pickle(name: str, *urls: str) -> RemoteFile:
    return RemoteFile(f"gnd_{name}.pkl", tuple(f"{url}/{name}/gnd_{name}.pkl" for url in urls), "pickle")


CATALOGUE: dict[str, DatasetSource] = {
    "oxford5k": DatasetSource(
        "oxford5k",
        (
            _OXFORD_IMAGES,
            RemoteFile("gt_files_170407.tgz", (f"{_VGG}/oxbuildings/gt_files_170407.tgz",), "ground_truth"),
            _pickle("oxford5k", _CNNIMAGERETRIEVAL),
        ),
        database_images=5063,
        queries=55,
        description="Oxford Buildings 5k, classic ground truth (txt files and pickle)",
    ),
    "paris6k": DatasetSource(
        "paris6k",
        (
            *_PARIS_IMAGES,
            RemoteFile("paris_120310.tgz", (f"{_VGG}/parisbuildings/paris_120310.tgz",), "ground_truth"),
            _pickle("paris6k", _CNNIMAGERETRIEVAL),
        ),
        database_images=6392,
        queries=55,
        description="Paris 6k, classic ground truth (txt files and pickle)",
    ),
    "roxford5k": DatasetSource(
        "roxford5k",
        (_OXFORD_IMAGES, _pickle("roxford5k", _REVISITOP, _CNNIMAGERETRIEVAL)),
        database_images=4993,
        queries=70,
        description="Revisited Oxford (Easy / Medium / Hard)",
    ),
    "rparis6k": DatasetSource(
        "rparis6k",
        (*_PARIS_IMAGES, _pickle("rparis6k", _REVISITOP, _CNNIMAGERETRIEVAL)),
        database_images=6322,
        queries=70,
        description="Revisited Paris (Easy / Medium / Hard)",
    ),
    "revisitop1m": DatasetSource(
        "revisitop1m",
        (
            RemoteFile("revisitop1m.txt", (f"{_REVISITOP1M}/revisitop1m.txt",), "list"),
            *(
                RemoteFile(f"revisitop1m.{k}.tar.gz", (f"{_REVISITOP1M}/jpg/revisitop1m.{k}.tar.gz",), "distractors")
                for k in range(1, REVISITOP1M_ARCHIVES + 1)
            ),
        ),
        description="revisitop 1M distractors (list + 100 image archives; --limit N for the first N)",
        per_file=True,
    ),
}
