"""Runs every benchmark of the project one after another on this machine and
gathers them into one report: bench/results.md and bench/results.json.

Each `bench/<part>_bench.py` measures side by side within its own run and
prints ratios; this script adds the date and the machine and keeps the lot.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
PARTS = ["gateway", "catalog", "chat", "auth", "mix", "scale"]
# seconds each part may take; the scale part holds 10,000 sockets for 5 minutes
TIMEOUTS = {"scale": 2400, "mix": 1200}


def machine() -> dict[str, Any]:
    cpu = "unknown"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cores": os.cpu_count(),
        "cpu": cpu,
        "python": platform.python_version(),
        "kernel": platform.release(),
    }


def run_part(part: str) -> dict[str, Any]:
    script = HERE / f"{part}_bench.py"
    if not script.exists():
        return {"part": part, "status": "missing"}
    with tempfile.TemporaryDirectory() as scratch:
        output = Path(scratch) / "result.json"
        try:
            completed = subprocess.run(
                [sys.executable, str(script), "--json", str(output)],
                capture_output=True,
                text=True,
                check=False,
                timeout=TIMEOUTS.get(part, 600),
            )
        except subprocess.TimeoutExpired as expired:
            out = expired.stdout or b""
            text = out.decode(errors="replace") if isinstance(out, bytes) else out
            return {"part": part, "status": "timed out", "report": text.strip()}
        sys.stdout.write(completed.stdout)
        result: dict[str, Any] = {
            "part": part,
            "status": "ok" if completed.returncode == 0 else f"failed ({completed.returncode})",
            "report": completed.stdout.strip(),
        }
        if completed.returncode != 0:
            result["stderr"] = completed.stderr[-2000:]
        if output.exists():
            result["figures"] = json.loads(output.read_text())
        return result


def markdown(report: dict[str, Any]) -> str:
    """Each part's report of this run, and beside it the previous run's."""
    lines = [
        "# Benchmark results",
        "",
        (
            f"Run on {report['date']} on {report['machine']['cores']} cores "
            f"({report['machine']['cpu']}), Python {report['machine']['python']}."
        ),
        "Every figure is measured side by side within one run; compare ratios, not absolutes.",
        "Under each part, the previous run's report follows this one's.",
        "",
    ]
    for part in report["parts"]:
        lines += [f"## {part['part']}", ""]
        ran = part.get("date", report["date"])
        carried = " (not run this time: the last run's)" if ran != report["date"] else ""
        lines += [f"This run, {ran}{carried}: {part['status']}", ""]
        if part.get("report"):
            lines += ["```", part["report"], "```", ""]
        previous = part.get("previous")
        if previous:
            lines += [f"Previous run, {previous.get('date', '?')}: {previous['status']}", ""]
            if previous.get("report"):
                lines += ["```", previous["report"], "```", ""]
    return "\n".join(lines)


def with_history(parts: list[dict[str, Any]], date: str) -> list[dict[str, Any]]:
    """Each part with the previous run's result of it; parts not run now keep theirs."""
    old_path = HERE / "results.json"
    old: dict[str, Any] = json.loads(old_path.read_text()) if old_path.exists() else {}
    before = {part["part"]: part for part in old.get("parts", [])}
    for part in before.values():
        part.setdefault("date", old.get("date", "?"))
        part.pop("previous", None)
    ran = {part["part"] for part in parts}
    merged = []
    for part in parts:
        part["date"] = date
        if part["part"] in before:
            part["previous"] = before[part["part"]]
        merged.append(part)
    for name in PARTS:
        if name not in ran and name in before:
            kept = dict(before[name])
            merged.append(kept)
    return merged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("parts", nargs="*", default=PARTS, help="which benchmarks to run")
    args = parser.parse_args()
    date = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    parts = [run_part(part) for part in args.parts]
    report = {"date": date, "machine": machine(), "parts": with_history(parts, date)}
    (HERE / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    (HERE / "results.md").write_text(markdown(report))
    print(f"\nwrote {HERE / 'results.md'} and {HERE / 'results.json'}")


if __name__ == "__main__":
    main()
