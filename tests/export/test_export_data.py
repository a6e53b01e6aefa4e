from __future__ import annotations

import http.server
import io
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import pytest
from export_helpers import REPO_ROOT

from export import data
from export.__main__ import main
from export.data import DatasetError, Interaction, download_movielens, load_item_titles, load_movielens, resolve_dataset_dir

SYNTHETIC_RATINGS = "10\t7\t4\t1000\n10\t8\t5\t999\n11\t7\t3\t1001\n"


def write_dataset(folder: Path, ratings: str = SYNTHETIC_RATINGS) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "u.data").write_text(ratings, encoding="ascii")
    return folder


def test_load_movielens_keeps_file_order_and_fields(tmp_path):
    dataset_dir = write_dataset(tmp_path / "ml-100k")

    interactions = load_movielens(dataset_dir)

    assert interactions == [
        Interaction("10", "7", 1_000_000, "rating", 4.0, 1),
        Interaction("10", "8", 999_000, "rating", 5.0, 2),
        Interaction("11", "7", 1_001_000, "rating", 3.0, 3),
    ]


def test_load_movielens_real_file(movielens_path):
    interactions = load_movielens(movielens_path)

    assert len(interactions) == 100_000
    assert len({interaction.user_id for interaction in interactions}) == 943
    assert len({interaction.item_id for interaction in interactions}) == 1682
    assert all(isinstance(interaction.timestamp_ms, int) for interaction in interactions[:100])
    assert interactions[0].line == 1
    assert interactions[-1].line == 100_000


@pytest.mark.parametrize(
    ("bad_row", "expected"),
    [
        ("12\t9\t4", "found 3"),
        ("12\t9\tfour\t1000", "'four'"),
        ("12\t9\t4\t10.5", "'10.5'"),
        ("12\t\t4\t1000", "empty item id"),
        ("", "found 1"),
    ],
)
def test_malformed_rating_row_names_file_line_and_value(tmp_path, bad_row, expected):
    dataset_dir = write_dataset(tmp_path / "ml-100k", SYNTHETIC_RATINGS + bad_row + "\n10\t9\t1\t5\n")

    with pytest.raises(DatasetError) as raised:
        load_movielens(dataset_dir)

    message = str(raised.value)
    assert "u.data" in message
    assert "line 4" in message
    assert expected in message


def test_load_item_titles_reads_latin1(tmp_path):
    flags = "|".join(["0"] * 19)
    text = f"1|Caf\xe9 Society (1995)|01-Jan-1995||http://example.invalid/1|{flags}\n2|Plain (1996)|||x|{flags}\n"
    (tmp_path / "u.item").write_bytes(text.encode("latin-1"))

    titles = load_item_titles(tmp_path)

    assert titles == {"1": "Café Society (1995)", "2": "Plain (1996)"}


def test_malformed_item_row_names_line(tmp_path):
    flags = "|".join(["0"] * 19)
    (tmp_path / "u.item").write_text(f"1|A|d||u|{flags}\n2|B|d\n", encoding="latin-1")

    with pytest.raises(DatasetError, match=r"u\.item, line 2: expected 24"):
        load_item_titles(tmp_path)


def test_load_item_titles_real_file(movielens_path):
    titles = load_item_titles(movielens_path)

    assert len(titles) == 1682
    assert titles["1"] == "Toy Story (1995)"


def test_resolve_accepts_dataset_folder_or_parent(tmp_path):
    dataset_dir = write_dataset(tmp_path / "ml-100k")

    assert resolve_dataset_dir(str(dataset_dir)) == dataset_dir
    assert resolve_dataset_dir(str(tmp_path)) == dataset_dir


def test_resolve_uses_env_before_shared_folder(tmp_path, monkeypatch):
    dataset_dir = write_dataset(tmp_path / "ml-100k")
    monkeypatch.setenv("STREAMREC_DATA_DIR", str(tmp_path))

    assert resolve_dataset_dir(None) == dataset_dir


