"""The embedded local mode: MoEngage Personalize evaluated from a local experiences file.

``LocalBackend`` runs the engine in process behind the same interface as the HTTP client;
``create_local_server`` puts it behind a MoEngage-compatible HTTP server.
``ReportCounter`` counts impressions and clicks (a ``LocalBackend`` owns one; anyone can
feed one the events a backend sent, with ``record_elements``), and ``local_report_app`` /
``render_report`` show the ``Report`` of any ``ReportSource``.
The file format is described in ``_file`` and in ``docs/local-experiences.md``.
"""

from __future__ import annotations

from ._backend import DEFAULT_MAX_EVENTS, LocalBackend
from ._counter import (
    DEFAULT_MAX_REPORT_ROWS,
    OTHER_B_IDS_LABEL,
    OTHER_EXPERIENCES_KEY,
    OTHER_VARIATIONS_LABEL,
    ReportCounter,
)
from ._engine import bucket, evaluate
from ._file import load_experiences_file, load_sample_file, parse_experiences, sample_file_path
from ._model import Audience, ExperienceDefinition, ExperiencesFile, Variation
from ._report import ExperienceReport, RecordedEvent, Report, ReportRow, ReportSource
from ._report_app import local_report_app, render_report
from ._rules import device_type
from ._server import create_local_server

__all__ = [
    "DEFAULT_MAX_EVENTS",
    "DEFAULT_MAX_REPORT_ROWS",
    "OTHER_B_IDS_LABEL",
    "OTHER_EXPERIENCES_KEY",
    "OTHER_VARIATIONS_LABEL",
    "Audience",
    "ExperienceDefinition",
    "ExperienceReport",
    "ExperiencesFile",
    "LocalBackend",
    "RecordedEvent",
    "Report",
    "ReportCounter",
    "ReportRow",
    "ReportSource",
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
