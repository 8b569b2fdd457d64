"""Jinja integration: the ``{% experience %}`` tag, value readers, tracking hooks, and
Starlette / FastAPI templates that wait for the request's experiences.

::

    templates = PersonalizeTemplates(directory="templates")   # Starlette / FastAPI
    setup_templates(templates)      # or: a Jinja2Templates built elsewhere
    setup_jinja(env)                # or: any jinja2.Environment

Where things live:

- ``_extension``: ``PersonalizeExtension`` (the tag) and ``setup_jinja``;
- ``_readers``: ``TemplateExperience`` and the globals / filters templates call;
- ``_templates``: ``PersonalizeTemplates``, ``PersonalizedTemplateResponse`` and
  ``setup_templates``.

Users import these names from ``personalize_middleware``.
"""

from __future__ import annotations

from ._extension import PersonalizeExtension, setup_jinja
from ._readers import TemplateExperience
from ._templates import PersonalizedTemplateResponse, PersonalizeTemplates, setup_templates

__all__ = [
    "PersonalizeExtension",
    "PersonalizeTemplates",
    "PersonalizedTemplateResponse",
    "TemplateExperience",
    "setup_jinja",
    "setup_templates",
]
