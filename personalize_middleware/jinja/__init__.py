"""Jinja integration: the ``{% experience %}`` tag, value readers, tracking hooks, and
Starlette / FastAPI templates that wait for the request's experiences.

::

    templates = PersonalizeTemplates(directory="templates")   # Starlette / FastAPI
    setup_templates(templates)      # or: a Jinja2Templates built elsewhere
    setup_jinja(env)                # or: any jinja2.Environment
    set_allowed_url_hosts(templates.env, ["shop.example.com"])  # hosts `url` links to

Where things live:

- ``_extension``: ``PersonalizeExtension`` (the tag) and ``setup_jinja``;
- ``_direct``: the tag body's reads and hooks compiled to direct calls (no
  ``Context.call`` per read);
- ``_readers``: ``TemplateExperience`` (with the ``url`` reader), the globals / filters
  templates call, and ``set_allowed_url_hosts``;
- ``_templates``: ``PersonalizeTemplates``, ``PersonalizedTemplateResponse`` and
  ``setup_templates``;
- ``_lint``: ``lint_templates`` / ``lint_template``, payload values placed where escaping
  cannot help (``personalize-middleware check --templates``).

Users import these names from ``personalize_middleware``.
"""

from __future__ import annotations

from ._extension import PersonalizeExtension, setup_jinja
from ._lint import LintFinding, lint_template, lint_templates
from ._readers import TemplateExperience, set_allowed_url_hosts
from ._templates import PersonalizedTemplateResponse, PersonalizeTemplates, setup_templates

__all__ = [
    "LintFinding",
    "PersonalizeExtension",
    "PersonalizeTemplates",
    "PersonalizedTemplateResponse",
    "TemplateExperience",
    "lint_template",
    "lint_templates",
    "set_allowed_url_hosts",
    "setup_jinja",
    "setup_templates",
]
