"""Stages by name, imported only when used, so the runtime never pays for torch it does not need.

Adding a stage is one module, one test and one line here; a pipeline YAML may also name any
``module:attr`` directly.
"""

from __future__ import annotations

import importlib

from phasestream.errors import ConfigError
from phasestream.runtime.stage import Stage

STAGES: dict[str, str] = {
    "ingest": "phasestream.stages.ingest.stage:IngestStage",
    "tpx3_ingest": "phasestream.stages.tpx3_ingest:Tpx3IngestStage",
    "record": "phasestream.stages.record:RecordStage",
    "binning": "phasestream.stages.binning:BinningStage",
    "inversion": "phasestream.stages.inversion:InversionStage",
    "refine": "phasestream.stages.refine.stage:RefineStage",
    "denoise": "phasestream.stages.denoise:DenoiseStage",
    "cdi": "phasestream.stages.cdi_stage:CdiStage",
    "publish": "phasestream.stages.publish:PublishStage",
}


def resolve_stage(ref: str) -> type[Stage]:
    """Return the Stage class for a registry name or a ``module:attr`` reference."""
    target = STAGES.get(ref, ref)
    module_name, sep, attr = target.partition(":")
    if not sep:
        raise ConfigError(
            f"unknown stage {ref!r}: use one of {sorted(STAGES)} or a 'package.module:ClassName' reference"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"stage {ref!r}: cannot import module {module_name!r} ({exc})") from exc
    cls = getattr(module, attr, None)
    if not (isinstance(cls, type) and issubclass(cls, Stage)):
        raise ConfigError(f"stage {ref!r}: {target} is not a phasestream.runtime.stage.Stage subclass")
    return cls
