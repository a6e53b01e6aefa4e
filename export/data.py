"""Load the MovieLens-100K event log and find (or download) it on disk.

Only the standard library is used here, so the loaders work without torch or numpy.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

MOVIELENS_100K = "ml-100k"
MOVIELENS_100K_URL = "https://files.grouplens.org/datasets/movielens/ml-100k.zip"

RATINGS_FILE = "u.data"
ITEMS_FILE = "u.item"

# u.item has id, title, release date, video release date, IMDb URL and 19 genre flags.
ITEM_FIELD_COUNT = 24
# The genres of u.item's flag columns, in column order (as listed in u.genre).
MOVIELENS_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
)
# Release years from this one on get a feature each; earlier years share one per decade,
# because MovieLens-100K has 1,348 of its 1,682 films from the 1990s.
FIRST_SINGLE_RELEASE_YEAR = 1990

DATA_DIR_ENV = "STREAMREC_DATA_DIR"
CACHE_DIR_ENV = "STREAMREC_CACHE_DIR"
DEFAULT_CACHE_DIR = Path.home() / ".cache" / "streamrec"

# The repository root is the parent of this package; the shared data folder sits beside it.
REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA_DIR = REPO_ROOT.parent / "shared" / "data"

DOWNLOAD_CHUNK_BYTES = 64 * 1024
DOWNLOAD_TIMEOUT_SECONDS = 60.0


class DatasetError(Exception):
    """A dataset that is missing, malformed or failed to download."""


# Bad rows quoted in a report or an error; all of them are counted.
MAX_REPORTED_BAD_ROWS = 10


@dataclass
class BadRows:
    """Count and first examples of the rows of one file that could not be read."""

    source: str
    count: int = 0
    rows_read: int = 0
    examples: list[tuple[int, str]] = field(default_factory=list)  # (line number, reason)

    def add(self, line_number: int, reason: str) -> None:
        self.count += 1
        if len(self.examples) < MAX_REPORTED_BAD_ROWS:
            self.examples.append((line_number, reason))

    def summary(self) -> str:
        shown = "; ".join(f"line {line}: {reason}" for line, reason in self.examples)
        return (
            f"{self.source}: {self.count} of {self.rows_read} rows are invalid "
            f"(first {len(self.examples)} shown): {shown}"
        )

    def check(self, max_bad_rows: int) -> None:
        """Raise DatasetError when more than ``max_bad_rows`` rows are bad."""
        if self.count > max_bad_rows:
            raise DatasetError(
                f"{self.summary()}. Fix these rows, or pass --max-bad-rows {self.count} to leave them out."
            )


class BadRow(ValueError):
    """One row that cannot be read; the message is the reason."""


@dataclass(frozen=True)
class Interaction:
    """One user-item event from the log."""

    user_id: str
    item_id: str
    timestamp_ms: int
    event_type: str
    value: float | None
    # 1-based line number in the source file; breaks ties between equal timestamps.
    line: int


def load_movielens(dataset_dir: Path, max_bad_rows: int = 0, with_report: bool = False):
    """Read u.data (user, item, rating, timestamp in seconds) in file order.

    Every rating becomes an interaction of event type "rating" whose value is the
    rating. More than ``max_bad_rows`` malformed rows raise DatasetError naming the file,
    the count and the first lines with their values; fewer are left out. Returns the
    interactions, or (interactions, BadRows) when ``with_report`` is set.
    """
    path = Path(dataset_dir) / RATINGS_FILE
    text = _read_text(path, encoding="ascii")

    interactions = []
    bad_rows = BadRows(str(path))
    for line_number, row in enumerate(text.splitlines(), start=1):
        bad_rows.rows_read += 1
        try:
            interactions.append(_parse_rating_row(line_number, row))
        except BadRow as error:
            bad_rows.add(line_number, str(error))
    bad_rows.check(max_bad_rows)

    if not interactions:
        raise DatasetError(f"{path} contains no ratings; expected one rating per line.")
    return (interactions, bad_rows) if with_report else interactions


def _parse_rating_row(line_number: int, row: str) -> Interaction:
    fields = row.split("\t")
    if len(fields) != 4:
        raise BadRow(
            f"expected 4 tab-separated fields (user, item, rating, timestamp), found {len(fields)} in {row!r}"
        )
    user_id, item_id, rating_text, timestamp_text = (field.strip() for field in fields)

    if not user_id:
        raise BadRow(f"empty user id in {row!r}")
    if not item_id:
        raise BadRow(f"empty item id in {row!r}")

    try:
        rating = float(rating_text)
    except ValueError:
        raise BadRow(f"invalid rating {rating_text!r}; expected a number") from None

    # Timestamps stay integers end to end: a float would create false ties.
    if not timestamp_text.isdigit():
        raise BadRow(f"invalid timestamp {timestamp_text!r}; expected whole seconds since the epoch")
    timestamp_ms = int(timestamp_text) * 1000

    return Interaction(
        user_id=user_id,
        item_id=item_id,
        timestamp_ms=timestamp_ms,
        event_type="rating",
        value=rating,
        line=line_number,
    )


def load_item_titles(dataset_dir: Path) -> dict[str, str]:
    """Read u.item (Latin-1, '|'-separated) into a map from item id to title."""
    path = Path(dataset_dir) / ITEMS_FILE
    text = _read_text(path, encoding="latin-1")

    titles: dict[str, str] = {}
    for line_number, row in enumerate(text.splitlines(), start=1):
        fields = row.split("|")
        if len(fields) != ITEM_FIELD_COUNT:
            raise DatasetError(
                f"{path}, line {line_number}: expected {ITEM_FIELD_COUNT} '|'-separated "
                f"fields, found {len(fields)} in {row!r}."
            )

        item_id = fields[0].strip()
        if not item_id:
            raise DatasetError(f"{path}, line {line_number}: empty item id in {row!r}.")
        if item_id in titles:
            raise DatasetError(f"{path}, line {line_number}: duplicate item id {item_id!r}.")
        titles[item_id] = fields[1].strip()
    return titles


def load_movielens_item_tags(dataset_dir: Path) -> dict[str, list[str]]:
    """Read u.item into {item id: feature names}: its genres and its release period.

    Feature names look like "genre=Comedy" and "release=1995" (or "release=1970s" before
    1990). A film without a release date gets no release feature.
    """
    path = Path(dataset_dir) / ITEMS_FILE
    text = _read_text(path, encoding="latin-1")

    tags: dict[str, list[str]] = {}
    for line_number, row in enumerate(text.splitlines(), start=1):
        fields = row.split("|")
        if len(fields) != ITEM_FIELD_COUNT:
            raise DatasetError(
                f"{path}, line {line_number}: expected {ITEM_FIELD_COUNT} '|'-separated "
                f"fields, found {len(fields)} in {row!r}."
            )
        item_tags = [f"genre={genre}" for genre, flag in zip(MOVIELENS_GENRES, fields[5:]) if flag.strip() == "1"]
        year = fields[2].strip()[-4:]
        if year.isdigit():
            item_tags.append(f"release={release_period(int(year))}")
        tags[fields[0].strip()] = item_tags
    return tags


def release_period(year: int) -> str:
    """Return the release feature value: the year itself from 1990 on, else its decade."""
    if year >= FIRST_SINGLE_RELEASE_YEAR:
        return str(year)
    return f"{year // 10 * 10}s"


def _read_text(path: Path, encoding: str) -> str:
    try:
        return path.read_text(encoding=encoding)
    except FileNotFoundError:
        raise DatasetError(f"{path} not found.") from None
    except UnicodeDecodeError as error:
        raise DatasetError(
            f"{path}: byte {error.start} is not valid {encoding}: {error.object[error.start:error.end]!r}."
        ) from None


def fingerprint_dataset(dataset_dir: Path) -> str:
    """Return the sha256 over the names and bytes of u.data and, where present, u.item."""
    digest = hashlib.sha256()
    for name in (RATINGS_FILE, ITEMS_FILE):
        path = Path(dataset_dir) / name
        if not path.exists():
            continue
        digest.update(name.encode("ascii") + b"\0")
        digest.update(path.read_bytes())
    return digest.hexdigest()


def is_dataset_dir(path: Path) -> bool:
    return (path / RATINGS_FILE).is_file()


def default_cache_dir() -> Path:
    configured = os.environ.get(CACHE_DIR_ENV)
    return Path(configured) if configured else DEFAULT_CACHE_DIR


def resolve_dataset_dir(arg: str | None, name: str = MOVIELENS_100K) -> Path:
    """Find the dataset folder (the one holding u.data).

    Search order: the explicit argument, then the STREAMREC_DATA_DIR variable, then the
    shared data folder beside the repository, then the download cache. The argument and
    the variable may name the dataset folder itself or a folder containing ``name/``. An
    explicit argument or variable that points nowhere raises at once instead of falling
    back, so a typo never silently selects another copy of the data.
    """
    if arg is not None:
        return _dataset_in(Path(arg), name, source="--data")

    configured = os.environ.get(DATA_DIR_ENV)
    if configured:
        return _dataset_in(Path(configured), name, source=f"${DATA_DIR_ENV}")

    searched = []
    for root in (SHARED_DATA_DIR, default_cache_dir()):
        for candidate in (root / name, root):
            if is_dataset_dir(candidate):
                return candidate
        searched.append(root / name)

    raise DatasetError(
        f"Dataset {name} not found; searched {', '.join(str(path) for path in searched)}. "
        f"Pass --data DIR (a folder containing {name}/), set {DATA_DIR_ENV}, "
        "or run `python -m export download`."
    )


def _dataset_in(root: Path, name: str, source: str) -> Path:
    for candidate in (root, root / name):
        if is_dataset_dir(candidate):
            return candidate
    raise DatasetError(
        f"Dataset {name} not found in {root} (from {source}): neither {root / RATINGS_FILE} "
        f"nor {root / name / RATINGS_FILE} exists. Point {source} at a folder containing "
        f"{name}/, or run `python -m export download`."
    )


ProgressCallback = Callable[[int, int | None], None]


def print_download_progress(received: int, total: int | None) -> None:
    """Write a one-line progress report to stderr, overwritten on each call."""
    received_mb = received / 1e6
    if total:
        percent = 100.0 * received / total
        message = f"\rdownloading: {percent:5.1f}% ({received_mb:.1f} of {total / 1e6:.1f} MB)"
    else:
        message = f"\rdownloading: {received_mb:.1f} MB"
    sys.stderr.write(message)
    sys.stderr.flush()


def download_movielens(
    cache_dir: Path,
    url: str = MOVIELENS_100K_URL,
    name: str = MOVIELENS_100K,
    expected_sha256: str | None = None,
    progress: ProgressCallback | None = print_download_progress,
) -> Path:
    """Download the MovieLens zip into ``cache_dir``, check it and unpack ``name/``.

    The check opens the archive, verifies every member's CRC, rejects members outside
    ``name/`` and parses the unpacked ratings. ``expected_sha256``, when given, must match
    the archive bytes. Returns the unpacked dataset folder. An existing unpacked copy is
    returned without downloading again.
    """
    cache_dir = Path(cache_dir)
    target = cache_dir / name
    if is_dataset_dir(target):
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)

    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".download-") as work:
        archive = Path(work) / f"{name}.zip"
        _fetch(url, archive, progress)
        _check_archive(archive, url, name, expected_sha256)

        unpacked = Path(work) / "unpacked"
        with zipfile.ZipFile(archive) as zipped:
            zipped.extractall(unpacked)
        load_movielens(unpacked / name)

        # Moving a finished folder into place means a crash never leaves half a dataset.
        shutil.move(str(unpacked / name), str(target))
    return target


def _fetch(url: str, destination: Path, progress: ProgressCallback | None) -> None:
    received = 0
    total = None
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_SECONDS) as response:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            with destination.open("wb") as file:
                while chunk := response.read(DOWNLOAD_CHUNK_BYTES):
                    file.write(chunk)
                    received += len(chunk)
                    if progress is not None:
                        progress(received, total)
    except urllib.error.HTTPError as error:
        raise DatasetError(
            f"Download of {url} failed: the server returned HTTP {error.code} {error.reason}. "
            "Check the URL, or download the zip by hand and pass its unpacked folder with --data."
        ) from None
    except OSError as error:
        raise DatasetError(
            f"Download of {url} failed: {error}. Check the network connection, or download "
            "the zip by hand and pass its unpacked folder with --data."
        ) from None
    finally:
        # End the progress line so that later output starts on a fresh line.
        if progress is not None and received:
            sys.stderr.write("\n")

    if total is not None and received != total:
        raise DatasetError(f"Download of {url} is truncated: received {received} of {total} bytes.")


def _check_archive(archive: Path, url: str, name: str, expected_sha256: str | None) -> None:
    if expected_sha256 is not None:
        actual = hashlib.sha256(archive.read_bytes()).hexdigest()
        if actual != expected_sha256.lower():
            raise DatasetError(
                f"Download of {url} has sha256 {actual}, expected {expected_sha256}."
            )

    if not zipfile.is_zipfile(archive):
        raise DatasetError(f"Download of {url} is not a zip archive.")

    with zipfile.ZipFile(archive) as zipped:
        damaged = zipped.testzip()
        if damaged is not None:
            raise DatasetError(f"Download of {url} is damaged: CRC mismatch in {damaged}.")

        members = zipped.namelist()
        for member in members:
            if not member.startswith(f"{name}/") or ".." in Path(member).parts:
                raise DatasetError(
                    f"Download of {url} contains {member!r}, which is outside {name}/."
                )
        if f"{name}/{RATINGS_FILE}" not in members:
            raise DatasetError(f"Download of {url} has no {name}/{RATINGS_FILE}.")
