"""Loaders for interaction logs in the formats they are published in, all producing one InteractionLog.

Formats (`FORMATS`), each accepted as its folder or as its main file:

  ml-100k    GroupLens MovieLens 100K: `u.data`, tab-separated `user item rating timestamp`;
             side files `u.item` (`|`-separated, latin-1, 19 genre flags) and `u.user`
             (`id|age|gender|occupation|zip`).
  ml-1m      GroupLens MovieLens 1M (and 10M): `ratings.dat`, `user::item::rating::timestamp`;
             side files `movies.dat` (`id::title::genre|genre`, latin-1) and, in 1M,
             `users.dat` (`id::gender::age group::occupation code::zip`).
  ml-latest  GroupLens ml-latest / ml-20m / ml-25m / ml-32m: `ratings.csv` with header
             `userId,movieId,rating,timestamp`; side file `movies.csv` (`movieId,title,genres`).
  pairs      SASRec's layout: one `user item` pair per line, in chronological order.
  sequences  S3Rec / ICLRec layout: one user per line, `user item1 item2 ...` in chronological order;
             side file `<stem>_item2attributes.json` ({item: [attribute, ...]}).
  rechorus   ReChorus layout: tab-separated with a header naming `user_id item_id time` (other
             columns ignored); a folder's `train.csv`, `dev.csv` and `test.csv` are read together.
             Side file `item_meta.csv`: every `i_<name>` column becomes feature `<name>`.

What every loader guarantees:
  - Item ids are contiguous 1..n_items in ascending order of the raw ids, so a dataset whose ids
    are already contiguous from 1 keeps them; 0 is padding. Users are in ascending raw-id order.
  - Each user's items are in time order: sorted by timestamp, ties kept in file order. Formats
    without timestamps keep file order. Repeated interactions are kept, they are the data.
  - All MovieLens ratings count as interactions (implicit feedback, as SASRec uses them).
  - Item side features, where a side file exists, are arrays with one row per item id
    (row 0 = padding, all zeros); items the side file lists but nobody interacted with are dropped:
      genres      (n_items + 1, G) uint8 multi-hot. ml-100k: u.item's 19 flags in file order;
                  ml-1m / ml-latest: one column per genre name in sorted order.
      attributes  (n_items + 1, A) int64 attribute ids per item, padded with 0 to the longest
                  list. A padded id list rather than multi-hot, because attribute vocabularies
                  run to thousands while an item has a handful (Beauty: 637 ids, at most 6).
      <name>      (n_items + 1,) int64 from ReChorus `i_<name>` columns, e.g. `category`.
    Attribute and `i_<name>` values are renumbered 1..K in ascending raw order, 0 meaning
    padding or missing, so they can index an embedding table directly.
  - User side features, where a side file exists, are (n_users,) int64 codes 1..K in the same
    ascending order, aligned with the users, 0 for a user the side file does not list:
      age         MovieLens 1M's seven age groups (under 18, 18-24, 25-34, 35-44, 45-49, 50-55,
                  56+); ml-100k's ages in years are put into the same groups, so both read alike.
      gender, occupation   as the file spells them (ml-1m: its occupation codes).
      region      the zip code's first character (a US zip's first digit is its region).
  - Malformed input raises DataFormatError naming file, line and problem before anything is
    returned; nothing half-loaded escapes.

Downloading the MovieLens archives from GroupLens is `common/fetch.py`'s job.
"""

from __future__ import annotations

import csv
import functools
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import repeat
from pathlib import Path

import numpy as np

from paramcast.common.errors import DataFormatError, InvalidInput
from paramcast.common.interactions import InteractionLog

log = logging.getLogger(__name__)

FORMATS = ("ml-100k", "ml-1m", "ml-latest", "pairs", "sequences", "rechorus")

# The file that identifies each folder layout, checked in this order.
_FOLDER_MARKERS = (("u.data", "ml-100k"), ("ratings.dat", "ml-1m"), ("ratings.csv", "ml-latest"),
                   ("train.csv", "rechorus"))
