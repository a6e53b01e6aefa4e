"""Event-log formats beyond MovieLens-100K, with bad-row accounting.

Formats:

- ``movielens``: a folder with u.data (and u.item for titles, genres and release year).
- ``movielens-dat``: a folder with ratings.dat (``user::item::rating::seconds``) and
  optionally movies.dat (``item::title (year)::genre|genre``), the ML-1M and ML-10M layout.
- ``sessions``: a GRU4Rec-style session log with a header row: session id, item id and
  time columns (``SessionId``/``session_id``, ``ItemId``/``item_id``, ``Time``/
  ``timestamp``), optionally a user id column. Tab, comma or semicolon separated. Without
  a user id, each session is one sequence; with one, a user's sessions form one sequence.
- ``table``: any CSV (with a header row) or Parquet file, with a column mapping such as
  ``user=uid,item=sku,time=ts,type=action``. Roles: user, item, time (required), type,
  value, session, categories (``|``-separated item categories, used as item features).

A row that cannot be read is counted with its line number and reason. Loading fails when
more than ``max_bad_rows`` rows are bad, and the error lists the first few. Otherwise the
bad rows are left out and reported in ``LoadedLog.bad_rows``.

Only the standard library is needed, except for Parquet, which needs pyarrow.
"""

from __future__ import annotations

import csv
import hashlib
import io
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from export.data import (
    ITEMS_FILE,
    RATINGS_FILE,
    BadRow,
    BadRows,
    DatasetError,
    Interaction,
    fingerprint_dataset,
    load_item_titles,
    load_movielens_item_tags,
    release_period,
)
from export.sequences import EVENT_TYPES

FORMATS = ("auto", "movielens", "movielens-dat", "sessions", "table")
TABLE_ROLES = ("user", "item", "time", "type", "value", "session", "categories")
REQUIRED_TABLE_ROLES = ("item", "time")
SEPARATORS = ("\t", ",", ";")
DEFAULT_EVENT_TYPE = "click"

SESSION_COLUMN_NAMES = {
    "session": ("sessionid", "session_id", "session"),
    "item": ("itemid", "item_id", "item"),
    "time": ("time", "timestamp", "ts"),
    "user": ("userid", "user_id", "user"),
}
TITLE_YEAR = re.compile(r"\((\d{4})\)\s*$")


@dataclass
class LoadedLog:
    """An event log ready to split: interactions plus item metadata and load figures."""

    name: str
    interactions: list[Interaction]
    bad_rows: BadRows
    fingerprint: str
    titles: dict[str, str] = field(default_factory=dict)
    # {item id: feature names}, or None when the log has no item metadata.
    item_tags: dict[str, list[str]] | None = None


def detect_format(path: Path, columns: dict[str, str] | None) -> str:
    """Pick a format from what the path contains; see the module docstring."""
    if path.is_dir():
        if (path / RATINGS_FILE).is_file():
            return "movielens"
        if (path / "ratings.dat").is_file():
            return "movielens-dat"
        raise DatasetError(
            f"{path} contains neither {RATINGS_FILE} nor ratings.dat; pass a MovieLens folder or an event-log file."
        )
    if not path.is_file():
        raise DatasetError(f"{path} not found.")
    if columns or path.suffix.lower() == ".parquet":
        return "table"
    return "sessions"


