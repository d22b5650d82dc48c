"""Terminal views of a generation: the committed text and the canvas being denoised.

A diffusion model does not write left to right: at every step it redraws a
whole canvas (256 tokens) until the canvas settles, then commits it. On a
terminal, `LiveView` shows this as it happens. Committed text is written once,
as plain text; the current draft of the canvas follows it, dim, and is redrawn
in place at every step. Committing erases the draft and writes the final text
where it was, so the screen ends with the text a pipe would have received.

Redrawing in place means moving the cursor back to where the draft began. The
terminal wraps long lines itself, so the view counts the rows the draft took at
the terminal's width and moves up that many. It never goes above the end of the
committed text (rows scrolled off the screen cannot be redrawn), so a draft
taller than the screen is cut to fit. A terminal resized mid-draft may leave a
stale row behind; the committed text is not affected.

`PlainView` writes the committed text alone: with no escape codes at all for a
pipe, with styles for a terminal when the live view is switched off.
"""

import os
import shutil
import sys
import time
import unicodedata
from typing import Optional

RESET = "\x1b[0m"
DIM = "\x1b[2m"
DRAFT = "\x1b[2;36m"  # dim cyan: a draft, told apart from (dim) thoughts
FIXED = "\x1b[33m"  # yellow: known text held fixed beside a draft (infilling, editing)
CLEAR_TO_END_OF_LINE = "\x1b[K"
CLEAR_LINE = "\x1b[2K"
CURSOR_DOWN = "\x1b[1B"
HIDE_CURSOR = "\x1b[?25l"
SHOW_CURSOR = "\x1b[?25h"
ELLIPSIS = "\u2026"

# C0 and C1 control characters but newline and tab. A model writes them through
# byte tokens; on a terminal they would move the cursor or start escape codes.
_CONTROLS = {c: "\ufffd" for c in [*range(0x20), 0x7F, *range(0x80, 0xA0)] if chr(c) not in "\n\t"}


def printable(text: str) -> str:
    """``text`` safe to show on a terminal: control characters become U+FFFD."""
    return text.translate(_CONTROLS)


def char_width(ch: str) -> int:
    """Columns a (printable) character takes on a terminal (as wcwidth says)."""
    if ch == "\xad":
        return 1  # a soft hyphen is a format character that terminals show
    if unicodedata.combining(ch) or unicodedata.category(ch) in ("Mn", "Me", "Cf"):
        return 0
    return 2 if unicodedata.east_asian_width(ch) in "WF" else 1


def advance(column: int, text: str, width: int):
    """Where writing ``text`` from ``column`` leaves the cursor: (rows down, column).

    As a terminal with autowrap does it: a character that does not fit on the
    row goes to the next one, and a row filled to the end leaves the cursor at
    ``width`` ("pending wrap") until the next character or newline.
    """
    rows = 0
    for ch in text:
        if ch == "\n":
            rows, column = rows + 1, 0
        elif ch == "\t":
            if column < width - 1:
                column = min(column - column % 8 + 8, width - 1)
        else:
            w = char_width(ch)
            if w and column + w > width:
                rows, column = rows + 1, 0
            column += w
    return rows, column


def expand_tabs(text: str, column: int, width: int) -> str:
    """Tabs as the spaces they would take on the screen from ``column``, so
    that the view knows where they end whatever the terminal's tab stops."""
    if "\t" not in text:
        return text
    out = []
    for ch in text:
        if ch == "\t":
            stop = min(column - column % 8 + 8, width - 1)
            ch = " " * max(stop - column, 0)
        out.append(ch)
        _, column = advance(column, ch, width)
    return "".join(out)


def fit(text: str, column: int, width: int, max_rows: int) -> str:
    """The longest head of ``text`` that stays within ``max_rows`` rows below
    the cursor's, ending with an ellipsis when cut."""
    rows, col = 0, column
    fits = 0  # characters that leave room for the ellipsis on their row
    for i, ch in enumerate(text):
        r, col = advance(col, ch, width)
        rows += r
        if rows > max_rows:
            return text[:fits] + ELLIPSIS
        if rows < max_rows or col < width:
            fits = i + 1
    return text


class PlainView:
    """Committed text as it comes; nothing is ever redrawn.

    ``styled`` (a terminal): control characters are replaced and ``style``
    escape codes are written. Unstyled (a pipe): the text is written as is.
    """

    def __init__(self, stream=None, styled: bool = False, final_newline: bool = True):
        self.stream = stream or sys.stdout
        self.styled = styled
        # Off where the output must be exactly the text written (an edited file).
        self.final_newline = final_newline

    def write(self, text: str, style: Optional[str] = None):
        if self.styled:
            text = printable(text)
            if style and text:
                text = style + text + RESET
        self._emit(text)

    def wants_draft(self) -> bool:
        """Whether a draft given now would be drawn (ask before decoding one)."""
        return False

    def draft(self, text: str, status: str = ""):
        """The canvas being denoised: not shown."""

    def draft_parts(self, parts, status: str = ""):
        """A canvas of (text, fixed) runs, fixed text told apart: not shown."""

    def finish(self):
        """End the generation's output with a newline."""
        if self.final_newline:
            self._emit("\n")

    def _emit(self, text: str):
        self.stream.write(text)
        self.stream.flush()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.finish()


