"""File names as one line of text, for every list of paths byolcli writes.

A list holds one name per line, so a name must never contain a line break, and
`path<TAB>reason` lines need names without tabs. Ordinary names are written as
they are. The rest follow one rule, the escapes of Python's bytes literals:

    \\  for a backslash          \\t \\n \\r  for tab, line feed, carriage return
    \\xHH  for each UTF-8 byte of any other control or line-separator character,
           and for each byte of a name that is not valid UTF-8

`codecs.escape_decode` undoes it, so the lists are readable without byolcli
(the README shows the three lines).
"""

from __future__ import annotations

import codecs
import os
import unicodedata
from collections.abc import Iterable

NAMED = {"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"}
# Control characters, and the separators that str.splitlines() breaks on.
UNSAFE_CATEGORIES = {"Cc", "Zl", "Zp"}


def escape_name(name: str) -> str:
    """`name` (as os.listdir gives it: undecodable bytes as surrogates) as one safe line."""
    if name.isprintable() and "\\" not in name:
        return name
    return "".join(_escape_char(char) for char in name)


def _escape_char(char: str) -> str:
    if char in NAMED:
        return NAMED[char]
    if 0xDC80 <= ord(char) <= 0xDCFF:  # a byte that was not UTF-8 (surrogateescape)
        return f"\\x{ord(char) - 0xDC00:02x}"
    if unicodedata.category(char) in UNSAFE_CATEGORIES:
        return "".join(f"\\x{byte:02x}" for byte in char.encode("utf-8"))
    return char


def unescape_name(line: str) -> str:
    """The file name that `escape_name` wrote as `line`."""
    if "\\" not in line:
        return line
    return os.fsdecode(codecs.escape_decode(line.encode("utf-8", "surrogateescape"))[0])


def write_names(names: Iterable[str]) -> str:
    """The text of a name list: one escaped name per line."""
    return "".join(f"{escape_name(name)}\n" for name in names)


def read_names(text: str) -> list[str]:
    """The names of a list `write_names` wrote (only '\\n' ends a line; the last may lack it)."""
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return [unescape_name(line) for line in lines]