def load_event_log(
    path: Path | str,
    format: str = "auto",
    columns: dict[str, str] | None = None,
    max_bad_rows: int = 0,
    time_unit: str = "s",
) -> LoadedLog:
    """Load an event log in any supported format; see the module docstring."""
    path = Path(path)
    if format not in FORMATS:
        raise DatasetError(f"Unknown format {format!r}; expected one of {', '.join(FORMATS)}.")
    if time_unit not in ("s", "ms"):
        raise DatasetError(f"Unknown time unit {time_unit!r}; expected s or ms.")
    if format == "auto":
        format = detect_format(path, columns)
    if format in ("sessions", "table") and not path.is_file():
        raise DatasetError(f"{path} is not a file; --format {format} reads one event-log file.")
    if format in ("movielens", "movielens-dat") and not path.is_dir():
        raise DatasetError(f"{path} is not a folder; --format {format} reads a MovieLens folder.")

    if format == "movielens":
        return _load_movielens_100k(path, max_bad_rows)
    if format == "movielens-dat":
        return _load_movielens_dat(path, max_bad_rows)
    if format == "sessions":
        return _load_sessions(path, max_bad_rows, time_unit)
    if not columns:
        raise DatasetError(f"{path}: the table format needs --columns, e.g. user=uid,item=sku,time=ts.")
    return _load_table(path, columns, max_bad_rows, time_unit)


def parse_columns(text: str) -> dict[str, str]:
    """Parse ``role=column,role=column`` into {role: column}."""
    mapping = {}
    for part in filter(None, (piece.strip() for piece in text.split(","))):
        role, separator, column = part.partition("=")
        role, column = role.strip(), column.strip()
        if not separator or not column:
            raise DatasetError(f"Invalid column mapping {part!r} in {text!r}; expected role=column, e.g. item=sku.")
        if role not in TABLE_ROLES:
            raise DatasetError(f"Unknown column role {role!r} in {text!r}; expected one of {', '.join(TABLE_ROLES)}.")
        mapping[role] = column
    missing = [role for role in REQUIRED_TABLE_ROLES if role not in mapping]
    if missing:
        raise DatasetError(f"Column mapping {text!r} lacks {', '.join(missing)}; item and time are required.")
    if "user" not in mapping and "session" not in mapping:
        raise DatasetError(f"Column mapping {text!r} needs user or session, the column that groups events into sequences.")
    return mapping


# -- MovieLens ------------------------------------------------------------------------------------


def _load_movielens_100k(folder: Path, max_bad_rows: int) -> LoadedLog:
    from export.data import load_movielens

    interactions, bad_rows = load_movielens(folder, max_bad_rows=max_bad_rows, with_report=True)
    has_items = (folder / ITEMS_FILE).is_file()
    return LoadedLog(
        name=folder.name,
        interactions=interactions,
        bad_rows=bad_rows,
        fingerprint=fingerprint_dataset(folder),
        titles=load_item_titles(folder) if has_items else {},
        item_tags=load_movielens_item_tags(folder) if has_items else None,
    )


def _load_movielens_dat(folder: Path, max_bad_rows: int) -> LoadedLog:
    ratings_path = folder / "ratings.dat"
    bad_rows = BadRows(str(ratings_path))
    interactions = []
    for line_number, row in _numbered_lines(ratings_path):
        bad_rows.rows_read += 1
        try:
            interactions.append(_parse_dat_rating(row, line_number))
        except BadRow as error:
            bad_rows.add(line_number, str(error))
    bad_rows.check(max_bad_rows)
    _require_rows(interactions, ratings_path)

    movies_path = folder / "movies.dat"
    titles, tags = _read_movies_dat(movies_path) if movies_path.is_file() else ({}, None)
    return LoadedLog(
        name=folder.name,
        interactions=interactions,
        bad_rows=bad_rows,
        fingerprint=_fingerprint([ratings_path, movies_path]),
        titles=titles,
        item_tags=tags,
    )


def _parse_dat_rating(row: str, line_number: int) -> Interaction:
    fields = row.split("::")
    if len(fields) != 4:
        raise BadRow(f"expected 4 '::'-separated fields (user, item, rating, timestamp), found {len(fields)} in {row!r}")
    user_id, item_id, rating, seconds = (part.strip() for part in fields)
    if not user_id or not item_id:
        raise BadRow(f"empty user or item id in {row!r}")
    if not seconds.isdigit():
        raise BadRow(f"invalid timestamp {seconds!r}; expected whole seconds since the epoch")
    return Interaction(user_id, item_id, int(seconds) * 1000, "rating", _parse_value(rating), line_number)


