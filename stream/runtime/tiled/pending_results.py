"""Final results kept on disk until Tiled has taken every part, so that a restarted worker re-sends them."""

from __future__ import annotations

import json
import logging
import os
import zipfile
from pathlib import Path

import numpy as np

from phasestream.errors import PhasestreamError
from phasestream.runtime.scan_uid import check_scan_uid
from phasestream.runtime.tiled.updates import FinalResult

logger = logging.getLogger(__name__)


class PendingResults:
    """Final results on disk until Tiled has them: ``<directory>/<scan_uid>.npz``.

    Each file holds the container's metadata (JSON, key ``metadata``), and per node ``array.<name>`` and
    ``metadata.<name>``; it is written beside its place and renamed into it, so a crash leaves the old
    file or the new one, never half of one. Read without pickle.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    def path(self, scan_uid: str) -> Path:
        return self.directory / f"{check_scan_uid(scan_uid, f'a result kept in {self.directory}')}.npz"

    def save(self, result: FinalResult) -> Path:
        """Keep ``result`` (replacing an earlier one of the scan); OSError when the disk refuses."""
        path = self.path(result.scan_uid)
        contents: dict[str, np.ndarray] = {
            "scan_uid": np.array(result.scan_uid),
            "metadata": np.array(json.dumps(result.metadata)),
        }
        for name, (array, metadata) in result.arrays.items():
            contents[f"array.{name}"] = np.ascontiguousarray(array)
            contents[f"metadata.{name}"] = np.array(json.dumps(metadata))
        self.directory.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.partial")
        with partial.open("wb") as file:
            np.savez(file, allow_pickle=False, **contents)
            file.flush()
            os.fsync(file.fileno())
        partial.replace(path)
        return path

    def load(self) -> list[FinalResult]:
        """Every result kept here; a file that cannot be read is logged and left for a person."""
        results = []
        for path in sorted(self.directory.glob("*.npz")) if self.directory.is_dir() else ():
            try:
                results.append(self._read(path))
            except (OSError, ValueError, KeyError, zipfile.BadZipFile, PhasestreamError) as exc:
                logger.error(
                    "cannot read the pending result %s (%s: %s): it is not re-sent to Tiled; open it with "
                    "numpy.load, or delete it", path, type(exc).__name__, exc,
                )  # fmt: skip
        return results

    def _read(self, path: Path) -> FinalResult:
        with np.load(path, allow_pickle=False) as stored:
            scan_uid = str(stored["scan_uid"])
            if self.path(scan_uid) != path:
                raise ValueError(f"it holds scan {scan_uid!r}, not the one its name says")
            arrays = {}
            for key in stored.files:
                name = key.removeprefix("array.")
                if name == key:
                    continue
                if not name.isidentifier():
                    raise ValueError(f"it names a node {name!r}, which is no plain name")
                arrays[name] = (stored[key], json.loads(str(stored[f"metadata.{name}"])))
            return FinalResult(scan_uid, json.loads(str(stored["metadata"])), arrays)

    def discard(self, scan_uid: str) -> None:
        self.path(scan_uid).unlink(missing_ok=True)
