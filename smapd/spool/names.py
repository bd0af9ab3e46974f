"""Every name the spool writes, formatted and parsed in one place (the on-disk format of DESIGN §1).

Names are ``str`` with surrogateescape (``os.fsdecode``), so any byte sequence round-trips; lengths
are counted in bytes against NAME_MAX (255).

- processing/: ``<orig>__<node>_<job>_a<attempt>_p<pid>[_t]``, e.g. ``talk.mp3__web1_3f2a9c1e4b7d_a1_p4242``.
  Parsed from the right: node names contain no ``_`` (``valid_node``), the rest is fixed format, so any
  ``<orig>`` parses back. The job id (12 hex) stays the same across attempts. When the whole would
  pass 255 bytes, ``<orig>`` is shortened (head and extension kept) and ``_t`` appended; the full
  name is then kept in the job's name sidecar (see layout).
- archive/ and failed/: ``<job>.<orig>``, shortened the same way to 243 bytes so that
  ``<name>.report.json`` fits. rename() overwrites and NFS has no RENAME_NOREPLACE, so uniqueness
  comes from the name itself: the job id makes a second ``talk.mp3`` a distinct file.
- inbox/ (a released claim whose name a new file took): ``<stem>.<job><ext>``.
- profiles (issue 11): every state dir and outbox/ may hold a ``<profile>/`` folder with the same
  names inside; the spool's callers name an inbox entry ``<profile>/<name>`` (``split_rel``).
- sidecars: ``<file>.smapd.json``/``.toml`` travel with ``<file>``: ``.smapd/jobs/<job>.sidecar<suffix>``
  while claimed, ``<final name><suffix>`` next to it in archive/ or failed/.
- outbox/: ``<stem><suffix>`` for each of OUTPUT_SUFFIXES; ``stem_base`` gives the first choice of
  stem, ``numbered_stem`` the next ones (``talk``, ``talk.2``, ``talk.3``, ...).
"""
from __future__ import annotations

import os
import re
import uuid
from dataclasses import dataclass
from pathlib import Path

NAME_MAX = 255
REPORT_SUFFIX = ".report.json"
OUTPUT_SUFFIXES = (".txt", ".srt", ".vtt", ".json", REPORT_SUFFIX)  # what a stem covers in outbox/
SIDECAR_SUFFIXES = (".smapd.json", ".smapd.toml")  # <file><suffix>: per-file options (issue 11)
TEMP_SUFFIXES = (".part", ".partial", ".tmp", ".crdownload", "~")
FINAL_MAX = NAME_MAX - len(REPORT_SUFFIX)  # archive/ and failed/ names leave room for the report's
STEM_MAX = 200  # bytes; leaves room for ".<n>" and the longest suffix
_CLAIM_RE = re.compile(rb"(?P<orig>.+)__(?P<node>[^_/]+)_(?P<job>[0-9a-f]{12})_a(?P<attempt>[0-9]+)"
                       rb"_p(?P<pid>[0-9]+)(?P<trunc>_t)?", re.DOTALL)
_FINAL_RE = re.compile(rb"(?P<job>[0-9a-f]{12})\.(?P<orig>.+)", re.DOTALL)
_NODE_RE = re.compile(r"[^\s/_\0]{1,64}")
_JOB_RE = re.compile(r"[0-9a-f]{12}")


@dataclass(frozen=True)
class ClaimName:
    """The parts of a processing/ name. ``original`` is the name as it appears there (shortened
    when ``truncated``: the full one is in the job's name sidecar)."""

    original: str
    node: str
    job_id: str
    attempt: int
    pid: int
    truncated: bool = False


def new_job_id() -> str:
    """A fresh job id: 12 hex digits, the same for every attempt of one dropped file."""
    return uuid.uuid4().hex[:12]


def is_job_id(text: str) -> bool:
    """Whether ``text`` has the form of a job id."""
    return _JOB_RE.fullmatch(text) is not None


def valid_node(node: str) -> bool:
    """Whether ``node`` can appear in a claim name: 1-64 characters, no ``/``, ``_`` or whitespace."""
    return _NODE_RE.fullmatch(node) is not None


def is_ignored(name: str) -> bool:
    """Names writers use while a file is incomplete (DESIGN §1 inv. 8): dot names (.nfs*, .syncthing.*
    included) and temp suffixes."""
    return name.startswith(".") or name.lower().endswith(TEMP_SUFFIXES)


def is_sidecar(name: str) -> bool:
    """Whether a name is a sidecar (``<file>.smapd.json`` or ``.toml``): options for ``<file>``, never audio."""
    return name.endswith(SIDECAR_SUFFIXES)


