"""Downloading MovieLens from GroupLens: `paramcast data fetch ml-100k|ml-1m --to DIR`.

    folder = fetch("ml-100k", "data/")      # data/ml-100k, its md5 checked; then load_interactions(folder)

The archive is streamed to a temporary file, checked against the md5 GroupLens publishes, and
unzipped into a scratch folder that is renamed into place only once it holds the dataset, so an
interrupted download or extraction never looks like a dataset. Offline, `fetch` fails within its
timeout with `DownloadFailed` saying how to use a copy downloaded elsewhere. Reading the files
is `common/data.py`'s job.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from paramcast.common.errors import IntegrityError, InvalidInput, ParamCastError

log = logging.getLogger(__name__)


class DownloadFailed(ParamCastError, OSError):
    """A dataset archive could not be downloaded (offline, DNS, HTTP error, timeout)."""


@dataclass(frozen=True)
class Archive:
    url: str
    md5: str  # as GroupLens publishes it in <name>.zip.md5 beside the archive
    marker: str  # a file the extracted folder must contain


ARCHIVES = {
    "ml-100k": Archive("https://files.grouplens.org/datasets/movielens/ml-100k.zip",
                       "0e33842e24a9c977be4e0107933c0723", "u.data"),
    "ml-1m": Archive("https://files.grouplens.org/datasets/movielens/ml-1m.zip",
                     "c4d9eecfca2ab87c1945afe126590906", "ratings.dat"),
}


def fetch(dataset: str, to: str | Path, timeout: float = 10) -> Path:
    """Download a MovieLens archive into `to`, check its md5, unzip it; return the data folder.

    An already extracted copy is returned as is. Offline, fails within `timeout` seconds with
    DownloadFailed saying how to use a copy downloaded elsewhere.
    """
    if dataset not in ARCHIVES:
        raise InvalidInput("dataset", f"unknown dataset {dataset!r}; choose one of {', '.join(ARCHIVES)}")
    archive = ARCHIVES[dataset]
    to = Path(to)
    target = to / dataset
    if (target / archive.marker).is_file():
        log.info("%s already present in %s", dataset, target)
        return target
    if target.exists():
        raise InvalidInput("to", f"{target} exists but holds no {archive.marker}; "
                                 "remove it or choose another --to")
    # Download beside nothing the user owns: `to` is only created once the archive checked out.
    fd, partial_name = tempfile.mkstemp(prefix=f"{dataset}-", suffix=".zip.part")
    os.close(fd)
    partial = Path(partial_name)
    try:
        try:
            digest = _download(archive.url, partial, timeout)
        except urllib.error.HTTPError as exc:  # caught before URLError and OSError, its base classes
            reason = f"HTTP {exc.code} {exc.reason}"
            raise DownloadFailed(_offline_hint(archive, dataset, to, reason)) from exc
        except urllib.error.URLError as exc:
            raise DownloadFailed(_offline_hint(archive, dataset, to, str(exc.reason))) from exc
        except (OSError, http.client.HTTPException) as exc:  # timeouts, resets, truncated responses
            raise DownloadFailed(_offline_hint(archive, dataset, to, repr(exc))) from exc
        if digest != archive.md5:
            raise IntegrityError(f"md5 of {archive.url} is {digest}, GroupLens publishes {archive.md5}; "
                                 "the download is corrupt or was altered, nothing was extracted")
        to.mkdir(parents=True, exist_ok=True)
        _extract(partial, to, dataset, archive.marker)
    finally:
        partial.unlink(missing_ok=True)
    log.info("fetched %s into %s", dataset, target)
    return target


def _download(url: str, dest: Path, timeout: float) -> str:
    """Stream url into dest; returns the md5 hex digest of what was written."""
    md5 = hashlib.md5()
    with urllib.request.urlopen(url, timeout=timeout) as response, open(dest, "wb") as out:
        while chunk := response.read(1 << 20):
            md5.update(chunk)
            out.write(chunk)
    return md5.hexdigest()


def _extract(zip_path: Path, to: Path, dataset: str, marker: str) -> None:
    """Unzip into a scratch folder first so an interrupted extraction never looks like a dataset."""
    scratch = Path(tempfile.mkdtemp(prefix=f".{dataset}-", dir=to))
    try:
        try:
            with zipfile.ZipFile(zip_path) as z:
                for member in z.namelist():
                    if member.startswith(("/", "\\")) or ".." in Path(member).parts:
                        raise IntegrityError(f"archive member {member!r} would land outside {to}")
                z.extractall(scratch)
        except zipfile.BadZipFile as exc:
            raise IntegrityError(f"downloaded {dataset} archive is not a zip file: {exc}") from exc
        inner = scratch / dataset
        if not (inner / marker).is_file():
            raise IntegrityError(f"the {dataset} archive holds no {dataset}/{marker}")
        os.replace(inner, to / dataset)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _offline_hint(archive: Archive, dataset: str, to: Path, reason: str) -> str:
    return (f"could not download {archive.url} ({reason}). If this machine is offline, download that "
            f"file on a connected one, check its md5 is {archive.md5}, unzip it into {to} and point "
            f"ParamCast at the folder: `paramcast data info {to / dataset}`, or `--data {to / dataset}` "
            "for the commands that read data.")
