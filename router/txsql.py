"""What transaction mode reads of the SQL a client sends: what needs a session of its own
(refused with 0A000 before it runs), what deallocates prepared statements, and the name a
statement gets on every backend.

The text is read with comments, string literals, quoted identifiers and dollar-quoted
bodies set aside, so ``select 'set x = 1'`` passes; a session advisory lock is looked for
in the whole text (a DO block's body included). What cannot be seen in the text
(``set_config(..., false)``, state changed inside functions) is the README's list.
"""

from __future__ import annotations

import hashlib
import re

from . import protocol as pg


def statement_name(parse_rest: bytes) -> bytes:
    """The backend's name for a statement: the same text and parameter types get the same
    name on every backend and for every client."""
    return b"jm_" + hashlib.blake2b(parse_rest, digest_size=10).hexdigest().encode()


# --- what transaction mode cannot carry -----------------------------------------------------

# Comments, string literals, quoted identifiers and dollar-quoted bodies say nothing.
_NOISE = re.compile(r"--[^\n]*|/\*.*?\*/|'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"|"
                    r"\$((?:[A-Za-z_]\w*)?)\$.*?\$\1\$", re.S)
_COMMENTS = re.compile(r"--[^\n]*|/\*.*?\*/", re.S)
_SESSION_LOCK = re.compile(r"\bpg_(?:try_)?advisory_lock(?:_shared)?\s*\(", re.I)
_WITH_HOLD = re.compile(r"\bwith\s+hold\b", re.I)
_TEMP_TABLE = re.compile(r"^create\s+(?:(?:global|local)\s+)?(?:temp|temporary)\s+"
                         r"(?:table|view|sequence)\b", re.I)
_ON_COMMIT_DROP = re.compile(r"\bon\s+commit\s+drop\b", re.I)
_TX_SCOPED_SET = {"local", "transaction", "constraints"}


class Unsupported(Exception):
    def __init__(self, what: str, hint: str) -> None:
        super().__init__(what)
        self.what, self.hint = what, hint


FORGET_ALL = "all"  # what check_sql says of DEALLOCATE ALL and DISCARD ALL
_DEALLOCATE_ONE = re.compile(r"\s*deallocate\s+(?:prepare\s+)?(\"?)([^\s;\"]+)\1\s*;?\s*",
                             re.I)


def check_sql(sql: str) -> str | bytes | None:
    """Raise Unsupported for SQL that needs a session of its own. Else: FORGET_ALL when it
    deallocates every prepared statement of the session (``DEALLOCATE ALL``, ``DISCARD
    ALL``), the name a lone ``DEALLOCATE name`` names (bytes), or None."""
    low = sql.lower()  # a cheap first look (substring tests): most queries stop here
    if not ("set" in low or "listen" in low or "advisory" in low or "hold" in low
            or "prepare" in low or "temp" in low or "discard" in low or "deallocate" in low):
        return None
    # A session lock taken anywhere, a DO block's or a function call's text included.
    if _SESSION_LOCK.search(_COMMENTS.sub(" ", sql)):
        raise Unsupported("a session-level advisory lock",
                          "Use pg_advisory_xact_lock, which ends with the transaction.")
    verdict: str | bytes | None = None
    statements = [st for st in _NOISE.sub(" ", sql).split(";") if st.strip()]
    for statement in statements:
        words = statement.split(None, 2)
        first = words[0].lower()
        second = words[1].lower() if len(words) > 1 else ""
        if first == "set" and second not in _TX_SCOPED_SET:
            raise Unsupported("SET outside a transaction's scope",
                              "Use SET LOCAL inside a transaction, or put the setting in the "
                              "connection's options (they are kept per pooled connection).")
        if first in ("listen", "prepare"):
            raise Unsupported(first.upper(), "LISTEN and SQL-level PREPARE need a session; "
                              "use protocol-level prepared statements, or session pooling.")
        if first == "declare" and _WITH_HOLD.search(statement):
            raise Unsupported("a WITH HOLD cursor", "Use a cursor inside the transaction.")
        if _TEMP_TABLE.match(statement.strip()) and not _ON_COMMIT_DROP.search(statement):
            raise Unsupported("a temporary table that outlives its transaction",
                              "Create it with ON COMMIT DROP, or use session pooling.")
        rest = " ".join(words[1:]).lower().split()
        if (first == "discard" and rest[:1] == ["all"]) or (
                first == "deallocate" and rest[-1:] == ["all"]):
            verdict = FORGET_ALL
    if verdict is None and len(statements) == 1:
        one = _DEALLOCATE_ONE.fullmatch(sql)
        if one is not None and one.group(2).lower() != "all":
            name = one.group(2) if one.group(1) else one.group(2).lower()
            return name.encode()
    return verdict


def unsupported_error(job_id: str, exc: Unsupported) -> bytes:
    return pg.error_response(
        "0A000", f"{exc.what} is not supported: job_{job_id} uses transaction pooling",
        exc.hint, severity="ERROR")


def raise_in_backend(job_id: str, exc: Unsupported) -> str:
    """A query that makes the backend itself raise the refusal (so a transaction block is
    aborted exactly as the refused statement's own error would abort it)."""
    def lit(text: str) -> str:
        return "'" + text.replace("'", "''") + "'"
    message = f"{exc.what} is not supported: job_{job_id} uses transaction pooling"
    return (f"DO $jm$BEGIN RAISE EXCEPTION USING ERRCODE = '0A000', MESSAGE = {lit(message)}, "
            f"HINT = {lit(exc.hint)}; END$jm$")
