"""B163: logs wrap on a key and can be searched with / and n/N."""

from __future__ import annotations

from rbee_tui.screens.logs import LogsScreen
from rbee_tui.widgets.log_view import LogView
from rbee_tui.widgets.top_bar import TopBar
from tests.tui_support import LOG_LINES, fill, make_app, until

SIZE = (80, 24)


async def test_b163_logs_wrap_and_search_with_n_and_shift_n() -> None:
    app, source = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await fill(app, source, 1)
        await pilot.press("j", "l")
        screen = app.screen
        assert isinstance(screen, LogsScreen)
        view = screen.query_one(LogView)
        await until(pilot, lambda: len(view.lines()) == len(LOG_LINES))
        longest = max(len(line) for line in view.lines())
        assert longest > view.size.width  # these lines do not fit in 80 columns
        assert not view.soft_wrap
        await pilot.press("w")
        assert view.soft_wrap and view.wrapped_document.height > len(LOG_LINES)
        assert "wrapped" in screen.query_one(TopBar).status
        await pilot.press("slash", *"worker", "enter")
        assert len(view.matches) == 3  # "worker" in three of the four lines
        first = view.selection
        assert view.text.split("\n")[first.start[0]][first.start[1]:first.end[1]] == "worker"
        await pilot.press("n")
        assert view.selection.start[0] > first.start[0]
        assert "match" in screen.query_one(TopBar).status
        await pilot.press("N")
        assert view.selection == first
        assert not view.following, "a search stops following"
        await pilot.press("G")
        assert view.following
        await pilot.press("escape")  # ends the search
        assert not screen.query_one("#search").display and view.matches == []
        await pilot.press("escape")  # then goes back
        assert app.screen is app.dashboard
