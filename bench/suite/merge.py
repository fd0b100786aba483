"""Parts joined into one suite: `python -m bench.suite --merge DIR...` (and after every part, the suite
folder it was written into). Each part folder keeps its own suite.json, SUMMARY.md, logs and runs; the
merge writes the suite folder's suite.json and SUMMARY.md over all of them, its paths relative to that
folder, so the folder travels and `bench.compare` reads it like a single run's."""
from __future__ import annotations

import copy
import json
import os
from datetime import datetime, timezone
from pathlib import Path

from bench.files import atomic_write
from bench.suite.figures import COMPILE_ESTIMATE, check_targets, compute_figures, step_figures
from bench.suite.steps import PARTS
from bench.suite.summary import render_summary

PATH_KEYS = ("results", "json")   # a step's figures that name a file of its run


class MergeError(Exception):
    """Folders that are not parts of one suite: one line, exit 2."""


def read_part(folder: Path) -> dict:
    try:
        doc = json.loads((folder / "suite.json").read_text())
    except (OSError, ValueError) as e:
        raise MergeError(f"{folder}: no readable suite.json ({type(e).__name__}: {e})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("part"), int) or not isinstance(doc.get("steps"), list):
        raise MergeError(f"{folder}: not the folder of one part of bench.suite (its suite.json names no part)")
    return doc


def part_folders(dirs: list[Path]) -> list[Path]:
    """Each DIR is a part's folder, or a suite folder holding part-N folders."""
    found = []
    for d in dirs:
        inside = sorted(p.parent for p in d.glob("part-*/suite.json"))
        if inside:
            found += inside
        elif (d / "suite.json").is_file():
            found.append(d)
        else:
            raise MergeError(f"{d}: neither a part's folder nor a folder of part-N folders")
    return found


def rebase(record: dict, prefix: str) -> dict:
    """A part's step record with its paths relative to the merged folder instead of the part's."""
    record = copy.deepcopy(record)  # the part's own document stays as it was
    if record.get("log"):
        record["log"] = f"{prefix}/{record['log']}"
    figures = record.get("figures") or {}
    for key in PATH_KEYS:
        if isinstance(figures.get(key), str):
            figures[key] = f"{prefix}/{figures[key]}"
    for row in (figures.get("rows") or {}).values():
        trace = row.get("trace") if isinstance(row, dict) else None
        if isinstance(trace, dict) and isinstance(trace.get("file"), str) and not os.path.isabs(trace["file"]):
            trace["file"] = f"{prefix}/{trace['file']}"
    return {**record, "part_folder": prefix}


def merged_document(folders: list[Path], out: Path) -> dict:
    docs = [(folder, read_part(folder)) for folder in folders]
    modes = {doc["mode"] for _, doc in docs}
    if len(modes) > 1:
        raise MergeError(f"parts of a GPU run and of a rehearsal cannot be merged ({', '.join(map(str, folders))})")
    records, parts = {}, []
    # A part run twice (a rerun after a failure): the later run's steps win.
    for folder, doc in sorted(docs, key=lambda fd: (fd[1]["part"], fd[1].get("started_utc") or "")):
        prefix = os.path.relpath(folder.resolve(), out.resolve())
        for record in doc["steps"]:
            if record.get("status") not in ("skipped", "pending") or record["name"] not in records:
                records[record["name"]] = rebase(record, prefix)
        parts.append({"part": doc["part"], "folder": prefix, "started_utc": doc.get("started_utc"),
                      "elapsed_s": doc.get("elapsed_s") or 0.0, "argv": doc.get("argv"),
                      "archive_cut": doc.get("archive_cut") or []})
    first = docs[0][1]
    figures = compute_figures(records)
    ran = {p["part"] for p in parts}
    return {"suite_version": 2, "mode": first["mode"], "part": None, "parts": parts,
            "parts_missing": [p.number for p in PARTS if p.number not in ran],
            "out": str(out), "started_utc": min(p["started_utc"] or "" for p in parts),
            "updated_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "elapsed_s": round(sum(p["elapsed_s"] for p in parts), 1), "budget_s": None,
            "settings": {**first["settings"], "step_names": list(records)},
            "environment": step_figures(records, "environment"), "figures": figures,
            "targets": check_targets(figures), "compile_estimate": COMPILE_ESTIMATE,
            "steps": list(records.values())}


def merge_parts(dirs: list[Path], out: Path) -> Path:
    """suite.json and SUMMARY.md in `out` over every part found in `dirs`; returns the SUMMARY.md."""
    doc = merged_document(part_folders([Path(d) for d in dirs]), Path(out))
    atomic_write(Path(out) / "suite.json", json.dumps(doc, indent=2) + "\n")
    atomic_write(Path(out) / "SUMMARY.md", render_summary(doc))
    return Path(out) / "SUMMARY.md"