def _read_movies_dat(path: Path) -> tuple[dict[str, str], dict[str, list[str]]]:
    titles: dict[str, str] = {}
    tags: dict[str, list[str]] = {}
    for line_number, row in _numbered_lines(path):
        fields = row.split("::")
        if len(fields) != 3:
            raise DatasetError(f"{path}, line {line_number}: expected 3 '::'-separated fields, found {len(fields)} in {row!r}.")
        item_id, title, genres = (part.strip() for part in fields)
        titles[item_id] = title
        item_tags = [f"genre={genre}" for genre in genres.split("|") if genre and genre != "(no genres listed)"]
        year = TITLE_YEAR.search(title)
        if year:
            item_tags.append(f"release={release_period(int(year.group(1)))}")
        tags[item_id] = item_tags
    return titles, tags


# -- session logs and tables -------------------------------------------------------------------


def _load_sessions(path: Path, max_bad_rows: int, time_unit: str) -> LoadedLog:
    text = _read_any_text(path)
    header, separator = _read_header(text, path)
    lowered = [name.strip().lower() for name in header]
    mapping = {}
    for role, names in SESSION_COLUMN_NAMES.items():
        found = next((header[lowered.index(name)] for name in names if name in lowered), None)
        if found is not None:
            mapping[role] = found
    missing = [role for role in ("session", "item", "time") if role not in mapping]
    if missing:
        raise DatasetError(
            f"{path}: header {header!r} lacks the {', '.join(missing)} column; expected e.g. SessionId, ItemId, Time, "
            "or use --format table with --columns."
        )
    rows = _csv_rows(text, separator)
    return _rows_to_log(path, rows, mapping, max_bad_rows, time_unit)


def _load_table(path: Path, columns: dict[str, str], max_bad_rows: int, time_unit: str) -> LoadedLog:
    if path.suffix.lower() == ".parquet":
        rows = _parquet_rows(path)
        header = None
    else:
        text = _read_any_text(path)
        header, separator = _read_header(text, path)
        rows = _csv_rows(text, separator)
    if header is not None:
        absent = [column for column in columns.values() if column not in header]
        if absent:
            raise DatasetError(f"{path}: column {', '.join(absent)} not found in the header {header!r}; fix --columns.")
    return _rows_to_log(path, rows, columns, max_bad_rows, time_unit)


def _rows_to_log(
    path: Path, rows: Iterable[tuple[int, dict]], mapping: dict[str, str], max_bad_rows: int, time_unit: str
) -> LoadedLog:
    bad_rows = BadRows(str(path))
    interactions = []
    categories: dict[str, set[str]] = {}
    for line_number, row in rows:
        bad_rows.rows_read += 1
        if None in row:
            # csv.DictReader puts the fields beyond the header's under the key None.
            bad_rows.add(line_number, f"{len(row[None])} more fields than the header")
            continue
        try:
            interaction = _row_interaction(row, mapping, line_number, time_unit)
        except BadRow as error:
            bad_rows.add(line_number, str(error))
            continue
        interactions.append(interaction)
        if "categories" in mapping:
            text = str(row.get(mapping["categories"]) or "")
            categories.setdefault(interaction.item_id, set()).update(filter(None, (c.strip() for c in text.split("|"))))
    bad_rows.check(max_bad_rows)
    _require_rows(interactions, path)

    item_tags = None
    if "categories" in mapping:
        item_tags = {item: [f"category={name}" for name in sorted(names)] for item, names in categories.items()}
    return LoadedLog(
        name=path.stem,
        interactions=interactions,
        bad_rows=bad_rows,
        fingerprint=_fingerprint([path]),
        item_tags=item_tags,
    )


