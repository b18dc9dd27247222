"""The exception hierarchy. Messages carry the offending value and the fix.

Only ``Stage.run()`` catches these per message: it counts the ``reason`` in
``phasestream_messages_rejected_total`` and goes on with the scan.
"""

from __future__ import annotations


class PhasestreamError(Exception):
    """Base class. ``reason`` is the low-cardinality metric label for this failure."""

    reason: str = "error"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason


class ConfigError(PhasestreamError):
    """A configuration value is invalid or missing."""

    reason = "config"


class WireFormatError(PhasestreamError):
    """A message between stages does not follow the phasestream wire format."""

    reason = "wire_format"


class DetectorMessageError(PhasestreamError):
    """A detector message (Stream V2 CBOR, Timepix3) cannot be decoded or fails validation."""

    reason = "detector_message"


class FrameValidationError(PhasestreamError):
    """A frame has the wrong shape or dtype, or holds NaN or negative counts."""

    reason = "frame_invalid"


class PositionError(PhasestreamError):
    """A scan position is missing, duplicated or not finite."""

    reason = "position"


class ScanFileError(PhasestreamError):
    """A scan file lacks a dataset, or holds one with an impossible shape or value."""

    reason = "scan_file"


class PublishError(PhasestreamError):
    """The Tiled server refused a write or could not be reached."""

    reason = "publish"
