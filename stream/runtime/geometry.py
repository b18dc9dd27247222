"""Geometry the user can set: overrides of the detector's start message, a region of interest, a mask.

A detector reports its energy, distance and pixel size in its start message, and often one of them is
stale (the energy of the last scan, the distance before the detector moved). Three sources can override
them, from the most general to the most specific, each later one winning:

1. the detector's start message;
2. the pipeline: the ingest stage's ``geometry`` config (``phasestream run``/``replay`` flags write it);
3. the scan: ``user_data["geometry"]`` in the start message (a Bluesky plan's start document puts it
   there), so one scan can differ from the pipeline's defaults.

``window_px`` crops every frame to a square window centred on ``beam_centre_px`` (default: the detector's
centre), for a detector larger than the far field worth reconstructing. ``mask_file`` names the pixels
that measure nothing (module gaps, a beam stop, dead and hot pixels): a ``.npy`` array, an HDF5 dataset
(``file.h5::/path``) or a CXI or DECTRIS NXmx file, whose standard mask is read. The mask joins the
one the detector sends in its start message.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from phasestream.errors import ConfigError

# Where the standard formats keep a bad-pixel mask, with the bits that mean "not measured".
# CXI: 0 is good and 0x1000 ("has signal") is no defect; NXmx: the low 16 bits are defects.
_CXI_MASK = "/entry_1/instrument_1/detector_1/mask"
_NXMX_MASK = "/entry/instrument/detector/detectorSpecific/pixel_mask"
_CXI_NOT_A_DEFECT = 0x1000
_NXMX_DEFECT_BITS = 0xFFFF
MASK_PATH_SEPARATOR = "::"


class MaskPolarity(StrEnum):
    """What a non-zero value in a plain mask array means (CXI and NXmx masks have their own rules)."""

    BAD = "bad"  # CXI, NeXus, DECTRIS: non-zero marks a defect
    GOOD = "good"  # PtyPy, pty-chi: non-zero marks a valid pixel


class GeometryOverrides(BaseModel):
    """Values that replace the detector's; None keeps the detector's value."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    energy_kev: float | None = Field(default=None, ge=0.1, le=100.0, description="photon energy, keV")
    detector_distance_m: float | None = Field(
        default=None, ge=1e-3, le=200.0, description="sample–detector distance, m"
    )
    pixel_size_m: float | None = Field(default=None, ge=1e-7, le=1e-2, description="detector pixel, m")
    beam_centre_px: tuple[float, float] | None = Field(
        default=None, description="(row, column) of the direct beam on the detector; default its centre"
    )
    window_px: int | None = Field(
        default=None, ge=8, le=4096, description="crop frames to this square window around the beam centre"
    )

    def given(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


class GeometrySettings(GeometryOverrides):
    """The pipeline's overrides, plus a mask file (a per-scan override cannot name a file)."""

    mask_file: str | None = Field(
        default=None, description="bad pixels: .npy, file.h5::/dataset, or a CXI / NXmx file"
    )
    mask_nonzero_means: MaskPolarity = Field(
        default=MaskPolarity.BAD, description="for a plain mask array: what a non-zero value marks"
    )

    @field_validator("mask_file")
    @classmethod
    def _mask_readable(cls, spec: str | None) -> str | None:
        if spec is not None:
            read_mask_file(spec, MaskPolarity.BAD)  # refused at config load, not at the first scan
        return spec

    def overrides(self) -> GeometryOverrides:
        return GeometryOverrides(**self.model_dump(exclude={"mask_file", "mask_nonzero_means"}))


@dataclass(frozen=True)
class ResolvedGeometry:
    """The geometry a scan is reconstructed with, where each override came from, and the crop."""

    energy_kev: float
    detector_distance_m: float
    pixel_size_m: float
    shape_px: tuple[int, int]  # after the crop
    crop: tuple[slice, slice] | None  # rows and columns kept from the detector frame; None: all
    sources: dict[str, str]  # value name → "pipeline" or "scan"


def per_scan_overrides(user_data: Any) -> GeometryOverrides:
    """``user_data["geometry"]`` of a start message, validated; an empty override when absent."""
    raw = user_data.get("geometry") if isinstance(user_data, dict) else None
    if raw is None:
        return GeometryOverrides()
    if not isinstance(raw, dict) or not all(isinstance(key, str) for key in raw):
        raise ConfigError(
            f"start user_data geometry={_short(raw)}: expected a mapping of names to numbers such as "
            "{'energy_kev': 8.8, 'detector_distance_m': 2.0}"
        )
    try:
        return GeometryOverrides(**raw)
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
        raise ConfigError(
            f"start user_data geometry {_short(raw)} is invalid ({problems}); fix the scan's start document"
        ) from None
    except (ValueError, OverflowError) as error:  # an integer too large to convert, say
        raise ConfigError(
            f"start user_data geometry {_short(raw)}: {type(error).__name__}; fix the scan's start document"
        ) from None


def _short(value: Any, limit: int = 200) -> str:
    """A repr for a message, cut short; a value that cannot even be printed (a 5,000-digit integer) is
    named by its type."""
    try:
        text = repr(value)
    except ValueError:
        return f"<{type(value).__name__} that cannot be printed>"
    return text if len(text) <= limit else text[:limit] + "…"


def resolve_geometry(
    energy_kev: float,
    detector_distance_m: float,
    pixel_size_m: float,
    shape_px: tuple[int, int],
    pipeline: GeometryOverrides,
    scan: GeometryOverrides,
) -> ResolvedGeometry:
    """The detector's values with the pipeline's, then the scan's, overrides applied."""
    values: dict[str, Any] = {
        "energy_kev": energy_kev,
        "detector_distance_m": detector_distance_m,
        "pixel_size_m": pixel_size_m,
        "beam_centre_px": None,
        "window_px": None,
    }
    sources: dict[str, str] = {}
    for source, overrides in (("pipeline", pipeline), ("scan", scan)):
        for name, value in overrides.given().items():
            values[name] = value
            sources[name] = source
    crop = _crop(shape_px, values["beam_centre_px"], values["window_px"])
    shape = shape_px if crop is None else (values["window_px"], values["window_px"])
    return ResolvedGeometry(
        energy_kev=values["energy_kev"],
        detector_distance_m=values["detector_distance_m"],
        pixel_size_m=values["pixel_size_m"],
        shape_px=shape,
        crop=crop,
        sources=sources,
    )


def _crop(
    shape_px: tuple[int, int], beam_centre_px: tuple[float, float] | None, window_px: int | None
) -> tuple[slice, slice] | None:
    if window_px is None:
        return None
    height, width = shape_px
    if window_px > min(height, width):
        raise ConfigError(
            f"window_px={window_px} is larger than the {height}×{width} detector; choose at most "
            f"{min(height, width)}"
        )
    centre = beam_centre_px if beam_centre_px is not None else (height / 2, width / 2)
    # The window's pixel N//2 sits on the beam: that is where the solver puts zero frequency.
    corners = [round(c) - window_px // 2 for c in centre]
    for corner, size, axis in zip(corners, (height, width), ("row", "column"), strict=True):
        if corner < 0 or corner + window_px > size:
            raise ConfigError(
                f"a {window_px}-px window around beam_centre_px={centre} leaves the detector along the "
                f"{axis}s (0..{size - 1}); move the beam centre or choose a smaller window_px"
            )
    return slice(corners[0], corners[0] + window_px), slice(corners[1], corners[1] + window_px)


def read_mask_file(spec: str, polarity: MaskPolarity) -> np.ndarray:
    """The bad pixels (bool, True = not measured) from a ``.npy``, an HDF5 dataset, or a CXI/NXmx file."""
    path_text, _, dataset = spec.partition(MASK_PATH_SEPARATOR)
    path = Path(path_text)
    if not path.is_file():
        raise ConfigError(f"mask_file {spec!r}: no such file; give a .npy, file.h5::/dataset, or a CXI file")
    if path.suffix == ".npy":
        try:
            values = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as error:
            raise ConfigError(
                f"mask_file {spec!r} is not a .npy array ({error}); save it with np.save"
            ) from None
        return _plain_mask(values, polarity, spec)
    try:
        file = h5py.File(path, "r")
    except OSError as error:
        raise ConfigError(f"mask_file {spec!r}: not a .npy or HDF5 file ({error})") from None
    with file:
        if dataset:
            node = file.get(dataset)
            if not isinstance(node, h5py.Dataset):
                raise ConfigError(f"mask_file {spec!r}: {path} has no dataset {dataset}; check the path")
            if dataset.rstrip("/") == _CXI_MASK:
                return _bit_mask(node[()], spec, ~_CXI_NOT_A_DEFECT)
            if dataset.rstrip("/") == _NXMX_MASK:
                return _bit_mask(node[()], spec, _NXMX_DEFECT_BITS)
            return _plain_mask(node[()], polarity, spec)
        if _CXI_MASK in file:
            return _bit_mask(file[_CXI_MASK][()], spec, ~_CXI_NOT_A_DEFECT)
        if _NXMX_MASK in file:
            return _bit_mask(file[_NXMX_MASK][()], spec, _NXMX_DEFECT_BITS)
    raise ConfigError(
        f"mask_file {spec!r}: {path} has neither {_CXI_MASK} (CXI) nor {_NXMX_MASK} (NXmx); name the "
        f"dataset as {path}{MASK_PATH_SEPARATOR}/path/to/mask"
    )


def _plain_mask(values: Any, polarity: MaskPolarity, spec: str) -> np.ndarray:
    nonzero = np.asarray(_two_dimensional(values, spec) != 0, dtype=np.bool_)
    return nonzero if polarity is MaskPolarity.BAD else ~nonzero


def _bit_mask(values: Any, spec: str, defect_bits: int) -> np.ndarray:
    array = _two_dimensional(values, spec)
    if array.dtype.kind not in "iub":
        raise ConfigError(
            f"mask_file {spec!r} holds {array.dtype}; a CXI or NXmx mask is an integer bit field"
        )
    return np.asarray((array.astype(np.int64) & defect_bits) != 0, dtype=np.bool_)


def _two_dimensional(values: Any, spec: str) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim == 3 and array.shape[0] == 1:
        array = array[0]  # one mask per threshold channel; phasestream reads one channel
    if array.ndim != 2 or array.dtype.kind not in "iubf":
        raise ConfigError(
            f"mask_file {spec!r} holds {array.dtype} of shape {array.shape}; expected a 2-D numeric array "
            "of the detector's shape"
        )
    return array


def check_mask_shape(mask: np.ndarray, shape_px: tuple[int, int], where: str) -> None:
    if mask.shape != tuple(shape_px):
        raise ConfigError(
            f"{where} has shape {mask.shape} but the detector's frames are {tuple(shape_px)}; give the mask "
            "of this detector (before any window_px crop)"
        )