def _row_interaction(row: dict, mapping: dict[str, str], line_number: int, time_unit: str) -> Interaction:
    def cell(role: str) -> str:
        value = row.get(mapping[role]) if role in mapping else None
        return "" if value is None else str(value).strip()

    item_id = cell("item")
    if not item_id:
        raise BadRow(f"empty item id in column {mapping['item']!r}")
    # A log without user ids uses the session as the sequence.
    user_id = cell("user") or cell("session")
    if not user_id:
        column = mapping.get("user") or mapping.get("session")
        raise BadRow(f"empty {'user' if 'user' in mapping else 'session'} id in column {column!r}")

    event_type = cell("type") or DEFAULT_EVENT_TYPE
    if event_type not in EVENT_TYPES:
        raise BadRow(f"unknown event type {event_type!r}; expected one of {', '.join(EVENT_TYPES)}")
    value_text = cell("value")
    value = _parse_value(value_text) if value_text else None
    return Interaction(user_id, item_id, _parse_time(cell("time"), time_unit), event_type, value, line_number)


def _parse_value(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise BadRow(f"invalid value {text!r}; expected a number") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise BadRow(f"invalid value {text!r}; expected a finite number")
    return value


def _parse_time(text: str, time_unit: str) -> int:
    """Return epoch milliseconds from a number in ``time_unit`` or an ISO 8601 time with a zone."""
    if not text:
        raise BadRow("empty time")
    try:
        number = float(text)
    except ValueError:
        number = None
    if number is not None:
        if not number >= 0 or number == float("inf"):
            raise BadRow(f"invalid time {text!r}; expected a non-negative number")
        return round(number * (1000 if time_unit == "s" else 1))
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise BadRow(f"invalid time {text!r}; expected seconds since the epoch or ISO 8601") from None
    if moment.tzinfo is None:
        raise BadRow(f"time {text!r} has no zone; add one, e.g. Z or +02:00")
    return round(moment.timestamp() * 1000)


def _read_header(text: str, path: Path) -> tuple[list[str], str]:
    first_line = text.split("\n", 1)[0].rstrip("\r")
    if not first_line.strip():
        raise DatasetError(f"{path}: the first line is empty; expected a header row naming the columns.")
    # The separator is the candidate that splits the header into the most columns.
    separator = max(SEPARATORS, key=first_line.count)
    header = next(csv.reader([first_line], delimiter=separator))
    return [name.strip() for name in header], separator


def _csv_rows(text: str, separator: str) -> Iterator[tuple[int, dict]]:
    reader = csv.DictReader(io.StringIO(text), delimiter=separator)
    for row in reader:
        yield reader.line_num, row


def _parquet_rows(path: Path) -> Iterator[tuple[int, dict]]:
    try:
        import pyarrow.parquet as parquet
    except ImportError:
        raise DatasetError("Reading Parquet needs pyarrow; install the train extra: pip install -e '.[train]'.") from None
    try:
        table = parquet.read_table(path)
    except Exception as error:  # pyarrow raises several unrelated exception types
        raise DatasetError(f"{path}: cannot read the Parquet file: {error}") from error
    # Parquet has no lines, so a row's number is its 1-based position.
    for number, row in enumerate(table.to_pylist(), start=1):
        yield number, row


def _numbered_lines(path: Path) -> Iterator[tuple[int, str]]:
    for line_number, row in enumerate(_read_any_text(path).splitlines(), start=1):
        if row.strip():
            yield line_number, row


def _read_any_text(path: Path) -> str:
    """Read UTF-8, falling back to Latin-1 (ML-1M's movies.dat is Latin-1)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DatasetError(f"{path} not found.") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def _require_rows(interactions: list[Interaction], path: Path) -> None:
    if not interactions:
        raise DatasetError(f"{path} contains no valid events.")


def _fingerprint(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        if path.is_file():
            digest.update(path.name.encode("utf-8") + b"\0")
            digest.update(path.read_bytes())
    return digest.hexdigest()
