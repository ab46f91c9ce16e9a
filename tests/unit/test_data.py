"""Loaders for every supported layout, their error reports, `fetch`, and `paramcast data`."""

from __future__ import annotations

import csv
import functools
import hashlib
import http.server
import io
import json
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

import paramcast.common.data as data
import paramcast.common.fetch as fetching
from paramcast.cli import main
from paramcast.common.data import FORMATS, detect_format, load_interactions
from paramcast.common.errors import DataFormatError, IntegrityError, InvalidInput
from paramcast.common.fetch import Archive, DownloadFailed, fetch


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def raw_sequences(log) -> dict[str, list[str]]:
    """Each user's sequence spelled in the source file's ids, for comparing against the raw file."""
    pairs = zip(log.user_raw_ids, log.sequences, strict=True)
    return {u: [log.item_raw_ids[i] for i in seq] for u, seq in pairs}


def assert_well_formed(log) -> None:
    """Invariants every loader promises, whatever the format."""
    all_items = np.concatenate(log.sequences)
    assert all_items.dtype == np.int64
    assert all_items.min() >= 1  # 0 is padding, never an interaction
    assert set(np.unique(all_items).tolist()) == set(range(1, log.n_items + 1))  # contiguous, all used
    assert len(log.item_raw_ids) == log.n_items + 1 and log.item_raw_ids[0] == ""
    assert len(log.user_raw_ids) == log.n_users == len(set(log.user_raw_ids))
    raw_items = [int(r) for r in log.item_raw_ids[1:]]
    assert raw_items == sorted(raw_items)  # ids follow ascending raw-id order
    raw_users = [int(r) for r in log.user_raw_ids]
    assert raw_users == sorted(raw_users)
    if log.timestamps is not None:
        for seq, ts in zip(log.sequences, log.timestamps, strict=True):
            assert len(seq) == len(ts) and np.all(np.diff(ts) >= 0)
    for name, feature in log.item_features.items():
        assert feature.shape[0] == log.n_items + 1, name
        assert not feature[0].any(), f"padding row of {name} must be zero"


# ----------------------------------------------------------------------------- real datasets

def test_ml_100k_counts_order_and_genres(shared_data):
    log = load_interactions(shared_data / "ml-100k")
    assert (log.n_users, log.n_items, log.n_interactions) == (943, 1682, 100000)
    assert log.name == "ml-100k"
    assert_well_formed(log)
    # ml-100k ids are already contiguous from 1, so they are kept.
    assert log.item_raw_ids[1:] == [str(i) for i in range(1, 1683)]
    assert log.user_raw_ids == [str(u) for u in range(1, 944)]

    # Recompute one user's sequence straight from u.data: sort by timestamp, ties in file order.
    rows = [line.split("\t") for line in (shared_data / "ml-100k" / "u.data").read_text().splitlines()]
    mine = [(int(t), k, i) for k, (u, i, _, t) in enumerate(rows) if u == "1"]
    assert raw_sequences(log)["1"] == [i for _, _, i in sorted(mine)]
    assert log.timestamps[0].tolist() == sorted(t for t, _, _ in mine)

    genres = log.item_features["genres"]
    assert genres.shape == (1683, 19) and genres.dtype == np.uint8
    toy_story = (shared_data / "ml-100k" / "u.item").read_text("latin-1").splitlines()[0].split("|")
    assert toy_story[1] == "Toy Story (1995)"
    assert genres[1].tolist() == [int(f) for f in toy_story[5:]]
    assert genres[1, [3, 4, 5]].tolist() == [1, 1, 1]  # Animation, Children's, Comedy

    # u.user, recomputed from the file: user 1 is `1|24|M|technician|85711`.
    users = log.user_features
    assert sorted(users) == ["age", "gender", "occupation", "region"]
    assert all(v.shape == (943,) and v.dtype == np.int64 and v.min() >= 1 for v in users.values())
    people = [line.split("|") for line in (shared_data / "ml-100k" / "u.user").read_text("latin-1").splitlines()]
    occupations = sorted({p[3] for p in people})
    assert users["occupation"][0] == occupations.index("technician") + 1 and users["occupation"].max() == 21
    assert users["gender"][0] == 2 and users["gender"][1] == 1  # F = 1, M = 2
    assert users["age"][0] == 2  # 24: the 18-24 group, second of those present (under 18 is first)
    ages = np.array([int(p[1]) for p in people])
    assert np.array_equal(users["age"] == 1, ages < 18)
    assert np.array_equal(users["age"] == users["age"].max(), ages >= 56)


