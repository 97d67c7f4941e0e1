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
PARTS = ["gateway", "catalog", "chat", "auth"]


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
        completed = subprocess.run(
            [sys.executable, str(script), "--json", str(output)],
            capture_output=True,
            text=True,
            check=False,
            timeout=600,
        )
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
    lines = [
        "# Benchmark results",
        "",
        (
            f"Run on {report['date']} on {report['machine']['cores']} cores "
            f"({report['machine']['cpu']}), Python {report['machine']['python']}."
        ),
        "Every figure is measured side by side within one run; compare ratios, not absolutes.",
        "",
    ]
    for part in report["parts"]:
        lines += [f"## {part['part']}", "", f"Status: {part['status']}", ""]
        if part.get("report"):
            lines += ["```", part["report"], "```", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("parts", nargs="*", default=PARTS, help="which benchmarks to run")
    args = parser.parse_args()
    report = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "parts": [run_part(part) for part in args.parts],
    }
    (HERE / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    (HERE / "results.md").write_text(markdown(report))
    print(f"\nwrote {HERE / 'results.md'} and {HERE / 'results.json'}")


if __name__ == "__main__":
    main()
