"""Themes as data files (B77): built-ins from `themes/`, user themes from the config dir.

Only Textual's Theme API is used. A user theme that does not parse or has bad values is
skipped with a message for the caller to show; a built-in name is never replaced by one.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

from textual.theme import Theme

import rbee_tui
from rbee_tui.config import config_path

_FIELDS = {"name", "primary", "secondary", "warning", "error", "success", "accent",
           "foreground", "background", "surface", "panel", "boost", "dark",
           "luminosity_spread", "text_alpha", "variables"}


@dataclass(frozen=True)
class LoadedThemes:
    themes: list[Theme]
    problems: list[str]


def builtin_dir() -> Path:
    packaged = Path(rbee_tui.__file__).parent / "themes"
    return packaged if packaged.is_dir() else Path(rbee_tui.__file__).parent.parent / "themes"


def user_dir() -> Path:
    return config_path().parent / "themes"


def theme_from_file(path: Path) -> Theme:
    with path.open("rb") as fh:
        data = tomllib.load(fh)
    unknown = set(data) - _FIELDS
    if unknown:
        raise ValueError(f"unknown keys {', '.join(sorted(unknown))}")
    data.setdefault("name", path.stem)
    return Theme(**data)


def load_themes(extra_dirs: list[Path] | None = None) -> LoadedThemes:
    themes: list[Theme] = []
    problems: list[str] = []
    builtin_names: set[str] = set()
    for folder, builtin in [(builtin_dir(), True), *((d, False) for d in extra_dirs or [])]:
        if not folder.is_dir():
            continue
        for path in sorted(folder.glob("*.toml")):
            try:
                theme = theme_from_file(path)
                _check_colours(theme)
            except Exception as exc:  # a user's file may be wrong in any way
                problems.append(f"Theme file {path} was skipped: {exc}")
                continue
            if not builtin and theme.name in builtin_names:
                problems.append(f"Theme file {path} was skipped: '{theme.name}' is built in")
                continue
            if builtin:
                builtin_names.add(theme.name)
            themes.append(theme)
    return LoadedThemes(themes, problems)


def _check_colours(theme: Theme) -> None:
    from textual.color import Color

    for field in ("primary", "secondary", "warning", "error", "success", "accent",
                  "foreground", "background", "surface", "panel"):
        value = getattr(theme, field)
        if value is not None:
            Color.parse(value)