def sidecar_suffix(name: str) -> str:
    """The sidecar suffix ``name`` ends with ("" when none)."""
    return next((s for s in SIDECAR_SUFFIXES if name.endswith(s)), "")


def split_rel(rel: str) -> tuple[str | None, str]:
    """An inbox-relative name ``<profile>/<name>`` or ``<name>`` -> ``(profile or None, name)``."""
    head, sep, tail = rel.partition("/")
    return (head, tail) if sep else (None, rel)


def join_rel(profile: str | None, name: str) -> str:
    """Inverse of ``split_rel``."""
    return f"{profile}/{name}" if profile else name


def is_report(name: str) -> bool:
    """Whether a failed/ or outbox/ entry is a report rather than an input or output."""
    return name.endswith(REPORT_SUFFIX)


def display(name: str) -> str:
    """The name as readable text: undecodable bytes shown as U+FFFD."""
    return os.fsencode(name).decode("utf-8", "replace")


def fit(name: bytes, limit: int) -> bytes:
    """Shorten a name to ``limit`` bytes, keeping its head and a short extension, never splitting a
    UTF-8 sequence."""
    if len(name) <= limit:
        return name
    dot = name.rfind(b".")
    ext = name[dot:] if 0 < dot and len(name) - dot <= 16 else b""
    cut = limit - len(ext)
    for _ in range(3):  # a UTF-8 continuation byte: back off to the character's start
        if 0x80 <= name[cut] < 0xC0:
            cut -= 1
    return name[:cut] + ext


def format_claim(original: str, node: str, job_id: str, attempt: int, pid: int) -> ClaimName:
    """The processing/ name of one attempt; ``original`` shortened (``truncated``) to fit NAME_MAX."""
    raw = os.fsencode(original)
    short = fit(raw, NAME_MAX - len(_claim_tail(node, job_id, attempt, pid)) - 2)
    return ClaimName(os.fsdecode(short), node, job_id, attempt, pid, short != raw)


def claim_filename(c: ClaimName) -> str:
    """The file name a ``ClaimName`` stands for (inverse of ``parse_claim``)."""
    return os.fsdecode(os.fsencode(c.original) + _claim_tail(c.node, c.job_id, c.attempt, c.pid)
                       + (b"_t" if c.truncated else b""))


def parse_claim(name: str) -> ClaimName | None:
    """The parts of a processing/ name, or None when it is not a claim name."""
    m = _CLAIM_RE.fullmatch(os.fsencode(name))
    if m is None:
        return None
    return ClaimName(os.fsdecode(m["orig"]), m["node"].decode(), m["job"].decode(), int(m["attempt"]),
                     int(m["pid"]), bool(m["trunc"]))


def _claim_tail(node: str, job_id: str, attempt: int, pid: int) -> bytes:
    return f"__{node}_{job_id}_a{attempt}_p{pid}".encode()


def final_name(job_id: str, original: str) -> str:
    """The archive/ or failed/ name of a finished input: ``<job>.<orig>``, at most FINAL_MAX bytes."""
    return os.fsdecode(fit(os.fsencode(f"{job_id}.{original}"), FINAL_MAX))


def parse_final(name: str) -> tuple[str, str] | None:
    """``(job_id, original)`` of an archive/ or failed/ name (``original`` as it appears there,
    possibly shortened), or None when it does not have that form."""
    m = _FINAL_RE.fullmatch(os.fsencode(name))
    return (m["job"].decode(), os.fsdecode(m["orig"])) if m else None


def released_names(original: str, job_id: str) -> tuple[str, str]:
    """Where a released claim goes back in inbox/: its name, or ``<stem>.<job><ext>`` if that is taken."""
    p = Path(original)
    alt = f"{p.stem}.{job_id}{p.suffix}" if p.stem else f"{original}.{job_id}"
    return original, os.fsdecode(fit(os.fsencode(alt), NAME_MAX))


def stem_base(original: str) -> str:
    """The preferred outbox stem of an input: its stem, with control characters and undecodable
    bytes as ``_``, at most STEM_MAX bytes (``talk.mp3`` -> ``talk``)."""
    raw = Path(original).stem or original
    text = "".join("_" if ord(ch) < 32 or ord(ch) == 127 or 0xDC80 <= ord(ch) <= 0xDCFF else ch for ch in raw)
    return os.fsdecode(fit(text.encode("utf-8"), STEM_MAX)) or "_"


def numbered_stem(base: str, n: int) -> str:
    """The n-th choice of stem: ``base`` first, then ``base.2``, ``base.3``, ..."""
    return base if n == 1 else f"{base}.{n}"
