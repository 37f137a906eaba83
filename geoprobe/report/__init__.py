"""HTML reports of geometry profiles: ``render_report(profiles, path)`` writes one self-contained
page (inline CSS and SVG plots, no script, no network request); ``render_html`` returns it as text;
``default_report_path`` names it ``reports/<model>.html``; ``profile_figures`` draws a profile's
figures as matplotlib ``Figure`` objects (for notebooks)."""
from __future__ import annotations

from .html import default_report_path, model_slug, render_html, render_report
from .plots import profile_figures

__all__ = ["default_report_path", "model_slug", "profile_figures", "render_html", "render_report"]
