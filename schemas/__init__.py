"""JSON Schema (draft 2020-12) files for the event, recommendation and dead-letter messages.

The files in this package are the source of truth for the wire formats. Example messages
live under ``examples/<schema name>/``. A ``valid-*`` file must pass its schema and an
``invalid-*`` file must fail it. The exception is an ``invalid-decoder-only-*`` event
example: it passes the schema but breaks a rule that only the worker's decoder checks,
such as an event type the model does not know. Examples that are not JSON documents at
all end in ``.txt`` instead of ``.json``.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

    from jsonschema.protocols import Validator

SCHEMA_NAMES = ("event", "recommendation", "dead_letter")

# Event examples with this prefix are valid JSON Schema instances that the decoder rejects.
DECODER_ONLY_PREFIX = "invalid-decoder-only-"


def load_schema(name: str) -> dict[str, Any]:
    """Read and parse ``<name>.schema.json``; each call returns a fresh dict."""
    _check_name(name)
    text = resources.files(__package__).joinpath(f"{name}.schema.json").read_text(encoding="utf-8")
    return json.loads(text)


def load_validator(name: str) -> Validator:
    """Build a draft 2020-12 validator for one schema.

    Formats such as ``date-time`` are annotations only, as the draft defines by default;
    the schemas spell out with patterns every rule that they enforce.
    """
    # Imported here so that the worker's hot path never loads jsonschema.
    from jsonschema import Draft202012Validator

    schema = load_schema(name)
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


def example_files(name: str) -> list[Traversable]:
    """List the example messages of one schema, sorted by file name."""
    _check_name(name)
    folder = resources.files(__package__).joinpath("examples", name)
    return sorted((entry for entry in folder.iterdir() if entry.is_file()), key=lambda entry: entry.name)


def _check_name(name: str) -> None:
    if name not in SCHEMA_NAMES:
        raise ValueError(f"unknown schema {name!r}; expected one of {', '.join(SCHEMA_NAMES)}")
