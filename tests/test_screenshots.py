"""B176: the screenshots render offline, and each has its PNG."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from tests.support import REPO

sys.path.insert(0, str(REPO / "tools"))
import screenshots

SNAPSHOT = REPO / "tests" / "__snapshots__" / "test_tui_snapshots"


def test_b176_offline_svg_needs_no_cdn_and_names_local_monospace_fonts() -> None:
    original = next(SNAPSHOT.glob("*.svg")).read_text()
    assert "https://cdnjs" in original  # what Textual writes
    offline = screenshots.offline_svg(original)
    assert "url(" not in offline.split("</style>")[0]
    assert '"DejaVu Sans Mono", "Menlo", "Consolas"' in offline
    assert offline.count("<text") == original.count("<text")  # the picture is unchanged


def test_b176_the_committed_screenshots_are_offline_and_have_their_png() -> None:
    shots = sorted((REPO / "screenshots").glob("*.svg"))
    assert shots
    for svg in shots:
        assert "url(" not in svg.read_text().split("</style>")[0], svg.name
        png = svg.with_suffix(".png")
        assert png.is_file() and png.read_bytes().startswith(b"\x89PNG"), png.name


@pytest.mark.skipif(shutil.which("rsvg-convert") is None, reason="rsvg-convert is missing")
def test_b176_a_png_is_drawn_from_an_svg(tmp_path: Path) -> None:
    svg = tmp_path / "shot.svg"
    svg.write_text(next(SNAPSHOT.glob("*.svg")).read_text())
    screenshots.svg_to_png(svg, tmp_path / "shot.png")
    assert (tmp_path / "shot.png").read_bytes().startswith(b"\x89PNG")