def test_resolve_falls_back_to_cache(tmp_path, monkeypatch):
    cached = write_dataset(tmp_path / "cache" / "ml-100k")
    monkeypatch.delenv("STREAMREC_DATA_DIR", raising=False)
    monkeypatch.setenv("STREAMREC_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(data, "SHARED_DATA_DIR", tmp_path / "no-shared")

    assert resolve_dataset_dir(None) == cached


def test_missing_dataset_error_lists_places_and_fixes(tmp_path, monkeypatch):
    monkeypatch.delenv("STREAMREC_DATA_DIR", raising=False)
    monkeypatch.setenv("STREAMREC_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(data, "SHARED_DATA_DIR", tmp_path / "no-shared")

    with pytest.raises(DatasetError) as raised:
        resolve_dataset_dir(None)

    message = str(raised.value)
    assert str(tmp_path / "no-shared" / "ml-100k") in message
    assert str(tmp_path / "cache" / "ml-100k") in message
    assert "STREAMREC_DATA_DIR" in message
    assert "--data" in message
    assert "python -m export download" in message


def test_explicit_path_without_dataset_raises(tmp_path):
    with pytest.raises(DatasetError, match="not found in"):
        resolve_dataset_dir(str(tmp_path / "nowhere"))


def synthetic_zip(members: dict[str, str]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, text in members.items():
            archive.writestr(name, text)
    return buffer.getvalue()


@pytest.fixture
def zip_server(monkeypatch):
    """Serve bytes from a loopback HTTP server; yields publish(path, body or None) -> URL."""
    # A proxy setting must not divert loopback requests.
    for variable in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(variable, raising=False)
    payloads: dict[str, bytes] = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = payloads.get(self.path)
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()

    def publish(path: str, body: bytes | None) -> str:
        if body is not None:
            payloads[path] = body
        return f"http://127.0.0.1:{server.server_address[1]}{path}"

    yield publish
    server.shutdown()
    server.server_close()


def test_download_unpacks_and_reports_progress(tmp_path, zip_server):
    url = zip_server("/ml-100k.zip", synthetic_zip({"ml-100k/u.data": SYNTHETIC_RATINGS, "ml-100k/README": "x"}))
    progress_calls = []

    dataset_dir = download_movielens(tmp_path / "cache", url=url, progress=lambda got, total: progress_calls.append((got, total)))

    assert dataset_dir == tmp_path / "cache" / "ml-100k"
    assert len(load_movielens(dataset_dir)) == 3
    assert progress_calls[-1][0] == progress_calls[-1][1]
    assert resolve_dataset_dir(str(tmp_path / "cache")) == dataset_dir


def test_download_rejects_archive_without_ratings(tmp_path, zip_server):
    url = zip_server("/bad.zip", synthetic_zip({"ml-100k/README": "no ratings here"}))

    with pytest.raises(DatasetError, match="has no ml-100k/u.data"):
        download_movielens(tmp_path / "cache", url=url, progress=None)
    assert not (tmp_path / "cache" / "ml-100k").exists()


def test_download_rejects_member_outside_dataset(tmp_path, zip_server):
    url = zip_server("/evil.zip", synthetic_zip({"ml-100k/u.data": SYNTHETIC_RATINGS, "../escape": "x"}))

    with pytest.raises(DatasetError, match="outside ml-100k/"):
        download_movielens(tmp_path / "cache", url=url, progress=None)


def test_download_rejects_wrong_checksum(tmp_path, zip_server):
    url = zip_server("/ml-100k.zip", synthetic_zip({"ml-100k/u.data": SYNTHETIC_RATINGS}))

    with pytest.raises(DatasetError, match="sha256"):
        download_movielens(tmp_path / "cache", url=url, expected_sha256="0" * 64, progress=None)


def test_download_rejects_non_zip(tmp_path, zip_server):
    url = zip_server("/page.zip", b"<html>not a zip</html>")

    with pytest.raises(DatasetError, match="not a zip archive"):
        download_movielens(tmp_path / "cache", url=url, progress=None)


def test_download_failure_names_url(tmp_path, zip_server):
    url = zip_server("/missing.zip", None)

    with pytest.raises(DatasetError, match="missing.zip failed: the server returned HTTP 404"):
        download_movielens(tmp_path / "cache", url=url, progress=None)


def test_cli_download_into_cache(tmp_path, zip_server, capsys):
    url = zip_server("/ml-100k.zip", synthetic_zip({"ml-100k/u.data": SYNTHETIC_RATINGS}))

    status = main(["download", "--cache", str(tmp_path / "cache"), "--url", url])

    assert status == 0
    assert f"ml-100k is in {tmp_path / 'cache' / 'ml-100k'}" in capsys.readouterr().out
    assert len(load_movielens(tmp_path / "cache" / "ml-100k")) == 3


def test_cli_download_failure_is_error_line(tmp_path, zip_server, capsys):
    status = main(["download", "--cache", str(tmp_path / "cache"), "--url", zip_server("/gone.zip", None)])

    assert status == 1
    assert capsys.readouterr().err.startswith("error: Download of http://127.0.0.1:")


def test_package_and_loaders_do_not_import_torch():
    code = "import sys, export, export.data, export.sequences; print('torch' in sys.modules)"
    completed = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)

    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == "False"
