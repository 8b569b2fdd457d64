"""The embedded local mode: MoEngage Personalize evaluated from a local experiences file.

``LocalBackend`` runs the engine in process behind the same interface as the HTTP client;
``create_local_server`` puts it behind a MoEngage-compatible HTTP server;
``local_report_app`` / ``render_report`` show the recorded impressions and clicks.
The file format is described in ``_file`` and in ``docs/local-experiences.md``.
"""

from __future__ import annotations

from ._backend import DEFAULT_MAX_EVENTS, LocalBackend
from ._engine import bucket, evaluate
from ._file import load_experiences_file, load_sample_file, parse_experiences, sample_file_path
from ._model import Audience, ExperienceDefinition, ExperiencesFile, Variation
from ._report import (
    ExperienceReport,
    RecordedEvent,
    Report,
    ReportRow,
    local_report_app,
    render_report,
)
from ._rules import device_type
from ._server import create_local_server

__all__ = [
    "DEFAULT_MAX_EVENTS",
    "Audience",
    "ExperienceDefinition",
    "ExperienceReport",
    "ExperiencesFile",
    "LocalBackend",
    "RecordedEvent",
    "Report",
    "ReportRow",
    "Variation",
    "bucket",
    "create_local_server",
    "device_type",
    "evaluate",
    "load_experiences_file",
    "load_sample_file",
    "local_report_app",
    "parse_experiences",
    "render_report",
    "sample_file_path",
]
