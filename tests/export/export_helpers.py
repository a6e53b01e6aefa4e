"""Helpers shared by the export tests (a unique module name, since tests/ has no packages)."""

from __future__ import annotations

import os
from pathlib import Path

from export.data import Interaction

REPO_ROOT = Path(__file__).resolve().parents[2]


def movielens_dir() -> Path:
    """Return the ml-100k folder from STREAMREC_DATA_DIR or the shared data folder."""
    root = Path(os.environ.get("STREAMREC_DATA_DIR") or REPO_ROOT.parent / "shared" / "data")
    dataset_dir = root / "ml-100k"
    if not (dataset_dir / "u.data").is_file():
        raise FileNotFoundError(
            f"MovieLens-100K not found at {dataset_dir}; set STREAMREC_DATA_DIR to a folder containing ml-100k/."
        )
    return dataset_dir


def make_interactions(rows: list[tuple[str, str, int]]) -> list[Interaction]:
    """Build rating interactions from (user, item, timestamp in seconds) rows, in row order."""
    return [
        Interaction(user_id=user, item_id=item, timestamp_ms=seconds * 1000, event_type="rating", value=4.0, line=line)
        for line, (user, item, seconds) in enumerate(rows, start=1)
    ]
