"""Text made safe to show (nsteer.text) and plain progress lines (nsteer.progress), against written expectations."""

from __future__ import annotations

import io

import pytest

from nsteer.progress import duration, text_progress
from nsteer.text import markdown_text, visible


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("plain text, [bold]markup[/bold] and :ocean:", "plain text, [bold]markup[/bold] and :ocean:"),
        ("\x1b[31mred\x1b[0m", "\\x1b[31mred\\x1b[0m"),  # ANSI colour
        ("\x1b]8;;http://e.vil\x07link\x1b]8;;\x07", "\\x1b]8;;http://e.vil\\x07link\\x1b]8;;\\x07"),  # OSC 8 link
        ("\x1b]0;title\x1b\\", "\\x1b]0;title\\x1b\\"),  # OSC window title, ST terminator
        ("done\rFAKE", "done\\rFAKE"),  # a carriage return would overwrite the line
        ("\x9b31m", "\\x9b31m"),  # C1 CSI
        ("abc\u202edef", "abc\\u202edef"),  # right-to-left override
        ("bad \udcff byte", "bad \\udcff byte"),  # an undecodable byte of a file name
        ("a\x00b\x7f", "a\\x00b\\x7f"),
        ("déjà vu 日本", "déjà vu 日本"),
    ],
)
def test_visible_escapes_control_characters_and_nothing_else(raw, shown):
    assert visible(raw) == shown
    shown.encode("utf-8")  # printable as UTF-8 (a lone surrogate is not)


def test_visible_keeps_line_breaks_only_when_asked():
    assert visible("a\nb\tc") == "a\\nb\\tc"
    assert visible("a\nb\tc\r", newlines=True) == "a\nb\tc\\r"


def test_markdown_text_is_literal():
    assert markdown_text("a | b") == "a \\| b"
    assert markdown_text("<script>x</script>") == "&lt;script&gt;x&lt;/script&gt;"
    assert markdown_text("*bold* [link](http://e.vil) `code`") == "\\*bold\\* \\[link\\]\\(http://e.vil\\) \\`code\\`"
    assert markdown_text("\x1b[31m") == "\\\\x1b\\[31m"  # visible first, then its backslash escaped for Markdown


def test_duration():
    assert duration(0) == "0:00" and duration(61.4) == "1:01" and duration(3725) == "1:02:05"


def test_text_progress_writes_first_every_and_last_with_time_left():
    now = [100.0]
    stream = io.StringIO()
    update = text_progress(stream, every=10.0, clock=lambda: now[0])("compute \x1b[31mx")
    update(0, 100)  # first: written
    for done, at in ((10, 105.0), (20, 110.0), (30, 111.0), (99, 119.0), (100, 120.0), (100, 121.0)):
        now[0] = at
        update(done, 100)
    lines = stream.getvalue().splitlines()
    assert lines == [
        "compute \\x1b[31mx: 0/100 (0%), 0:00 elapsed",
        "compute \\x1b[31mx: 20/100 (20%), 0:10 elapsed, about 0:40 left",  # 10 s per 20 items, 80 to go
        "compute \\x1b[31mx: 100/100 (100%), 0:20 elapsed, done",
    ]


def test_text_progress_rate_ignores_work_done_before_a_resumed_run():
    now = [0.0]
    stream = io.StringIO()
    update = text_progress(stream, every=0.0, clock=lambda: now[0])("eval")
    update(50, 100)  # resumed from a checkpoint: half done already
    now[0] = 10.0
    update(60, 100)  # 10 items in 10 s, 40 left
    assert stream.getvalue().splitlines()[-1] == "eval: 60/100 (60%), 0:10 elapsed, about 0:40 left"
