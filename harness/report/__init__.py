"""HTML regression report: one self-contained page from cross-validation records.

    render_html(records, title, generated_at=None, environment=None) -> str
    write_report(records, path, title=..., generated_at=None, environment=None) -> Path

`write_report` writes the HTML and `<name>.json` (all records combined) beside it, both atomically.
The report only reads records (harness/records.py); it never runs anything.
"""

from .html import effective_status, render_html, write_report

__all__ = ["effective_status", "render_html", "write_report"]
