"""Public building blocks for pages other than a run's report (a study's page, a comparison): the same style,
and the same escaping of everything that comes from files. `lamina.report.html` keeps the run report."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

from lamina.io import atomic_write_text
from lamina.report.html import CSS, _esc, _has_content, _img, _kv, _section, _table


def esc(v) -> str:
    return _esc(v)


def table(rows: list[dict], cols: list[str] | None = None) -> str:
    """An HTML table; numbers formatted, everything else escaped."""
    return _table(rows, cols)


def key_values(d: dict) -> str:
    return _kv(d)


def image(path: str | Path, alt: str) -> str:
    """A PNG embedded as data (the page stays one self-contained file); '' when the file is missing."""
    return _img(Path(path), alt)


def section(sid: str, title: str, body: str, sub: str = "") -> tuple[str, str]:
    """(id, html); `sub` is trusted markup written by lamina, never text from a file."""
    return _section(sid, title, body, sub)


def write_page(path: str | Path, title: str, subtitle: str, sections: list[tuple[str, str]],
               nav: dict[str, str] | None = None) -> Path:
    """One self-contained HTML page; empty sections are left out."""
    shown = [(sid, body) for sid, body in sections if _has_content(body)]
    links = "".join(f'<a href="#{_esc(sid)}">{_esc((nav or {}).get(sid, sid))}</a>' for sid, _ in shown)
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    page = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{_esc(title)}</title><style>{CSS}</style></head><body><main>"
            f"<h1>{_esc(title)}</h1><p class='sub'>{_esc(subtitle)}, {stamp}</p><nav>{links}</nav>"
            + "".join(body for _, body in shown) + "</main></body></html>")
    path = Path(path)
    atomic_write_text(path, page)
    return path


__all__ = ["esc", "table", "key_values", "image", "section", "write_page"]