_RECHORUS_PARTS = ("train.csv", "dev.csv", "test.csv")  # read in this order: ties in time keep it
_BLOCK_BYTES = 1 << 23  # files are parsed in blocks of whole lines so ml-32m fits in memory


# ----------------------------------------------------------------------------- format detection

def detect_format(path: str | Path) -> str:
    """Name the format of a dataset folder or interaction file, from its layout and first lines."""
    path = Path(path)
    if path.is_dir():
        for marker, fmt in _FOLDER_MARKERS:
            if (path / marker).is_file():
                return fmt
        candidates = _sequence_files(path)
        if len(candidates) == 1:
            return _sniff(candidates[0])
        found = sorted(p.name for p in path.iterdir())[:20]
        raise DataFormatError(path, None, (
            "unknown layout: looked for u.data (ml-100k), ratings.dat (ml-1m), ratings.csv "
            "(ml-latest), train.csv (rechorus) or exactly one *.txt (pairs or sequences); "
            f"found {found or 'an empty folder'}"))
    if not path.exists():
        raise DataFormatError(path, None, "no such file or directory")
    return _sniff(path)


def _sequence_files(folder: Path) -> list[Path]:
    # S3Rec's data folders keep a `<name>_sample.txt` of evaluation negatives beside `<name>.txt`.
    return sorted(p for p in folder.glob("*.txt") if p.is_file() and not p.name.endswith("_sample.txt"))


def _sniff(path: Path) -> str:
    """Detect a single file's format from the shape of its first line; later lines are the loader's job."""
    with open(path, "rb") as f:
        head = f.read(1 << 16) + f.readline()  # whole lines only
    if not head.strip():
        raise DataFormatError(path, None, "empty file")
    lines = [line for line in head.decode("utf-8", errors="replace").replace("\r", "").split("\n")
             if line.strip()][:1000]
    first = lines[0]
    if "::" in first and len(first.split("::")) == 4:
        return "ml-1m"
    if {"userId", "movieId"} <= {c.strip() for c in first.split(",")}:
        return "ml-latest"
    if {"user_id", "item_id"} <= {c.strip() for c in first.split("\t")}:
        return "rechorus"
    tokens = first.split()
    if len(tokens) >= 2 and _all_int(tokens):
        if len(first.split("\t")) == 4:
            return "ml-100k"
        # A pairs file has two tokens on every line; one longer line among the first makes it sequences.
        return "sequences" if any(len(line.split()) > 2 for line in lines) else "pairs"
    raise DataFormatError(path, 1, (
        f"unknown layout: first line {first[:80]!r} is not a MovieLens, ReChorus, `user item` or "
        "`user item1 item2 ...` line; name the format with --format"))


def _all_int(tokens: list[str]) -> bool:
    try:
        for t in tokens:
            int(t)
    except ValueError:
        return False
    return True


# ----------------------------------------------------------------------------- public loader

