"""Display width of text on a terminal: the one place the CLI measures, pads and cuts.

``len`` counts code points, but a terminal gives an East Asian wide character (任, パ,
most emoji) two columns and a combining mark or a zero-width joiner none, so
``str.ljust`` pushes every later column of a row holding such text to the right.
Widths come from the wcwidth library, which follows each Unicode release (emoji,
variation selectors, grapheme clusters); a table of our own would not.

Only ``wcwidth.wcswidth``, its long-stable POSIX-style call, is used. It answers -1
for text with control characters, so cells are made single-line printable text
first (``one_line``): a newline or a tab in an error message would break a row anyway.
"""

from __future__ import annotations

from wcwidth import wcswidth, wcwidth


def one_line(text: str) -> str:
    """``text`` with every control character (C0, DEL, C1) replaced: whitespace ones by
    a space, others by U+FFFD, so a cell stays on its row and cannot drive the terminal
    (an ESC in a node name or an error would otherwise reach it)."""
    if text.isprintable():
        return text
    return "".join(char if not _is_control(char) else (" " if char.isspace() else "\ufffd") for char in text)


def width(text: str) -> int:
    """Columns ``text`` takes on a terminal (control characters count as ``one_line`` shows them)."""
    if text.isascii() and text.isprintable():
        return len(text)  # the common case, and wcswidth is far slower than len
    text = one_line(text)
    columns = wcswidth(text)
    if columns < 0:  # a character wcwidth cannot place: count what it can, one by one
        columns = sum(max(wcwidth(char), 0) for char in text)
    return columns


def pad(text: str, columns: int) -> str:
    """``text`` followed by spaces up to ``columns`` display columns (``str.ljust`` by width)."""
    return text + " " * max(columns - width(text), 0)


def clip(text: str, columns: int) -> str:
    """The longest start of ``text`` that fits in ``columns`` display columns.

    A wide character that would straddle the limit is left out whole (never half of
    it). Zero-width characters right after the cut (combining marks) stay with their
    base character.
    """
    if columns <= 0:
        return ""
    if width(text) <= columns:
        return text
    # Binary search on the prefix length: a prefix's width never shrinks as it grows.
    low, high = 0, len(text)  # width(text[:low]) <= columns < width(text[:high])
    while high - low > 1:
        middle = (low + high) // 2
        if width(text[:middle]) <= columns:
            low = middle
        else:
            high = middle
    return text[:low]


def _is_control(char: str) -> bool:
    code = ord(char)
    return code < 0x20 or 0x7F <= code < 0xA0