def test_amazon_beauty_counts_sequences_and_attributes(shared_data):
    # Load time is a benchmark's business (a timed assertion fails on a busy machine, not on a regression).
    log = load_interactions(shared_data / "amazon-beauty")
    assert (log.n_users, log.n_items, log.n_interactions) == (22363, 12101, 198502)
    assert log.name == "amazon-beauty" and log.timestamps is None
    assert_well_formed(log)
    lines = (shared_data / "amazon-beauty" / "Beauty.txt").read_text().splitlines()
    # File order is time order in this layout; every user's line comes back unchanged.
    assert raw_sequences(log) == {u: items for u, *items in (line.split() for line in lines)}

    table = json.loads((shared_data / "amazon-beauty" / "Beauty_item2attributes.json").read_text())
    attributes = log.item_features["attributes"]
    assert attributes.dtype == np.int64
    assert attributes.shape == (12102, max(len(v) for v in table.values()))
    vocabulary = sorted({a for v in table.values() for a in v})
    code = {a: k for k, a in enumerate(vocabulary, start=1)}
    for raw in ("4", "83", "1109", "12101"):
        item = log.item_raw_ids.index(raw)
        expected = [code[a] for a in table[raw]]
        assert attributes[item].tolist() == expected + [0] * (attributes.shape[1] - len(expected))