class LiveView(PlainView):
    """Committed text, followed by the current draft redrawn in place.

    ``min_interval`` (seconds) caps the redraw rate, so a fast model does not
    flood a slow terminal; commits are always written at once.
    """

    def __init__(self, stream=None, min_interval: float = 1 / 30, terminal_size=None, final_newline: bool = True):
        super().__init__(stream, styled=True, final_newline=final_newline)
        self.min_interval = min_interval
        self.terminal_size = terminal_size or self._terminal_size
        self.column = 0  # where the committed text ends on its row
        self.rows = None  # rows below that one the drawn draft reaches (None: none drawn)
        self.wrapped = False  # the cursor was moved off a full row (see draft)
        self.cursor_hidden = False
        self.last_draw = -float("inf")

    def write(self, text: str, style: Optional[str] = None):
        out = self._erase()
        text = printable(text)
        if self.wrapped and text:
            # The cursor already went to the next row. From the full row, tabs
            # and zero-width characters (an accent for the last letter, not
            # shown) would not have moved it, and a newline would have taken
            # it where it is.
            start = 0
            while start < len(text) and (text[start] == "\t" or char_width(text[start]) == 0):
                start += 1
            newline = text.startswith("\n", start)
            text = text[start + newline :]
            self.wrapped = not (text or newline)
        width = self._width()
        text = expand_tabs(text, self.column, width)
        _, self.column = advance(self.column, text, width)
        if style and text:
            text = style + text + RESET
        self._emit(out + text)

    def wants_draft(self) -> bool:
        return time.monotonic() - self.last_draw >= self.min_interval

    def draft(self, text: str, status: str = ""):
        self.draft_parts([(text, False)], status)

    def draft_parts(self, parts, status: str = ""):
        """The draft as runs of (text, fixed): drafted text dim cyan, fixed
        text (infilling's suffix, the text around an edit) in ``FIXED``."""
        if not self.wants_draft():
            return
        self.last_draw = time.monotonic()
        width, height = self.terminal_size()
        out = self._erase()
        if not self.cursor_hidden:
            out = HIDE_CURSOR + out
            self.cursor_hidden = True
        if self.column >= width:
            # The committed text filled its row and the terminal waits for the
            # next character to wrap; cursor moves cannot return to that state,
            # so go to the next row now, where the wrap would have gone.
            out += "\r\n"
            self.column, self.wrapped = 0, True
        # Keep the draft and its status line (if there is room) on the screen.
        status = status[: width - 1] if height > 1 else ""
        # The parts are laid out as one text, which is cut to fit; each keeps its style.
        column, laid_out = self.column, []
        for text, fixed in parts:
            text = expand_tabs(printable(text), column, width)
            _, column = advance(column, text, width)
            laid_out.append((text, FIXED if fixed else DRAFT))
        whole = "".join(text for text, _ in laid_out)
        shown = fit(whole, self.column, width, max(height - 1 - bool(status), 0))
        keep = len(shown) if shown == whole else len(shown) - 1  # characters of ``whole`` shown
        at = 0
        for text, style in laid_out:
            piece = text[: max(keep - at, 0)]
            if piece:
                out += style + piece + RESET
            at += len(text)
            if at >= keep:
                break
        if shown != whole:
            out += style + ELLIPSIS + RESET
        rows, _ = advance(self.column, shown, width)
        if status:
            out += "\n" + DIM + status + RESET
            rows += 1
        self.rows = rows
        self._emit(out)

    def finish(self):
        out = self._erase()
        if not self.wrapped and self.final_newline:
            out += "\n"
        if self.cursor_hidden:
            out += SHOW_CURSOR
            self.cursor_hidden = False
        self.column, self.wrapped = 0, False
        self._emit(out)

    def _erase(self) -> str:
        """Escape codes clearing the draft and leaving the cursor at the end of
        the committed text.

        The draft's rows are cleared one by one: clearing "to the end of the
        screen" from the top-left corner counts as clearing the screen, which
        some terminals (tmux) first copy into the scrollback.
        """
        if self.rows is None:
            return ""
        up = f"\x1b[{self.rows}A" if self.rows else ""
        out = "\r" + up
        if self.column:
            out += f"\x1b[{self.column}C"
        # Clear each row going down, then come back up: moving up and down
        # keeps the column, where the committed text ends.
        out += CLEAR_TO_END_OF_LINE + (CURSOR_DOWN + CLEAR_LINE) * self.rows + up
        self.rows = None
        return out

    def _width(self) -> int:
        return self.terminal_size()[0]

    def _terminal_size(self):
        # Ask the terminal: COLUMNS and LINES, which shutil reads first, can be
        # stale (a shell exports them, then the window is resized).
        try:
            return os.get_terminal_size(self.stream.fileno())
        except (AttributeError, ValueError, OSError):
            return shutil.get_terminal_size()
