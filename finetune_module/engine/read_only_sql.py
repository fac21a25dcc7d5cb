"""Keeping a database read-only while a query given by the user reads from it.

Two layers, so that each would hold alone:

- `read_only_select(query, ...)` refuses, before anything reaches the database, whatever is not
  one SELECT (or WITH ... SELECT, possibly in parentheses): other statements, a second statement,
  a WITH whose body writes (INSERT, UPDATE, DELETE, MERGE) and SELECT ... INTO. It reads the
  query with a small tokenizer that skips string literals, quoted names and comments, and where
  a construct could be read two ways it takes the reading that shows more of the query.
- The database itself refuses writes: SQLite is opened read-only (`mode=ro`) and the query runs
  under an authorizer that allows only reading (no ATTACH, PRAGMA, temporary tables); on
  PostgreSQL the query runs in a READ ONLY transaction as one prepared statement (the extended
  protocol refuses a second statement), and the transaction is rolled back, never committed.
"""

import re
import sqlite3
import urllib.parse
from collections.abc import Iterator
from typing import Any

from finetune_module.errors import SettingsError

# words that make a statement write (a data-modifying WITH, SELECT ... INTO, SQLite's
# WITH ... INSERT/REPLACE INTO, a row-locking FOR UPDATE); wherever they appear unquoted,
# the query is refused
WRITING_WORDS = ("insert", "update", "delete", "merge", "into")
ONLY_SELECT = "sources are read-only: give one SELECT (or WITH ... SELECT) query"
# a name (or keyword): a letter, underscore or any non-ASCII character, then those, digits or $
_WORD = re.compile(r"[A-Za-z_\u0080-\U0010ffff][A-Za-z0-9_$\u0080-\U0010ffff]*")
_NUMBER = re.compile(r"(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
# PostgreSQL: $tag$ ... $tag$ (a tag cannot start with a digit: $1 is a parameter)
_DOLLAR_TAG = re.compile(r"\$(?:[A-Za-z_\u0080-\U0010ffff][A-Za-z0-9_\u0080-\U0010ffff]*)?\$")
_PARAMETER = re.compile(r"\$[0-9]+")


class _Unclosed(Exception):
    """A quoted string or name that the query never closes."""


def _end_of_quoted(sql: str, start: int, close: str, doubled: bool, backslashes: bool) -> int:
    """Where the quoted text opened at `start` ends (just past its closing character): a doubled
    closing character stands for itself, and so does any character after a backslash."""
    i = start + 1
    while True:
        found = sql.find(close, i)
        if found < 0:
            raise _Unclosed
        if backslashes and sql.count("\\", i, found):
            escape = sql.find("\\", i, found)
            i = escape + 2
            continue
        if doubled and sql.startswith(close, found + 1):
            i = found + 2
            continue
        return found + 1


def _tokens(sql: str, postgres: bool, backslash_strings: bool) -> Iterator[tuple[str, int]]:
    """The query's tokens outside comments, as (text, end): words in lower case, a string
    literal or quoted name as "'" or '"', any other character as itself. With
    `backslash_strings`, a backslash escapes the next character in every string literal (a
    PostgreSQL server with standard_conforming_strings off), else only in E'...' strings."""
    i, n = 0, len(sql)
    while i < n:
        c = sql[i]
        if c.isspace():
            i += 1
        elif sql.startswith("--", i):  # to the end of the line; \r ends it too (the safe side)
            ends = [e for e in (sql.find("\n", i), sql.find("\r", i)) if e >= 0]
            i = min(ends, default=n)
        elif sql.startswith("/*", i):  # to the first */ (PostgreSQL nests them: the safe side)
            end = sql.find("*/", i + 2)
            i = n if end < 0 else end + 2
        elif c == "'":
            i = _end_of_quoted(sql, i, "'", doubled=True, backslashes=backslash_strings)
            yield "'", i
        elif c == '"' or (not postgres and c == "`"):
            i = _end_of_quoted(sql, i, c, doubled=True, backslashes=False)
            yield '"', i
        elif not postgres and c == "[":  # SQLite's [name]
            i = _end_of_quoted(sql, i, "]", doubled=False, backslashes=False)
            yield '"', i
        elif postgres and c == "$" and (tag := _DOLLAR_TAG.match(sql, i)):
            end = sql.find(tag.group(), tag.end())
            if end < 0:
                raise _Unclosed
            i = end + len(tag.group())
            yield "'", i
        elif postgres and c == "$" and (parameter := _PARAMETER.match(sql, i)):
            i = parameter.end()
            yield "$", i
        elif word := _WORD.match(sql, i):
            if postgres and word.group() in ("e", "E") and sql.startswith("'", word.end()):
                i = _end_of_quoted(sql, word.end(), "'", doubled=True, backslashes=True)
                yield "'", i
            else:
                i = word.end()
                yield word.group().lower(), i
        elif number := _NUMBER.match(sql, i):
            i = number.end()
            yield "0", i
        else:
            i += 1
            yield c, i


def _refusal(query: str, postgres: bool, backslash_strings: bool) -> tuple[str | None, int]:
    """Why the query is not one SELECT that only reads (None if it is), and where its last
    token ends."""
    try:
        tokens = list(_tokens(query, postgres, backslash_strings))
    except _Unclosed:
        if backslash_strings:  # the server would refuse it whole: nothing of it could run
            return None, 0
        return "a quoted string or name in the query is never closed", 0
    while tokens and tokens[-1][0] == ";":
        tokens.pop()
    words = [text for text, _ in tokens]
    if not words:
        return "the query is empty", 0
    if ";" in words:
        return f"more than one statement; {ONLY_SELECT}", 0
    first = next((w for w in words if w != "("), "")
    if first not in ("select", "with"):
        return f"the query starts with {first.upper()!r}; {ONLY_SELECT}", 0
    writing = next((w for w in words if w in WRITING_WORDS), None)
    if writing:
        return (
            f"the query contains {writing.upper()}, which writes; {ONLY_SELECT} (a name "
            f"spelled {writing.upper()} must be in double quotes)"
        ), 0
    return None, tokens[-1][1]


def read_only_select(query: str, label: str, postgres: bool) -> str:
    """The query as it is sent (without trailing semicolons and comments), when it is one
    SELECT that only reads; else a SettingsError naming the source and the reason. On
    PostgreSQL the query must pass whether or not the server reads a backslash in a string
    literal as an escape (the setting standard_conforming_strings): read with escapes, a string
    left open (`'C:\\'`) is a syntax error, which runs nothing, so it passes."""
    end = 0
    for backslash_strings in (False, True) if postgres else (False,):
        reason, end_here = _refusal(query, postgres, backslash_strings)
        if reason:
            raise SettingsError(f"{label}: {reason}.")
        end = end or end_here
    return query[:end]


def read_only_sqlite_url(url: Any) -> Any:
    """A SQLAlchemy URL of a SQLite database file, made to open the file read-only."""
    path = urllib.parse.quote(str(url.database))
    return url.set(database=f"file:{path}").update_query_dict({"mode": "ro", "uri": "true"})


_SQLITE_READING = {
    sqlite3.SQLITE_SELECT,
    sqlite3.SQLITE_READ,
    sqlite3.SQLITE_FUNCTION,
    sqlite3.SQLITE_RECURSIVE,
}


def _sqlite_reading_only(action: int, *_: Any) -> int:
    """A SQLite authorizer: reading (and calling functions) is allowed, everything else denied."""
    return sqlite3.SQLITE_OK if action in _SQLITE_READING else sqlite3.SQLITE_DENY


def allow_sqlite_reading_only(connection: sqlite3.Connection) -> None:
    """From now on the SQLite connection compiles only statements that read."""
    connection.set_authorizer(_sqlite_reading_only)