def test_grocery_counts_match_an_independent_count(shared_data):
    folder = shared_data / "grocery"
    with open(folder / "train.csv", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    started = time.perf_counter()
    log = load_interactions(folder)
    elapsed = time.perf_counter() - started
    assert log.n_users == len({r["user_id"] for r in rows}) == 14681
    assert log.n_items == len({r["item_id"] for r in rows}) == 8687
    assert log.n_interactions == len(rows) == 121892
    assert elapsed < 2.0
    assert_well_formed(log)

    user = rows[0]["user_id"]
    mine = sorted((int(r["time"]), k, r["item_id"]) for k, r in enumerate(rows) if r["user_id"] == user)
    u = log.user_raw_ids.index(user)
    assert raw_sequences(log)[user] == [i for _, _, i in mine]
    assert log.timestamps[u].tolist() == [t for t, _, _ in mine]

    # Category codes are the raw categories renumbered 1..K in ascending order.
    with open(folder / "item_meta.csv", newline="") as f:
        meta = {r["item_id"]: int(r["i_category"]) for r in csv.DictReader(f, delimiter="\t")}
    raw = np.array([meta[i] for i in log.item_raw_ids[1:]])
    expected = np.unique(raw, return_inverse=True)[1] + 1
    assert log.item_features["category"].dtype == np.int64
    assert log.item_features["category"][1:].tolist() == expected.tolist()


def test_real_folders_are_detected(shared_data):
    assert detect_format(shared_data / "ml-100k") == "ml-100k"
    assert detect_format(shared_data / "ml-100k" / "u.data") == "ml-100k"
    assert detect_format(shared_data / "amazon-beauty") == "sequences"
    assert detect_format(shared_data / "grocery") == "rechorus"
    assert detect_format(shared_data / "grocery" / "train.csv") == "rechorus"


# ----------------------------------------------------------------------------- every layout, small

def test_ml_1m_layout_sorts_by_time_keeps_ties_and_reads_genres(tmp_path):
    folder = tmp_path / "ml-1m"
    write(folder / "ratings.dat",
          "2::20::5::300\n1::10::3::200\n1::30::4::100\n1::20::1::200\n2::10::2::100\n1::30::4::100\n")
    write(folder / "movies.dat", (
        "10::Am\xe9lie (2001)::Comedy|Romance\n"  # latin-1, as GroupLens ships it
        "20::Heat (1995)::Action|Crime|Thriller\n"
        "30::Alien (1979)::Horror|Sci-Fi\n"
        "99::Never Rated (1990)::Western\n").encode("latin-1"))
    assert detect_format(folder) == "ml-1m"
    log = load_interactions(folder)
    assert_well_formed(log)
    assert log.name == "ml-1m" and log.user_raw_ids == ["1", "2"]
    # user 1: time 100 twice (file order kept, duplicate kept), then 200 twice in file order.
    assert raw_sequences(log) == {"1": ["30", "30", "10", "20"], "2": ["10", "20"]}
    assert log.timestamps[0].tolist() == [100, 100, 200, 200]
    genres = log.item_features["genres"]
    names = ["Action", "Comedy", "Crime", "Horror", "Romance", "Sci-Fi", "Thriller", "Western"]
    assert genres.shape == (4, len(names))
    assert [names[j] for j in np.flatnonzero(genres[1])] == ["Comedy", "Romance"]
    assert [names[j] for j in np.flatnonzero(genres[3])] == ["Horror", "Sci-Fi"]
    assert log.user_features == {}  # no users.dat here


def test_movielens_user_files_give_one_code_per_user_in_both_releases(tmp_path):
    ml_1m = tmp_path / "ml-1m"
    write(ml_1m / "ratings.dat", "5::10::3::100\n2::10::4::100\n9::10::1::100\n")
    # users.dat: gender, age group, occupation code, zip; user 9 is not listed, user 7 never rated
    write(ml_1m / "users.dat", "2::F::1::10::48067\n5::M::56::16::T8H1N\n7::M::25::3::55117\n")
    log = load_interactions(ml_1m)
    assert log.user_raw_ids == ["2", "5", "9"]
    assert {k: v.tolist() for k, v in log.user_features.items()} == {
        "age": [1, 2, 0], "gender": [1, 2, 0], "occupation": [1, 2, 0], "region": [1, 2, 0]}

    ml_100k = tmp_path / "ml-100k"
    write(ml_100k / "u.data", "1\t1\t3\t4\n2\t1\t3\t4\n3\t1\t3\t4\n")
    write(ml_100k / "u.user", "1|17|M|student|02139\n2|56|F|artist|V3N4P\n3|30|M|student|02139\n")
    users = load_interactions(ml_100k).user_features
    assert users["age"].tolist() == [1, 3, 2]  # under 18, 56+, 25-34: the groups present, in order
    assert users["occupation"].tolist() == [2, 1, 2] and users["region"].tolist() == [1, 2, 1]


def test_ml_latest_layout_with_fractional_ratings_and_quoted_titles(tmp_path):
    folder = tmp_path / "ml-latest-small"
    write(folder / "ratings.csv", "userId,movieId,rating,timestamp\n1,5,3.5,20\n1,7,4.0,10\n3,5,0.5,5\n")
    write(folder / "movies.csv", (
        "movieId,title,genres\n"
        '5,"American President, The (1995)",Comedy|Drama|Romance\n'
        "7,Unnamed (2020),(no genres listed)\n"))
    assert detect_format(folder) == "ml-latest"
    log = load_interactions(folder)
    assert_well_formed(log)
    assert raw_sequences(log) == {"1": ["7", "5"], "3": ["5"]}
    assert log.item_features["genres"].tolist() == [[0, 0, 0], [1, 1, 1], [0, 0, 0]]


def test_pairs_keep_file_order_and_number_ids_numerically(tmp_path):
    # Users 9 and 10 check numeric (not string) order; raw items 5, 7, 100 become 1, 2, 3.
    path = write(tmp_path / "ml-1m.txt", "10 100\n9 7\n10 5\n10 5\n9 100\n")
    assert detect_format(path) == "pairs"
    log = load_interactions(path)
    assert_well_formed(log)
    assert log.name == "ml-1m" and log.timestamps is None
    assert log.user_raw_ids == ["9", "10"]
    assert log.item_raw_ids == ["", "5", "7", "100"]
    assert [s.tolist() for s in log.sequences] == [[2, 3], [3, 1, 1]]


def test_sequences_remap_items_and_merge_repeated_users(tmp_path):
    folder = tmp_path / "toys"
    write(folder / "Toys.txt", "2 50 40 40\n1 40 60\n2 70\n")
    write(folder / "Toys_sample.txt", "1 1 2 3\n")  # S3Rec's evaluation negatives, not interactions
    write(folder / "Toys_item2attributes.json", json.dumps({"40": [9, 3], "60": [3], "999": [1, 2, 3]}))
    assert detect_format(folder) == "sequences"
    log = load_interactions(folder)
    assert_well_formed(log)
    assert log.name == "toys"
    assert raw_sequences(log) == {"1": ["40", "60"], "2": ["50", "40", "40", "70"]}
    # Attribute ids of the items that occur (3, 9) are renumbered 1, 2; item 999 never occurs.
    assert log.item_features["attributes"].tolist() == [[0, 0], [2, 1], [0, 0], [1, 0], [0, 0]]


def test_rechorus_folder_reads_train_dev_test_and_item_meta(tmp_path):
    folder = tmp_path / "Grocery"
    write(folder / "train.csv", "time\titem_id\tuser_id\n30\t1\t1\n10\t2\t1\n20\t3\t2\n")
    write(folder / "dev.csv", "user_id\titem_id\ttime\tneg_items\n1\t3\t40\t[1, 2]\n")
    write(folder / "test.csv", "user_id\titem_id\ttime\tneg_items\n1\t2\t40\t[1, 3]\n2\t1\t25\t[2, 3]\n")
    write(folder / "item_meta.csv", "item_id\ti_category\tr_complement\n1\tsnacks\t[2]\n2\tdrinks\t[]\n"
                                    "3\t\t[]\n4\tfruit\t[]\n")
    log = load_interactions(folder)
    assert_well_formed(log)
    # Ties at time 40 keep file order: dev.csv before test.csv.
    assert raw_sequences(log) == {"1": ["2", "1", "3", "2"], "2": ["3", "1"]}
    assert log.timestamps[0].tolist() == [10, 30, 40, 40]
    # Categories renumbered among the items that occur (drinks=1, snacks=2); empty means missing.
    assert log.item_features["category"].tolist() == [0, 2, 1, 0]
    assert "dev.csv" in log.source and "item_meta.csv" in log.source


def test_ml_100k_file_without_side_files(tmp_path):
    path = write(tmp_path / "u1.base", "1\t2\t5\t881250949\n1\t1\t3\t881250940\n")
    log = load_interactions(path, format="ml-100k", name="small")
    assert log.name == "small" and log.item_features == {}
    assert raw_sequences(log) == {"1": ["1", "2"]}


def test_irregular_lines_parse_the_same_as_regular_ones(tmp_path):
    clean = load_interactions(write(tmp_path / "a" / "x.txt", "1 2\n1 3\n2 2\n"), format="pairs")
    messy = load_interactions(write(tmp_path / "b" / "x.txt", "1 2\r\n\n1\t 3\n  \n2  2"), format="pairs")
    assert raw_sequences(messy) == raw_sequences(clean)


def test_results_do_not_depend_on_block_size(tmp_path, monkeypatch):
    lines = [f"{u}::{i}::3::{(u * 7 + i) % 11}" for u in range(1, 30) for i in range(1, 12)]
    folder = tmp_path / "ml-1m"
    write(folder / "ratings.dat", "\n".join(lines) + "\n")
    write(tmp_path / "seq.txt", "".join(f"{u} " + " ".join(str(i) for i in range(u, u + 9)) + "\n"
                                        for u in range(1, 40)))
    big = load_interactions(folder), load_interactions(tmp_path / "seq.txt")
    monkeypatch.setattr(data, "_BLOCK_BYTES", 16)  # a line or two per block
    small = load_interactions(folder), load_interactions(tmp_path / "seq.txt")
    for a, b in zip(big, small, strict=True):
        assert raw_sequences(a) == raw_sequences(b)
    # Line numbers stay right across blocks.
    lines[200] = "5::x::3::9"
    write(folder / "ratings.dat", "\n".join(lines) + "\n")
    with pytest.raises(DataFormatError) as err:
        load_interactions(folder)
    assert err.value.line == 201 and "item_id 'x'" in err.value.problem


# ----------------------------------------------------------------------------- malformed input

@pytest.mark.parametrize("name, fmt, text, line, problem", [
    ("u.data", "ml-100k", "1\t2\t3\t4\n1\t2\t3\n", 2, "expected 4 fields"),
    ("u.data", "ml-100k", "1\t2\t3\t4\n1\tabc\t3\t4\n", 2, "item_id 'abc' is not an integer"),
    ("u.data", "ml-100k", "1\t2\t3\t4\n1\t2\t3\t4.5\n", 2, "timestamp '4.5' is not an integer"),
    ("ratings.dat", "ml-1m", "1::2::3::4\n1::2::3::4::5\n", 2, "expected 4 fields"),
    ("ratings.dat", "ml-1m", "1::2::3::4\n1::2\t3::3::4\n", 2, "is not an integer"),
    ("ratings.csv", "ml-latest", "userId,movieId,rating,timestamp\n1,2,3,4\nu,2,3,4\n", 3, "user_id 'u'"),
    ("ratings.csv", "ml-latest", "user,item,rating,time\n1,2,3,4\n", 1, "header must be"),
    ("x.txt", "pairs", "1 2\n1 2 3\n", 2, "expected 2 fields"),
    ("x.txt", "pairs", "1 2\n1 99999999999999999999\n", 2, "does not fit in 64 bits"),
    ("x.txt", "sequences", "1 2 3\n2 4 five\n", 2, "item 2 'five' is not an integer"),
    ("x.txt", "sequences", "1 2 3\n2\n", 2, "a user without items"),
    ("train.csv", "rechorus", "user_id\titem_id\ttime\n1\t2\t3\n1\t2\tnow\n", 3,
     "time 'now' is not an integer"),
    ("train.csv", "rechorus", "user\titem\ttime\n1\t2\t3\n", 1, "header must name user_id"),
    ("train.csv", "rechorus", "user_id\titem_id\ttime\n", None, "no interactions below the header"),
    ("u.data", "ml-100k", "", None, "empty file"),
    ("x.txt", "pairs", "\n  \n", None, "empty file"),
    ("x.txt", "sequences", "", None, "empty file"),
    ("u.data", "ml-100k", b"1\t2\t3\t4\n1\t2\t3\t\xff\xfe\n", 2, "not UTF-8"),
])
def test_malformed_files_name_file_line_and_problem(tmp_path, name, fmt, text, line, problem):
    path = write(tmp_path / name, text)
    with pytest.raises(DataFormatError) as err:
        load_interactions(path, format=fmt)
    assert err.value.path == str(path)
    assert err.value.line == line
    assert problem in err.value.problem
    assert str(path) in str(err.value)


@pytest.mark.parametrize("side, text, line, problem", [
    ("u.item", "1|Toy Story|x|x|url|0|1\n", 1, "expected 24"),
    ("u.item", "1|Toy Story|x|x|url|" + "|".join(["0"] * 18 + ["2"]) + "\n", 1, "must be 0 or 1"),
    ("u.item", "1|A|x|x|url|" + "|".join(["0"] * 19) + "\nB|A|x|x|url|" + "|".join(["0"] * 19) + "\n",
     2, "movie id 'B'"),
    ("u.user", "1|24|M|technician\n", 1, "expected 5"),
    ("u.user", "1|24|M|technician|85711\n2|old|F|other|94043\n", 2, "age 'old'"),
    ("u.user", "1|-3|M|technician|85711\n", 1, "must not be negative"),
])
def test_malformed_side_files_are_reported(tmp_path, side, text, line, problem):
    write(tmp_path / "u.data", "1\t1\t3\t4\n")
    write(tmp_path / side, text)
    with pytest.raises(DataFormatError) as err:
        load_interactions(tmp_path)
    assert err.value.path == str(tmp_path / side) and err.value.line == line and problem in err.value.problem


def test_malformed_attribute_json_and_item_meta(tmp_path):
    write(tmp_path / "s" / "B.txt", "1 1 2\n")
    write(tmp_path / "s" / "B_item2attributes.json", '{"1": [1],\n "2": [2,]}')
    with pytest.raises(DataFormatError) as err:
        load_interactions(tmp_path / "s")
    assert err.value.line == 2 and "invalid JSON" in err.value.problem
    write(tmp_path / "s" / "B_item2attributes.json", '{"1": ["brand"]}')
    with pytest.raises(DataFormatError, match="list of integers"):
        load_interactions(tmp_path / "s")

    write(tmp_path / "r" / "train.csv", "user_id\titem_id\ttime\n1\t1\t1\n")
    write(tmp_path / "r" / "item_meta.csv", "item_id\ti_category\n1\t0\n2\n")
    with pytest.raises(DataFormatError) as err:
        load_interactions(tmp_path / "r")
    assert err.value.path.endswith("item_meta.csv") and err.value.line == 3


def test_unknown_layouts_and_missing_paths(tmp_path):
    with pytest.raises(DataFormatError) as err:
        detect_format(write(tmp_path / "notes.md", "# hello\nworld\n"))
    assert err.value.line == 1 and "unknown layout" in err.value.problem and "--format" in err.value.problem

    (tmp_path / "empty").mkdir()
    with pytest.raises(DataFormatError, match="u.data .ml-100k.*empty folder"):
        load_interactions(tmp_path / "empty")

    write(tmp_path / "two" / "a.txt", "1 2\n")
    write(tmp_path / "two" / "b.txt", "1 2\n")
    with pytest.raises(DataFormatError, match=r"\['a.txt', 'b.txt'\]"):
        detect_format(tmp_path / "two")

    with pytest.raises(DataFormatError, match="no such file"):
        load_interactions(tmp_path / "missing")
    with pytest.raises(DataFormatError, match="no ratings.dat here"):
        load_interactions(tmp_path / "empty", format="ml-1m")
    with pytest.raises(InvalidInput):
        load_interactions(tmp_path / "two" / "a.txt", format="csv")


def test_detection_reads_the_first_line_and_the_loader_the_rest(tmp_path):
    long_first = write(tmp_path / "long.txt", "1 " + " ".join(map(str, range(1, 30000))) + "\n2 5 6\n")
    assert detect_format(long_first) == "sequences"  # first line far beyond the 64 KiB sniffed
    assert load_interactions(long_first).n_interactions == 29999 + 2
    # A bad later line is not an "unknown layout": the loader names it.
    bad = write(tmp_path / "bad.txt", "1 2 3\n2 3 4\n3 x 5\n")
    with pytest.raises(DataFormatError) as err:
        load_interactions(bad)
    assert err.value.line == 3 and err.value.problem == "item 1 'x' is not an integer"


def test_formats_constant_matches_the_readers():
    assert set(FORMATS) == set(data._READERS)


# ----------------------------------------------------------------------------- fetch

@pytest.fixture
def file_server(tmp_path):
    """A local HTTP server over tmp_path/www on a free port; yields its base URL."""
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", root
    server.shutdown()
    server.server_close()
    thread.join()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep test output clean
        pass


def _zip(members: dict[str, str]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        for name, text in members.items():
            z.writestr(name, text)
    return buffer.getvalue()


def test_fetch_offline_fails_fast_and_says_what_to_do(tmp_path, monkeypatch):
    # Port 9 (discard) on loopback is closed: the connection is refused at once, as offline.
    closed = Archive("http://127.0.0.1:9/ml-100k.zip", "0" * 32, "u.data")
    monkeypatch.setitem(fetching.ARCHIVES, "ml-100k", closed)
    started = time.perf_counter()
    with pytest.raises(DownloadFailed) as err:
        fetch("ml-100k", tmp_path / "datasets", timeout=5)
    assert time.perf_counter() - started < 5
    message = str(err.value)
    assert "127.0.0.1:9/ml-100k.zip" in message
    assert f"paramcast data info {tmp_path / 'datasets' / 'ml-100k'}" in message and "--data" in message
    assert not (tmp_path / "datasets").exists()


def test_fetch_verifies_md5_and_extracts(tmp_path, monkeypatch, file_server):
    url, root = file_server
    archive = _zip({"ml-100k/u.data": "1\t5\t3\t20\n1\t6\t4\t10\n2\t5\t1\t30\n", "ml-100k/README": "x"})
    (root / "ml-100k.zip").write_bytes(archive)

    monkeypatch.setitem(fetching.ARCHIVES, "ml-100k", Archive(f"{url}/ml-100k.zip", "f" * 32, "u.data"))
    with pytest.raises(IntegrityError, match="md5"):
        fetch("ml-100k", tmp_path / "datasets")
    assert not (tmp_path / "datasets" / "ml-100k").exists()  # nothing extracted from a bad download

    md5 = hashlib.md5(archive).hexdigest()
    monkeypatch.setitem(fetching.ARCHIVES, "ml-100k", Archive(f"{url}/ml-100k.zip", md5, "u.data"))
    folder = fetch("ml-100k", tmp_path / "datasets")
    assert folder == tmp_path / "datasets" / "ml-100k"
    assert raw_sequences(load_interactions(folder)) == {"1": ["6", "5"], "2": ["5"]}
    assert [p.name for p in (tmp_path / "datasets").iterdir()] == ["ml-100k"]  # no scratch left behind

    (root / "ml-100k.zip").unlink()  # a present copy is returned without downloading again
    assert fetch("ml-100k", tmp_path / "datasets") == folder

    monkeypatch.setitem(fetching.ARCHIVES, "ml-100k", Archive(f"{url}/missing.zip", md5, "u.data"))
    with pytest.raises(DownloadFailed, match="HTTP 404"):
        fetch("ml-100k", tmp_path / "elsewhere")


def test_fetch_rejects_unsafe_or_wrong_archives(tmp_path, monkeypatch, file_server):
    url, root = file_server
    cases = [("evil.zip", {"../escape.txt": "x"}, "outside"),
             ("other.zip", {"ml-1m/ratings.dat": "1::1::1::1\n"}, "holds no ml-100k/u.data")]
    for name, members, problem in cases:
        payload = _zip(members)
        (root / name).write_bytes(payload)
        md5 = hashlib.md5(payload).hexdigest()
        monkeypatch.setitem(fetching.ARCHIVES, "ml-100k", Archive(f"{url}/{name}", md5, "u.data"))
        with pytest.raises(IntegrityError, match=problem):
            fetch("ml-100k", tmp_path / "datasets")
        assert not (tmp_path / "escape.txt").exists()
        assert not (tmp_path / "datasets" / "ml-100k").exists()

    (tmp_path / "datasets" / "ml-100k").mkdir(parents=True)
    with pytest.raises(InvalidInput, match="holds no u.data"):
        fetch("ml-100k", tmp_path / "datasets")
    with pytest.raises(InvalidInput):
        fetch("ml-10m", tmp_path / "datasets")


def test_published_checksums_are_md5_hex():
    for archive in fetching.ARCHIVES.values():
        assert archive.url.startswith("https://files.grouplens.org/datasets/movielens/")
        assert len(archive.md5) == 32 and int(archive.md5, 16) >= 0


# ----------------------------------------------------------------------------- CLI

def test_cli_info_json(shared_data, capsys):
    assert main(["data", "info", str(shared_data / "ml-100k"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["users"], summary["items"], summary["interactions"]) == (943, 1682, 100000)
    assert summary["has_timestamps"] is True and summary["item_features"] == ["genres"]
    assert summary["user_features"] == ["age", "gender", "occupation", "region"]
    assert summary["sequence_length"]["min"] == 20


def test_cli_info_table_with_named_format(tmp_path, capsys):
    path = write(tmp_path / "log.txt", "1 2 3\n")  # one user with two items; detected as sequences
    assert main(["data", "info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "users            1" in out and "interactions     2" in out
    assert "timestamps       no" in out

    # Named as pairs the same line is malformed, and the error names file and line.
    assert main(["data", "info", str(path), "--format", "pairs"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("paramcast data: error:") and f"{path}:1: expected 2 fields" in err


def test_cli_fetch_offline(tmp_path, monkeypatch, capsys):
    closed = Archive("http://127.0.0.1:9/ml-1m.zip", "0" * 32, "ratings.dat")
    monkeypatch.setitem(fetching.ARCHIVES, "ml-1m", closed)
    assert main(["data", "fetch", "ml-1m", "--to", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "could not download" in err and "paramcast data info" in err