def load_interactions(path: str | Path, format: str | None = None, name: str | None = None) -> InteractionLog:
    """Read a dataset folder or file into an InteractionLog; `format` skips detection."""
    path = Path(path)
    if not path.exists():
        raise DataFormatError(path, None, "no such file or directory")
    fmt = format or detect_format(path)
    if fmt not in FORMATS:
        raise InvalidInput("format", f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    interaction_log = _READERS[fmt](path)
    interaction_log.name = name or (path.resolve().name if path.is_dir() else _default_name(path, fmt))
    log.debug("loaded %s: %d users, %d items, %d interactions", interaction_log.name,
              interaction_log.n_users, interaction_log.n_items, interaction_log.n_interactions)
    return interaction_log


def _default_name(file: Path, fmt: str) -> str:
    # A MovieLens or ReChorus file is named for its role (u.data, train.csv); its folder names the data.
    return file.stem if fmt in ("pairs", "sequences") else file.resolve().parent.name


def _main_file(path: Path, fmt: str, filename: str) -> Path:
    if path.is_file():
        return path
    if (path / filename).is_file():
        return path / filename
    raise DataFormatError(path, None, f"no {filename} here, which the {fmt} layout needs")


# ----------------------------------------------------------------------------- per-format readers

@dataclass(frozen=True)
class _MovieLens:
    """One MovieLens release's layout: its ratings file and the side file its genres come from."""

    ratings: str  # the ratings file, `user item rating timestamp` per line
    sep: str
    layout: str  # the fields as the release names them, for error messages
    has_header: bool  # ml-latest's ratings.csv starts with a header naming the fields
    movies: str  # the side file
    genres: Callable[[Path, np.ndarray], np.ndarray]  # (side file, item raw ids) -> (n_items + 1, G)
    users: str | None = None  # the user side file, where the release has one
    users_sep: str = ""

    def read(self, fmt: str, path: Path) -> InteractionLog:
        data = _main_file(path, fmt, self.ratings)
        if self.has_header:
            header, expected = _header(data, self.sep), self.layout.split(self.sep)
            if header != expected:
                raise DataFormatError(data, 1, f"header must be {self.layout}, found {self.sep.join(header)}")
        cols = _read_table(data, self.sep, 4, {"user_id": 0, "item_id": 1, "timestamp": 3},
                           header=self.has_header, layout=self.layout)
        built = _Built.from_columns(cols["user_id"], cols["item_id"], cols["timestamp"], [data])
        side = data.parent / self.movies
        if side.is_file():
            built.features["genres"] = self.genres(side, built.item_raw)
            built.sources.append(side)
        people = data.parent / self.users if self.users else None
        if people is not None and people.is_file():
            built.user_features = _movielens_users(people, self.users_sep, built.user_raw)
            built.sources.append(people)
        return built.to_log()


def _read_pairs(path: Path) -> InteractionLog:
    data = _single_txt(path, "pairs")
    # Space is the fast-path separator; lines with tabs or repeated spaces still parse, line by line.
    cols = _read_table(data, " ", 2, {"user_id": 0, "item_id": 1}, layout="user item", whitespace=True)
    return _Built.from_columns(cols["user_id"], cols["item_id"], None, [data]).to_log()


def _read_sequences(path: Path) -> InteractionLog:
    data = _single_txt(path, "sequences")
    users, items = _read_sequence_lines(data)
    built = _Built.from_columns(users, items, None, [data])
    side = data.parent / f"{data.stem}_item2attributes.json"
    if side.is_file():
        built.features["attributes"] = _item_attributes(side, built.item_raw)
        built.sources.append(side)
    return built.to_log()


def _read_rechorus(path: Path) -> InteractionLog:
    if path.is_dir():
        files = [path / part for part in _RECHORUS_PARTS if (path / part).is_file()]
        if not files:
            raise DataFormatError(path, None, "no train.csv here, which the rechorus layout needs")
    else:
        files = [path]
    users, items, times = [], [], []
    for file in files:
        header = _header(file, "\t")
        missing = [c for c in ("user_id", "item_id", "time") if c not in header]
        if missing:
            raise DataFormatError(file, 1, f"header must name user_id, item_id and time; missing {missing}")
        cols = _read_table(file, "\t", len(header),
                           {"user_id": header.index("user_id"), "item_id": header.index("item_id"),
                            "time": header.index("time")},
                           header=True, layout="\\t".join(header))
        users.append(cols["user_id"])
        items.append(cols["item_id"])
        times.append(cols["time"])
    built = _Built.from_columns(np.concatenate(users), np.concatenate(items), np.concatenate(times), files)
    side = files[0].parent / "item_meta.csv"
    if side.is_file():
        built.features.update(_rechorus_item_meta(side, built.item_raw))
        built.sources.append(side)
    return built.to_log()


def _single_txt(path: Path, fmt: str) -> Path:
    if path.is_file():
        return path
    candidates = _sequence_files(path)
    if len(candidates) != 1:
        raise DataFormatError(path, None, (
            f"the {fmt} layout needs exactly one *.txt here, found {[p.name for p in candidates]}; "
            "pass the file itself"))
    return candidates[0]


_MOVIELENS = {
    "ml-100k": _MovieLens("u.data", "\t", "user_id item_id rating timestamp", False, "u.item",
                          lambda side, items: _ml_100k_genres(side, items), "u.user", "|"),
    "ml-1m": _MovieLens("ratings.dat", "::", "UserID::MovieID::Rating::Timestamp", False, "movies.dat",
                        lambda side, items: _genres_multi_hot(side, _ml_1m_movies(side), items), "users.dat",
                        "::"),
    "ml-latest": _MovieLens("ratings.csv", ",", "userId,movieId,rating,timestamp", True, "movies.csv",
                            lambda side, items: _genres_multi_hot(side, _ml_latest_movies(side), items)),
}
_READERS: dict[str, Callable[[Path], InteractionLog]] = {
    **{fmt: functools.partial(spec.read, fmt) for fmt, spec in _MOVIELENS.items()},
    "pairs": _read_pairs, "sequences": _read_sequences, "rechorus": _read_rechorus,
}


# ----------------------------------------------------------------------------- assembling the log

@dataclass
class _Built:
    """Interactions renumbered and grouped per user, before side features are attached."""

    sequences: list[np.ndarray]
    timestamps: list[np.ndarray] | None
    user_raw: np.ndarray  # (n_users,) raw ids, ascending
    item_raw: np.ndarray  # (n_items,) raw ids, ascending; item id i is item_raw[i - 1]
    sources: list[Path]
    features: dict[str, np.ndarray]
    user_features: dict[str, np.ndarray] = field(default_factory=dict)

    @classmethod
    def from_columns(cls, users: np.ndarray, items: np.ndarray, times: np.ndarray | None,
                     sources: list[Path]) -> _Built:
        """Renumber raw ids and split the rows into per-user sequences in time order."""
        assert len(users) == len(items) and (times is None or len(times) == len(users))
        user_raw, user_idx = np.unique(users, return_inverse=True)  # (U,), (N,)
        item_raw, item_idx = np.unique(items, return_inverse=True)  # (I,), (N,)
        item_ids = item_idx.astype(np.int64) + 1  # 0 stays free for padding
        # Group rows by user, and within a user by time; both sorts are stable so ties keep file order.
        order = np.arange(len(users)) if times is None else np.argsort(times, kind="stable")
        order = order[np.argsort(user_idx[order], kind="stable")]
        bounds = np.cumsum(np.bincount(user_idx, minlength=len(user_raw)))[:-1]
        sequences = np.split(item_ids[order], bounds)
        timestamps = None if times is None else np.split(times[order].astype(np.int64), bounds)
        return cls(sequences, timestamps, user_raw, item_raw, list(sources), {})

    def to_log(self) -> InteractionLog:
        return InteractionLog(
            name="",
            sequences=self.sequences,
            n_items=len(self.item_raw),
            user_raw_ids=[str(u) for u in self.user_raw.tolist()],
            item_raw_ids=[""] + [str(i) for i in self.item_raw.tolist()],
            timestamps=self.timestamps,
            item_features=self.features,
            user_features=self.user_features,
            source=", ".join(str(p) for p in self.sources),
        )


def _known_rows(raw_ids: np.ndarray, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Map side-file raw ids to their index in the ascending `raw`; returns (indices of the known
    ones, mask of side rows that are known)."""
    pos = np.searchsorted(raw, raw_ids).clip(max=len(raw) - 1)
    known = raw[pos] == raw_ids
    return pos[known], known


def _item_rows(raw_ids: np.ndarray, item_raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Map side-file raw item ids to item ids; returns (item ids, mask of side rows that are known)."""
    rows, known = _known_rows(raw_ids, item_raw)
    return rows + 1, known


def _codes(values: list[str]) -> np.ndarray:
    """Renumber values 1..K in ascending order (numeric when all are integers); "" becomes 0."""
    present = sorted({v for v in values if v != ""},
                     key=(lambda v: (int(v), v)) if _all_int([v for v in values if v != ""]) else None)
    index = {v: k for k, v in enumerate(present, start=1)}
    return np.array([index.get(v, 0) for v in values], dtype=np.int64)


# ----------------------------------------------------------------------------- reading tables

def _blocks(path: Path) -> Iterator[tuple[int, str]]:
    """Yield (number of its first line, text) for consecutive blocks of whole lines."""
    try:
        f = open(path, "rb")
    except OSError as exc:
        raise DataFormatError(path, None, f"cannot read: {exc.strerror}") from exc
    with f:
        first_line, rest = 1, b""
        while True:
            chunk = f.read(_BLOCK_BYTES)
            if not chunk:
                if rest:
                    yield first_line, _decode(path, first_line, rest)
                return
            chunk = rest + chunk
            cut = chunk.rfind(b"\n") + 1
            block, rest = chunk[:cut], chunk[cut:]
            if block:
                yield first_line, _decode(path, first_line, block)
                first_line += block.count(b"\n")


def _decode(path: Path, first_line: int, block: bytes) -> str:
    try:
        return block.decode("utf-8").replace("\r", "")
    except UnicodeDecodeError as exc:
        line = first_line + block[: exc.start].count(b"\n")
        raise DataFormatError(path, line, "not UTF-8 text (is this an interaction file?)") from exc


def _header(path: Path, sep: str) -> list[str]:
    try:
        with open(path, "rb") as f:
            first = f.readline()
    except OSError as exc:
        raise DataFormatError(path, None, f"cannot read: {exc.strerror}") from exc
    if not first.strip():
        raise DataFormatError(path, 1 if first else None, "empty file" if not first else "blank header line")
    return [c.strip() for c in _decode(path, 1, first).rstrip("\n").split(sep)]


def _read_table(path: Path, sep: str, n_fields: int, columns: dict[str, int], layout: str,
                header: bool = False, whitespace: bool = False) -> dict[str, np.ndarray]:
    """Read integer columns of a delimited file; every line must have exactly n_fields fields.

    Blank lines are skipped. With `whitespace`, lines split on any run of spaces or tabs.
    """
    parts: dict[str, list[np.ndarray]] = {name: [] for name in columns}
    seen_text = False
    for first_line, text in _blocks(path):
        if header and first_line == 1:
            _, _, text = text.partition("\n")
            first_line = 2
        seen_text = seen_text or bool(text.strip())
        block = _parse_block_fast(text, sep, n_fields, columns)
        if block is None:  # something irregular: the line-by-line parser finds it or reads it
            block = _parse_block_lines(path, first_line, text, None if whitespace else sep, n_fields,
                                       columns, layout)
        for name in columns:
            parts[name].append(block[name])
    out = {name: np.concatenate(p) if p else np.zeros(0, np.int64) for name, p in parts.items()}
    if len(next(iter(out.values()))) == 0:
        if not header and not seen_text:
            raise DataFormatError(path, None, "empty file")
        raise DataFormatError(path, None, "no interactions" + (" below the header" if header else ""))
    return out


def _parse_block_fast(text: str, sep: str, n_fields: int, columns: dict[str, int]) -> dict | None:
    """Vectorised parse of a block of well-formed lines; None if any line is irregular."""
    body = text.rstrip("\n")
    if not body:
        return {name: np.zeros(0, np.int64) for name in columns}
    if len(sep) > 1:
        if "\t" in body:  # a tab would be taken for a separator below
            return None
        body, sep = body.replace(sep, "\t"), "\t"
    lines = body.split("\n")
    if set(map(str.count, lines, repeat(sep))) != {n_fields - 1}:
        return None
    fields = body.replace("\n", sep).split(sep)  # (n_lines * n_fields,) row-major
    try:
        return {name: np.array(fields[k::n_fields], dtype=np.int64) for name, k in columns.items()}
    except (ValueError, OverflowError):
        return None


def _parse_block_lines(path: Path, first_line: int, text: str, sep: str | None, n_fields: int,
                       columns: dict[str, int], layout: str) -> dict[str, np.ndarray]:
    """Line-by-line parse; raises DataFormatError at the first bad line."""
    values: dict[str, list[int]] = {name: [] for name in columns}
    for lineno, line in enumerate(text.split("\n"), start=first_line):
        if not line.strip():
            continue
        fields = line.split(sep)
        if len(fields) != n_fields:
            raise DataFormatError(path, lineno, (
                f"expected {n_fields} fields ({layout}), found {len(fields)}: {line[:80]!r}"))
        for name, k in columns.items():
            values[name].append(_int(path, lineno, name, fields[k]))
    return {name: np.array(v, dtype=np.int64) for name, v in values.items()}


def _int(path: Path, lineno: int, what: str, text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise DataFormatError(path, lineno, f"{what} {text.strip()[:40]!r} is not an integer") from None
    if not -(2**63) <= value < 2**63:
        raise DataFormatError(path, lineno, f"{what} {text.strip()[:40]!r} does not fit in 64 bits")
    return value


def _read_sequence_lines(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read `user item1 item2 ...` lines into parallel (user, item) columns, one row per item."""
    users: list[np.ndarray] = []
    items: list[np.ndarray] = []
    seen_text = False
    for first_line, text in _blocks(path):
        block_users, counts, tokens = [], [], []
        for lineno, line in enumerate(text.split("\n"), start=first_line):
            fields = line.split()
            if not fields:
                continue
            if len(fields) < 2:
                raise DataFormatError(path, lineno, (
                    f"expected `user item1 item2 ...`, found only {fields[0][:40]!r}: a user without items"))
            block_users.append(fields[0])
            counts.append(len(fields) - 1)
            tokens.extend(fields[1:])
        seen_text = seen_text or bool(block_users)
        try:
            block_items = np.array(tokens, dtype=np.int64)
            user_ids = np.array(block_users, dtype=np.int64)
        except (ValueError, OverflowError):
            _raise_first_bad_sequence_token(path, first_line, text)
            raise  # not reached: the line scan always finds the token numpy rejected
        users.append(np.repeat(user_ids, counts))
        items.append(block_items)
    if not seen_text:
        raise DataFormatError(path, None, "empty file")
    return np.concatenate(users), np.concatenate(items)


def _raise_first_bad_sequence_token(path: Path, first_line: int, text: str) -> None:
    for lineno, line in enumerate(text.split("\n"), start=first_line):
        for k, token in enumerate(line.split()):
            _int(path, lineno, "user_id" if k == 0 else f"item {k}", token)


# ----------------------------------------------------------------------------- side files

def _ml_100k_genres(path: Path, item_raw: np.ndarray) -> np.ndarray:
    """u.item: `id|title|release date|video release date|IMDb URL|` then 19 genre flags."""
    ids, flags = [], []
    with open(path, encoding="latin-1") as f:  # GroupLens ships u.item in latin-1
        for lineno, line in enumerate(f, start=1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            fields = line.split("|")
            if len(fields) != 24:
                raise DataFormatError(path, lineno, (
                    f"expected 24 |-separated fields (id, title, dates, URL, 19 genre flags), "
                    f"found {len(fields)}"))
            ids.append(_int(path, lineno, "movie id", fields[0]))
            if any(flag not in ("0", "1") for flag in fields[5:]):
                raise DataFormatError(path, lineno, f"genre flags must be 0 or 1, found {fields[5:]}")
            flags.append([flag == "1" for flag in fields[5:]])
    genres = np.zeros((len(item_raw) + 1, 19), dtype=np.uint8)  # (n_items + 1, 19)
    if ids:
        rows, known = _item_rows(np.array(ids, dtype=np.int64), item_raw)
        genres[rows] = np.array(flags, dtype=np.uint8)[known]
    return genres


_AGE_GROUPS = (18, 25, 35, 45, 50, 56)  # MovieLens 1M's group boundaries: under 18, 18-24, ..., 56+


def _movielens_users(path: Path, sep: str, user_raw: np.ndarray) -> dict[str, np.ndarray]:
    """u.user (`id|age|gender|occupation|zip`, age in years) or users.dat (`id::gender::age
    group::occupation code::zip`), latin-1 -> {age, gender, occupation, region}: (n_users,) codes."""
    ml_1m = sep == "::"
    layout = "UserID::Gender::Age::Occupation::Zip-code" if ml_1m else "user id|age|gender|occupation|zip code"
    ids: list[int] = []
    columns: dict[str, list[str]] = {"age": [], "gender": [], "occupation": [], "region": []}
    with open(path, encoding="latin-1") as f:
        for lineno, line in enumerate(f, start=1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            fields = line.split(sep)
            if len(fields) != 5:
                raise DataFormatError(path, lineno,
                                      f"expected 5 {sep}-separated fields ({layout}), found {len(fields)}")
            if ml_1m:
                uid, gender, age, occupation, zipcode = fields
            else:
                uid, age, gender, occupation, zipcode = fields
            ids.append(_int(path, lineno, "user id", uid))
            years = _int(path, lineno, "age", age)
            if years < 0:
                raise DataFormatError(path, lineno, f"age must not be negative, found {years}")
            columns["age"].append(str(sum(years >= b for b in _AGE_GROUPS)))
            columns["gender"].append(gender.strip())
            columns["occupation"].append(occupation.strip())
            columns["region"].append(zipcode.strip()[:1])
    rows, known = _known_rows(np.array(ids, dtype=np.int64), user_raw)
    features = {}
    for name, values in columns.items():
        out = np.zeros(len(user_raw), dtype=np.int64)
        out[rows] = _codes([v for v, k in zip(values, known, strict=True) if k])
        features[name] = out
    return features


def _ml_1m_movies(path: Path) -> list[tuple[int, list[str]]]:
    """movies.dat: `MovieID::Title::Genre|Genre`, latin-1."""
    movies = []
    with open(path, encoding="latin-1") as f:
        for lineno, line in enumerate(f, start=1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            fields = line.split("::")
            if len(fields) < 3:
                raise DataFormatError(path, lineno, f"expected MovieID::Title::Genres, found {line[:80]!r}")
            movies.append((_int(path, lineno, "MovieID", fields[0]), fields[-1].split("|")))
    return movies


def _ml_latest_movies(path: Path) -> list[tuple[int, list[str]]]:
    """movies.csv: `movieId,title,genres` with quoted titles, UTF-8."""
    movies = []
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or "movieId" not in header or "genres" not in header:
            raise DataFormatError(path, 1, f"header must name movieId and genres, found {header}")
        id_col, genre_col = header.index("movieId"), header.index("genres")
        for row in reader:
            if not row:
                continue
            if len(row) != len(header):
                raise DataFormatError(path, reader.line_num, (
                    f"expected {len(header)} fields ({','.join(header)}), found {len(row)}"))
            movies.append((_int(path, reader.line_num, "movieId", row[id_col]), row[genre_col].split("|")))
    return movies


def _genres_multi_hot(path: Path, movies: list[tuple[int, list[str]]], item_raw: np.ndarray) -> np.ndarray:
    """One column per genre name in sorted order; "(no genres listed)" is an all-zero row."""
    names = sorted({g for _, genres in movies for g in genres if g and g != "(no genres listed)"})
    column = {g: j for j, g in enumerate(names)}
    out = np.zeros((len(item_raw) + 1, len(names)), dtype=np.uint8)  # (n_items + 1, G)
    if not movies:
        return out
    rows, known = _item_rows(np.array([m for m, _ in movies], dtype=np.int64), item_raw)
    known_movies = [m for m, k in zip(movies, known, strict=True) if k]
    for row, (_, genres) in zip(rows, known_movies, strict=True):
        out[row, [column[g] for g in genres if g in column]] = 1
    return out


def _item_attributes(path: Path, item_raw: np.ndarray) -> np.ndarray:
    """S3Rec's item2attributes.json: {"item": [attribute id, ...]} -> padded id lists."""
    try:
        with open(path, encoding="utf-8") as f:
            table = json.load(f)
    except json.JSONDecodeError as exc:
        raise DataFormatError(path, exc.lineno, f"invalid JSON: {exc.msg}") from exc
    except UnicodeDecodeError as exc:
        raise DataFormatError(path, None, "not UTF-8 text") from exc
    if not isinstance(table, dict):
        raise DataFormatError(path, 1, "expected a JSON object mapping item ids to attribute id lists")
    raw_ids, lists = [], []
    for key, attrs in table.items():
        if not _all_int([key]):
            raise DataFormatError(path, None, f"item id {key!r} is not an integer")
        if not isinstance(attrs, list) or not all(isinstance(a, int) and not isinstance(a, bool)
                                                  for a in attrs):
            raise DataFormatError(path, None, f"item {key}: attributes must be a list of integers")
        raw_ids.append(int(key))
        lists.append(attrs)
    width = 0
    rows = np.zeros(0, np.int64)
    kept: list[list[int]] = []
    if raw_ids:
        rows, known = _item_rows(np.array(raw_ids, dtype=np.int64), item_raw)
        kept = [a for a, k in zip(lists, known, strict=True) if k]
        width = max((len(a) for a in kept), default=0)
    out = np.zeros((len(item_raw) + 1, width), dtype=np.int64)  # (n_items + 1, A)
    codes = _codes([str(a) for attrs in kept for a in attrs])
    start = 0
    for row, attrs in zip(rows, kept, strict=True):
        out[row, : len(attrs)] = codes[start : start + len(attrs)]
        start += len(attrs)
    return out


def _rechorus_item_meta(path: Path, item_raw: np.ndarray) -> dict[str, np.ndarray]:
    """item_meta.csv: tab-separated, header `item_id i_<name>... r_<relation>...`; keeps i_ columns."""
    header = _header(path, "\t")
    if "item_id" not in header:
        raise DataFormatError(path, 1, f"header must name item_id, found {header}")
    feature_cols = {c[2:]: j for j, c in enumerate(header) if c.startswith("i_")}
    id_col = header.index("item_id")
    ids: list[int] = []
    values: dict[str, list[str]] = {name: [] for name in feature_cols}
    for first_line, text in _blocks(path):
        for lineno, line in enumerate(text.split("\n"), start=first_line):
            if lineno == 1 or not line.strip():
                continue
            fields = line.split("\t")
            if len(fields) != len(header):
                raise DataFormatError(path, lineno, f"expected {len(header)} tab-separated fields, "
                                                    f"found {len(fields)}")
            ids.append(_int(path, lineno, "item_id", fields[id_col]))
            for name, j in feature_cols.items():
                values[name].append(fields[j].strip())
    features = {}
    rows, known = _item_rows(np.array(ids, dtype=np.int64), item_raw)
    for name, column in values.items():
        out = np.zeros(len(item_raw) + 1, dtype=np.int64)  # (n_items + 1,)
        out[rows] = _codes([v for v, k in zip(column, known, strict=True) if k])
        features[name] = out
    return features
