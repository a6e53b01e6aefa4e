"""Event-log formats: MovieLens .dat, session logs, CSV and Parquet tables, bad-row reports."""

from __future__ import annotations

import json

import pytest

from export.__main__ import main
from export.data import DatasetError, load_movielens_item_tags
from export.formats import detect_format, load_event_log, parse_columns
from export.sequences import split_leave_one_out


def write(path, text: str, encoding: str = "utf-8"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding=encoding)
    return path


def test_movielens_dat_layout_with_genres_and_year(tmp_path):
    folder = tmp_path / "ml-1m"
    write(folder / "ratings.dat", "1::10::5::978300760\n1::20::3::978300761\n2::10::4::978300762\n")
    write(folder / "movies.dat", "10::Caf\xe9 (1995)::Comedy|Drama\n20::Old One (1972)::Horror\n", encoding="latin-1")

    log = load_event_log(folder)

    assert detect_format(folder, None) == "movielens-dat"
    assert [(event.user_id, event.item_id, event.timestamp_ms, event.value) for event in log.interactions] == [
        ("1", "10", 978300760000, 5.0), ("1", "20", 978300761000, 3.0), ("2", "10", 978300762000, 4.0),
    ]
    assert log.titles["10"] == "Café (1995)"
    assert log.item_tags == {"10": ["genre=Comedy", "genre=Drama", "release=1995"], "20": ["genre=Horror", "release=1970s"]}


def test_movielens_100k_item_tags(movielens_path):
    tags = load_movielens_item_tags(movielens_path)

    assert len(tags) == 1682
    assert tags["1"] == ["genre=Animation", "genre=Children's", "genre=Comedy", "release=1995"]


@pytest.mark.parametrize("separator", ["\t", ",", ";"])
def test_session_log_without_user_uses_session_as_sequence(tmp_path, separator):
    rows = ["SessionId,ItemId,Time", "s1,a,100", "s1,b,101", "s2,a,50", "s1,c,102.5"]
    path = write(tmp_path / "clicks.txt", "\n".join(row.replace(",", separator) for row in rows) + "\n")

    log = load_event_log(path)

    assert [(event.user_id, event.item_id, event.timestamp_ms, event.event_type) for event in log.interactions] == [
        ("s1", "a", 100_000, "click"), ("s1", "b", 101_000, "click"), ("s2", "a", 50_000, "click"),
        ("s1", "c", 102_500, "click"),
    ]
    assert [event.line for event in log.interactions] == [2, 3, 4, 5]


def test_session_log_with_user_groups_sessions_by_user(tmp_path):
    rows = ["s1\ta\t1\tu1", "s2\tb\t5\tu1", "s3\tc\t2\tu2", "s2\td\t6\tu1"]
    path = write(tmp_path / "log.tsv", "session_id\titem_id\ttimestamp\tuser_id\n" + "\n".join(rows) + "\n")

    dataset = split_leave_one_out(load_event_log(path).interactions)

    # u1's sessions s1 and s2 form one sequence a, b, d; u2 has too few events to split.
    assert [user.user_id for user in dataset.users] == ["u1"]
    assert dataset.skipped_users == ["u2"]
    vocabulary = dataset.vocabulary
    assert [vocabulary.id_of(int(index)) for index in dataset.users[0].train_items] == ["a"]
    assert vocabulary.id_of(dataset.users[0].valid_item) == "b"
    assert vocabulary.id_of(dataset.users[0].test_item) == "d"


def test_session_log_without_session_column_is_rejected(tmp_path):
    path = write(tmp_path / "log.csv", "ItemId,Time\na,1\n")

    with pytest.raises(DatasetError, match="lacks the session column"):
        load_event_log(path)


def test_csv_table_with_column_mapping(tmp_path):
    path = write(
        tmp_path / "events.csv",
        "uid,sku,ts,action,price,tags\n"
        "7,x1,2024-01-01T00:00:00Z,view,,shoes|red\n"
        "7,x2,1704067201,purchase,19.5,hats\n",
    )
    columns = parse_columns("user=uid,item=sku,time=ts,type=action,value=price,categories=tags")

    log = load_event_log(path, columns=columns)

    assert [(event.user_id, event.item_id, event.timestamp_ms, event.event_type, event.value) for event in log.interactions] == [
        ("7", "x1", 1_704_067_200_000, "view", None), ("7", "x2", 1_704_067_201_000, "purchase", 19.5),
    ]
    assert log.item_tags == {"x1": ["category=red", "category=shoes"], "x2": ["category=hats"]}


def test_parquet_table(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"u": ["a", "a", "b"], "i": [1, 2, 1], "t": [1_000, 2_000, 3_000], "r": [4.0, None, 2.0]})
    pq.write_table(table, tmp_path / "events.parquet")

    log = load_event_log(tmp_path / "events.parquet", columns=parse_columns("user=u,item=i,time=t,value=r"), time_unit="ms")

    assert [(event.user_id, event.item_id, event.timestamp_ms, event.value) for event in log.interactions] == [
        ("a", "1", 1_000, 4.0), ("a", "2", 2_000, None), ("b", "1", 3_000, 2.0),
    ]


