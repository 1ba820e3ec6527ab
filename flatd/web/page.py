"""/ : the read-only status page, what `flatd status` shows, as HTML from Jinja2 templates.

The figures come from the ledger (a read-only connection per request, as `flatd status`
reads it) and, for the flats left out, from the service's event stream (flatd.web.metrics).
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional
from urllib.parse import quote

from flatd.ledger import FAILED, MOVES_PENDING, Ledger
from flatd.log import printable
from flatd.status import _ago, _duration, _when

MASTERS_SHOWN = 12
# Where a master's quality verdict may be in the ledger (masters or jobs table); the
# first column present with a value wins. Adapt when the column is settled.
VERDICT_KEYS = ("qc_status", "verdict", "quality_verdict", "qc_verdict", "quality")
REASONS_KEYS = ("qc_reasons", "quality_reasons")
VERDICT_CLASSES = {"good": "good", "ok": "good", "pass": "good", "passed": "good", "warn": "warn",
                   "warning": "warn", "suspect": "warn", "bad": "bad", "fail": "bad", "failed": "bad"}


@lru_cache(maxsize=1)
def environment():
    """The Jinja2 environment: templates of this package, HTML escaped, undefined names refused."""
    from jinja2 import Environment, PackageLoader, StrictUndefined

    return Environment(loader=PackageLoader("flatd.web", "templates"), autoescape=True,
                       undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)


def render(context: dict) -> str:
    return environment().get_template("status.html").render(**context)


# ---------------------------------------------------------------------- ledger look-ups


def open_ledger(state: Path) -> Optional[Ledger]:
    """A read-only connection to the ledger (None: no ledger yet); the caller closes it."""
    return Ledger.open_readonly(Path(state))


def preview_path(master: Path) -> Path:
    """The PNG preview beside a master (flatd.qc.previews names it)."""
    try:
        from flatd.qc.previews import preview_paths
    except ImportError:  # pragma: no cover - the previews module is optional here
        name = Path(master).name
        for suffix in (".fits.fz", ".fits", ".fit", ".fts", ".xisf"):
            if name.lower().endswith(suffix):
                return Path(master).with_name(name[: -len(suffix)] + ".preview.png")
        return Path(master).with_name(name + ".preview.png")
    return preview_paths(Path(master))[0]


def master_of(ledger: Ledger, job_id: str) -> Optional[Path]:
    """The master recorded for a job, or None."""
    row = ledger.db.execute("SELECT path FROM masters WHERE job_id=? ORDER BY created_at DESC LIMIT 1",
                            (job_id,)).fetchone()
    return Path(row["path"]) if row is not None else None


def quality_verdict(*rows: Any, names: tuple = VERDICT_KEYS) -> Optional[str]:
    """The quality verdict of a master from its ledger rows (sqlite3.Row, dict or object),
    looked for under `names`; a JSON object's "verdict" or "status" counts too."""
    for row in rows:
        if row is None:
            continue
        keys = row.keys() if hasattr(row, "keys") else [k for k in names if hasattr(row, k)]
        for key in names:
            if key not in keys:
                continue
            value = row[key] if hasattr(row, "keys") else getattr(row, key)
            if isinstance(value, str) and value.strip().startswith("{"):
                try:
                    data = json.loads(value)
                    value = data.get("verdict") or data.get("status")
                except (ValueError, AttributeError):
                    pass
            if value not in (None, ""):
                return printable(value)
    return None


# ---------------------------------------------------------------------- the sections


def _waiting(ledger: Ledger, rules, now: float, failed_jobs) -> list[dict]:
    """Flats waiting per capture folder and the time left to settle (as `flatd status`)."""
    waiting: dict[str, list] = {}
    for row in ledger.waiting_frames():
        waiting.setdefault(row["folder"] or "?", []).append(row)
    folders = {row["path"]: row for row in ledger.folders()}
    captures = [str(c.path) for c in rules.capture] if rules is not None else []
    failed_inputs = {row.path for job in failed_jobs for row in ledger.inputs(job.id)}
    out = []
    for name in dict.fromkeys(captures + sorted(waiting)):
        rows = waiting.get(name, [])
        item = {"folder": printable(name), "count": len(rows), "in_failed": 0, "last": "", "settle": ""}
        if rows:
            item.update(_settle(rows, folders.get(name), rules.settle if rules is not None else None, now))
            item["in_failed"] = sum(1 for r in rows if r["path"] in failed_inputs)
        out.append(item)
    return out


