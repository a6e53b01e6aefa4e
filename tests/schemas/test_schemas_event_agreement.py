"""Property test: the event schema and decode_event accept and reject the same generated events.

The only allowed difference is the documented decoder-only rule: a schema-valid event
whose type is not configured is rejected by the decoder with unknown_event_type. The
strategies below never produce the other decoder-only cases (dates that do not exist,
offsets that move an instant across 1970 or 3000), which the example files cover.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas import load_validator
from worker.events import KNOWN_EVENT_TYPES, InvalidEvent, decode_event

VALIDATOR = load_validator("event")
MISSING = object()

ids = st.one_of(
    st.text(max_size=3),
    st.text(min_size=250, max_size=260, alphabet="ab"),
    st.sampled_from(["u\x00", "u\n", "\x7f", "\x85", "caf\u00e9", " ", "\u2028"]),
    st.integers(min_value=-3, max_value=2**64),
    st.sampled_from([2**63 - 1, 2**63, 7.0, 7.5, -0.0, 1e19, True, None, [], {}]),
)
event_types = st.one_of(
    st.sampled_from(sorted(KNOWN_EVENT_TYPES)),
    st.sampled_from(["View", "view\n", "", "a" * 64, "a" * 65, "add-to-cart", "9lives", "teleport"]),
    st.text(max_size=5),
    st.integers(),
)
# Offsets of at most 23:59 never cross the range bounds from these dates.
instants = st.datetimes(min_value=datetime(1970, 1, 2), max_value=datetime(2999, 12, 30))
offsets = st.integers(min_value=-(23 * 60 + 59), max_value=23 * 60 + 59)


def _rfc3339(moment: datetime, offset_minutes: int, fraction_digits: int) -> str:
    local = moment.replace(tzinfo=timezone(timedelta(minutes=offset_minutes)))
    text = local.strftime("%Y-%m-%dT%H:%M:%S")
    if fraction_digits:
        text += "." + f"{local.microsecond:06d}{0:03d}"[:fraction_digits]
    if offset_minutes == 0:
        return text + "Z"
    sign = "+" if offset_minutes > 0 else "-"
    hours, minutes = divmod(abs(offset_minutes), 60)
    return f"{text}{sign}{hours:02d}:{minutes:02d}"


timestamps = st.one_of(
    st.integers(min_value=-2, max_value=32_503_680_000_001),
    st.sampled_from([0, 32_503_679_999_999, 32_503_680_000_000, 1.5e12, 1714564800000.5, "", "now", True, None]),
    st.builds(_rfc3339, instants, offsets, st.integers(min_value=0, max_value=9)),
    st.builds(lambda moment: moment.isoformat(), instants),  # no offset: invalid
    st.text(max_size=8),
)
values = st.one_of(
    st.none(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(),
    st.sampled_from([10**400, "4", True, [1]]),
)


def _field(strategy):
    return st.one_of(strategy, st.just(MISSING))


plain_ids = st.text(st.characters(exclude_categories=("Cc", "Cs")), min_size=1, max_size=12)
# A plausible event, then up to two fields replaced by values from the wide strategies
# (which also produce valid values) or removed.
valid_events = st.fixed_dictionaries(
    {
        "event_id": plain_ids,
        "user_id": st.one_of(plain_ids, st.integers(min_value=0, max_value=2**63 - 1)),
        "item_id": st.one_of(plain_ids, st.integers(min_value=0, max_value=2**63 - 1)),
        "event_type": st.sampled_from(sorted(KNOWN_EVENT_TYPES)),
        "timestamp": st.one_of(
            st.integers(min_value=0, max_value=32_503_679_999_999),
            st.builds(_rfc3339, instants, offsets, st.integers(min_value=0, max_value=9)),
        ),
    },
    optional={"value": st.one_of(st.none(), st.floats(allow_nan=False, allow_infinity=False)), "extra": st.text(max_size=3)},
)
WIDE = {"event_id": ids, "user_id": ids, "item_id": ids, "event_type": event_types, "timestamp": timestamps, "value": values}
mutations = st.lists(st.sampled_from(sorted(WIDE)).flatmap(lambda name: st.tuples(st.just(name), _field(WIDE[name]))), max_size=2)


def _apply(event: dict, changes: list[tuple[str, object]]) -> dict:
    document = dict(event)
    for name, value in changes:
        if value is MISSING:
            document.pop(name, None)
        else:
            document[name] = value
    return document


events = st.builds(_apply, valid_events, mutations)


def _schema_accepts(data: bytes) -> bool:
    def reject(name: str) -> None:
        raise ValueError(name)

    try:
        document = json.loads(data, parse_constant=reject)
    except ValueError:
        return False
    return VALIDATOR.is_valid(document)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(events)
def test_schema_and_decoder_agree_on_generated_events(document: dict) -> None:
    data = json.dumps(document).encode("utf-8")
    schema_ok = _schema_accepts(data)

    try:
        decode_event(None, data, event_types=KNOWN_EVENT_TYPES, require_key=False)
        decoder_ok, reason = True, None
    except InvalidEvent as exc:
        decoder_ok, reason = False, exc.reason

    if schema_ok and not decoder_ok:
        assert reason == "unknown_event_type", f"only the decoder rejected {document!r}: {reason}"
    else:
        assert schema_ok == decoder_ok, f"schema={schema_ok} decoder={decoder_ok} reason={reason} for {document!r}"
