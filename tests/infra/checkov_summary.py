"""Print checkov's JSON report (one or many scans) as a short, de-duplicated summary.

    checkov ... -o json > report.json; python tests/infra/checkov_summary.py report.json

Exit status 1 when any check failed or a file could not be parsed, else 0.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(path: str) -> int:
    text = Path(path).read_text(encoding="utf-8").strip()
    if not text:
        print("checkov produced no report")
        return 1
    # With several folders checkov prints several JSON documents one after the other.
    reports: list[dict] = []
    decoder, pos = json.JSONDecoder(), 0
    while pos < len(text):
        data, end = decoder.raw_decode(text, pos)
        reports.extend(data if isinstance(data, list) else [data])
        pos = end
        while pos < len(text) and text[pos].isspace():
            pos += 1
    seen: dict[str, dict] = {}
    failures: set[tuple] = set()
    for r in reports:
        kind = r.get("check_type", "?")
        summary = r.get("summary", {})
        seen.setdefault(kind, summary)
        for f in r.get("results", {}).get("failed_checks", []):
            lines = f.get("file_line_range") or [0, 0]
            failures.add((kind, f["check_id"], f.get("check_name", ""), f.get("file_path", "?"), lines[0], f.get("resource", "")))
    bad = 0
    for kind, s in sorted(seen.items()):
        print(f"checkov {kind:<11} resources {s.get('resource_count', 0):>3}  passed {s.get('passed', 0):>4}  "
              f"failed {s.get('failed', 0):>3}  skipped (inline, justified) {s.get('skipped', 0):>3}  "
              f"parsing errors {s.get('parsing_errors', 0)}")
        bad += int(s.get("parsing_errors", 0) or 0)
    for kind, cid, name, fpath, line, resource in sorted(failures):
        print(f"FAIL {cid} {fpath}:{line} {resource}: {name}")
    return 1 if failures or bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