def _settle(rows, info, settle: Optional[float], now: float) -> dict:
    last_ready = max((r["ready_at"] or r["seen_at"]) for r in rows)
    if info is not None and info["last_ready"]:
        last_ready = max(last_ready, info["last_ready"])
    processed = info["processed_at"] if info is not None else None
    if processed is not None and processed >= last_ready:
        text = "left after the last batch; considered again when more flats arrive"
    elif settle is not None and last_ready + settle - now > 0:
        text = f"settles in {_duration(last_ready + settle - now)}"
    else:
        text = "settled, processing due"
    return {"last": _ago(now - last_ready), "settle": text}


def _masters(ledger: Ledger, link) -> list[dict]:
    """The last masters made, each with its job's row (where a verdict may be kept)."""
    rows = ledger.recent_masters(MASTERS_SHOWN)
    ids = [row["job_id"] for row in rows]
    jobs = {}
    if ids:
        jobs = {r["id"]: r for r in ledger.db.execute(
            f"SELECT * FROM jobs WHERE id IN ({','.join('?' * len(ids))})", ids)}
    return [_master_item(row, jobs.get(row["job_id"]), link) for row in rows]


def _master_item(row, job, link) -> dict:
    master = Path(row["path"])
    verdict = quality_verdict(row, job)
    has_preview = preview_path(master).is_file()
    return {"when": _when(row["created_at"]), "name": printable(master.name), "folder": printable(master.parent),
            "label": printable(row["label"]), "ncombine": row["ncombine"], "job": printable(row["job_id"]),
            "preview": link(f"/preview/{quote(row['job_id'])}") if has_preview else None,
            "verdict": verdict, "reasons": quality_verdict(row, job, names=REASONS_KEYS) if verdict else None,
            "verdict_class": VERDICT_CLASSES.get((verdict or "").lower(), "other")}


def _failed(ledger: Ledger, failed_jobs) -> tuple[list[dict], list[dict]]:
    """Failed groups (kept jobs, then what the last batches noted) and the files left out by them."""
    failed = [{"when": _when(j.updated_at), "label": printable(j.label), "folder": printable(j.folder or "?"),
               "reason": printable(j.reason or "no reason recorded"), "job": printable(j.id), "files": None}
              for j in failed_jobs]
    left = []
    for info in ledger.folders():
        try:
            notes = json.loads(info["notes"] or "{}")
        except ValueError:
            continue
        when = _when(info["processed_at"]) if info["processed_at"] else "?"
        for item in notes.get("failed", []):
            if not item.get("job"):
                failed.append({"when": when, "label": printable(item.get("label", "?")), "job": None,
                               "folder": printable(info["path"]), "reason": printable(item.get("reason", "")),
                               "files": item.get("files") or None})
        for item in notes.get("left_out", []):
            left.append({"when": when, "folder": printable(info["path"]), "files": item.get("files", 0),
                         "reason": printable(item.get("reason", ""))})
    return failed, left


def _pending_moves(ledger: Ledger) -> list[dict]:
    try:
        jobs = ledger.jobs([MOVES_PENDING])
        pending = ledger.pending_moves()
    except sqlite3.OperationalError:
        return []
    return [{"when": _when(j.updated_at), "label": printable(j.label), "master": printable(j.master or "?"),
             "count": sum(1 for row in pending if row.job_id == j.id), "reason": printable(j.reason or "")}
            for j in jobs]


def _recent_left_out(metrics) -> list[dict]:
    if metrics is None:
        return []
    return [{"when": _when(when), "name": printable(path.name), "folder": printable(path.parent),
             "reason": printable(reason), "kind": kind} for when, path, reason, kind in metrics.left_out_list()]


# ---------------------------------------------------------------------- the page


def context(rules, metrics, link, refresh: float, problems: list[str]) -> dict:
    """Everything the template shows; `link(path)` makes a URL (with ?token= when the
    request came with one)."""
    now = time.time()
    base = {"refresh": int(round(refresh)), "now": _when(now), "pid": os.getpid(), "problems": problems,
            "state": printable(rules.state), "ledger": False, "error": None, "waiting": [], "masters": [],
            "failed": [], "left_batch": [], "pending": [], "left_recent": _recent_left_out(metrics),
            "metrics_url": link("/metrics"), "health_url": link("/healthz")}
    ledger = open_ledger(rules.state)
    if ledger is None:
        return base
    try:
        failed_jobs = ledger.jobs([FAILED])
        failed, left = _failed(ledger, failed_jobs)
        base.update(ledger=True, waiting=_waiting(ledger, rules, now, failed_jobs), masters=_masters(ledger, link),
                    failed=failed, left_batch=left, pending=_pending_moves(ledger))
    except sqlite3.Error as exc:  # the very first start is still creating the tables
        base["error"] = f"the ledger cannot be read yet ({printable(exc)}); the page reloads itself"
    finally:
        ledger.close()
    return base