BAD_LOG = (
    "SessionId\tItemId\tTime\n"
    "s1\ta\t1\n"
    "s1\t\t2\n"  # line 3: empty item
    "s1\tb\tlater\n"  # line 4: invalid time
    "s2\tc\t4\textra\n"  # line 5: too many fields
    "s2\td\t5\n"
)


def test_bad_rows_fail_loading_with_lines_and_count(tmp_path):
    path = write(tmp_path / "bad.tsv", BAD_LOG)

    with pytest.raises(DatasetError) as raised:
        load_event_log(path)

    message = str(raised.value)
    assert "3 of 5 rows are invalid" in message
    assert "line 3: empty item id" in message
    assert "line 4: invalid time 'later'" in message
    assert "line 5: 1 more fields than the header" in message
    assert "--max-bad-rows 3" in message


def test_bad_rows_within_limit_left_out(tmp_path):
    path = write(tmp_path / "bad.tsv", BAD_LOG)

    log = load_event_log(path, max_bad_rows=3)

    assert [event.item_id for event in log.interactions] == ["a", "d"]
    assert log.bad_rows.count == 3
    assert [line for line, _ in log.bad_rows.examples] == [3, 4, 5]


def test_bad_row_report_shows_first_ten(tmp_path):
    rows = "".join(f"s{index}\tx\tnot-a-time\n" for index in range(25))
    path = write(tmp_path / "bad.tsv", "SessionId\tItemId\tTime\ns0\ta\t1\n" + rows)

    with pytest.raises(DatasetError) as raised:
        load_event_log(path)

    message = str(raised.value)
    assert "25 of 26 rows are invalid (first 10 shown)" in message
    assert "line 12:" in message
    assert "line 13:" not in message


def test_movielens_bad_rows_reported(tmp_path):
    folder = tmp_path / "ml-100k"
    write(folder / "u.data", "1\t10\t4\t100\n1\t11\tfour\t101\n1\t12\t3\t102\n")

    with pytest.raises(DatasetError, match=r"line 2: invalid rating 'four'"):
        load_event_log(folder)
    log = load_event_log(folder, max_bad_rows=1)

    assert [event.item_id for event in log.interactions] == ["10", "12"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("user=uid,item=sku", "lacks time"),
        ("user=uid,item=sku,time=ts,colour=c", "Unknown column role 'colour'"),
        ("item=sku,time=ts", "needs user or session"),
        ("user=uid,item,time=ts", "Invalid column mapping 'item'"),
    ],
)
def test_invalid_column_mapping_is_rejected(text, expected):
    with pytest.raises(DatasetError, match=expected):
        parse_columns(text)


def test_mapping_to_missing_column_is_rejected(tmp_path):
    path = write(tmp_path / "events.csv", "uid,sku,ts\n1,a,1\n")

    with pytest.raises(DatasetError, match=r"column when not found in the header \['uid', 'sku', 'ts'\]"):
        load_event_log(path, columns=parse_columns("user=uid,item=sku,time=when"))


def test_cli_trains_on_session_log_with_bad_rows(tmp_path, capsys):
    lines = ["SessionId;ItemId;Time"]
    for session in range(30):
        lines += [f"s{session};{(session + step) % 12 + 1};{step}" for step in range(8)]
    lines.append("s99;;1")
    path = write(tmp_path / "sessions.csv", "\n".join(lines) + "\n")
    out_dir = tmp_path / "bundle"

    status = main([
        "train", "--data", str(path), "--out", str(out_dir), "--epochs", "1", "--hidden-size", "8",
        "--embedding-size", "4", "--k", "3", "--max-bad-rows", "1", "--quiet", "--no-report",
    ])
    printed = capsys.readouterr().out

    assert status == 0
    assert f"note: left out {path}: 1 of 241 rows are invalid" in printed
    manifest = json.loads((out_dir / "manifest.json").read_text())
    assert manifest["training_data"]["dataset"] == "sessions"
    assert manifest["training_data"]["bad_rows_left_out"] == 1
    assert manifest["event_types"][1] == "click"


def test_file_format_given_a_folder_is_rejected(tmp_path):
    with pytest.raises(DatasetError, match="is not a file; --format sessions reads one event-log file"):
        load_event_log(tmp_path, format="sessions")


def test_cli_missing_log_file_is_one_line_error(tmp_path, capsys):
    status = main(["train", "--data", str(tmp_path / "absent.csv"), "--out", str(tmp_path / "out")])

    assert status == 1
    assert f"error: {tmp_path / 'absent.csv'} not found; check --data." in capsys.readouterr().err
