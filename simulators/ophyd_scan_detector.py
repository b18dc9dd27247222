"""What the simulated SELUN and Timepix3 ophyd devices share: the run they are in, where the probe is, and
the configuration a replay needs beside the raw run (geometry, which motors and unit give the position).

Bluesky stages a device before it opens the run, so the run uid is learned from the RunEngine's start
document: ``RE.subscribe(detector.on_run_start, "start")``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ophyd import Component, Device, Kind, Signal

from phasestream.formats.units import LengthUnit

# The start-document key a plan sets (``RE(plan, phasestream_geometry={"energy_kev": 9.1})``) to override
# the geometry of one scan; ingest validates it (``phasestream.runtime.geometry``).
GEOMETRY_KEY = "phasestream_geometry"


@dataclass(frozen=True)
class RunInfo:
    uid: str
    plan_name: str
    num_points: int | None
    shape: list[int]
    # ``phasestream_geometry`` of the start document (energy_kev, detector_distance_m, ...): this scan's
    # geometry overrides, which the detector passes on in its start message's user_data.
    geometry: dict[str, Any] | None = None


class ScanDetector(Device):
    """Base of the simulated detectors: image and series ids in every reading, geometry and motors in the
    configuration, and the run from the RunEngine's start document."""

    image_id = Component(Signal, value=-1, kind=Kind.hinted)
    series_id = Component(Signal, value=0, kind=Kind.normal)
    energy_kev = Component(Signal, value=0.0, kind=Kind.config)
    detector_distance_m = Component(Signal, value=0.0, kind=Kind.config)
    pixel_size_m = Component(Signal, value=0.0, kind=Kind.config)
    y_motor_name = Component(Signal, value="", kind=Kind.config)
    x_motor_name = Component(Signal, value="", kind=Kind.config)
    motor_unit_name = Component(Signal, value="", kind=Kind.config)

    def _attach(self, y_motor: Any, x_motor: Any, source: Any, motor_unit: LengthUnit) -> None:
        """Keep the motors and the frame source, and record what a replay needs in the configuration."""
        self.y_motor = y_motor
        self.x_motor = x_motor
        self.source = source
        self.motor_unit = LengthUnit(motor_unit)
        self._run: RunInfo | None = None
        for signal, value in (
            (self.energy_kev, float(source.energy_kev)),
            (self.detector_distance_m, float(source.detector_distance_m)),
            (self.pixel_size_m, float(source.pixel_size_m)),
            (self.y_motor_name, str(y_motor.name)),
            (self.x_motor_name, str(x_motor.name)),
            (self.motor_unit_name, self.motor_unit.value),
        ):
            signal.put(value)

    def on_run_start(self, name: str, doc: dict[str, Any]) -> None:
        """RunEngine callback (``RE.subscribe(detector.on_run_start, "start")``): note the new run."""
        if name == "start":
            num_points = doc.get("num_points")
            self._run = RunInfo(
                uid=doc["uid"],
                plan_name=str(doc.get("plan_name", "")),
                num_points=num_points if isinstance(num_points, int) else None,
                shape=list(doc.get("shape") or ([num_points] if isinstance(num_points, int) else [])),
                geometry=doc.get(GEOMETRY_KEY),
            )

    def position_m(self) -> tuple[float, float]:
        """Where the probe is on the sample now: the motors' readbacks in metres, y then x."""
        scale = self.motor_unit.metres
        return float(self.y_motor.position) * scale, float(self.x_motor.position) * scale
