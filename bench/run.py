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
# seconds each part may take; the scale part holds 10,000 sockets for 5 minutes,
# the mix part may try some 30 levels of up to 10 s and 15 s of chat drain each
TIMEOUTS = {"scale": 2400, "mix": 1800}


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
    load_before = os.getloadavg()[0]
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
        # the machine is shared: how busy it was says how far to trust absolutes
        result["load_average"] = [round(load_before, 1), round(os.getloadavg()[0], 1)]
        return result


# The goals of the issue "Chat and the edge at real scale", in its order: which
# part measures each. Parts print their own verdicts as `[met]` / `[MISSED]`
# lines; goal 4's are read from the catalog's and auth's figures.
SCALE_GOALS = [
    ("1. 10,000 sockets through the gateway", "scale"),
    ("2. presence and publishing that scale (a room of 2,000)", "chat"),
    ("3. the edge uses every core and rides out storms", "gateway"),
    ("4. the slow read paths", "catalog auth"),
    ("5. capacity at a service level objective", "mix"),
]


# How a part measures, where its report alone would not say (under its heading).
METHODS = {
    "mix": (
        "Capacity is found with offered rates, not wrk's closed loop (which drives the machine"
        " to saturation at any number of connections and measures only the scheduler):"
        " bench/mix.lua paces wrk's connections through its delay() hook to a fixed rate, the"
        " rate grows by half a level until a level misses the objective, then is bisected;"
        " a level that misses is run again at once and missed only if it misses twice"
        " (both tries are in the table, the second marked `(again)`)."
        " A level is within it when the achieved rate keeps up (>= 95%), p99 <= 100 ms with"
        " fewer than 1% of requests started 100 ms behind their slot, no HTTP error, and in"
        " chat no message lost (not at every member 15 s after sending: late is not lost),"
        " no socket closed and a delivery p99 <= 100 ms. The paths take their levels in"
        " turns; `load` is the 1-minute load average after each level. The `nginx` path is a"
        " reference, not part of the goal: nginx in the gateway's place (bench/nginx), the"
        " same routes on the same network and cores, so the gap between it and the gateway"
        " is the gateway's own and the gap between it and `direct` is the extra hop's."
    ),
}


def verdicts(part: dict[str, Any]) -> list[str]:
    """The part's own `[met]` / `[MISSED]` lines, or goal 4's from the figures."""
    lines = [
        line
        for line in part.get("report", "").splitlines()
        if line.startswith(("[met]", "[MISSED]"))
    ]
    figures = part.get("figures") or {}
    if part["part"] == "catalog" and "list_page_20" in figures.get("ratios", {}):
        ratio = figures["ratios"]["list_page_20"]
        met = ratio["rps"] >= 0.35 and ratio["p99"] <= 3
        lines.append(
            f"[{'met' if met else 'MISSED'}] catalog list of 20 >= 0.35x /healthz rps with "
            f"p99 <= 3x /healthz p99: {ratio['rps']:.2f}x rps, p99 {ratio['p99']:.2f}x"
        )
    if part["part"] == "auth" and "me_vs_healthz" in figures.get("ratios", {}):
        ratio = figures["ratios"]["me_vs_healthz"]
        lines.append(
            f"[{'met' if ratio >= 0.5 else 'MISSED'}] /auth/users/me >= 0.5x /healthz rps: "
            f"{ratio:.2f}x"
        )
    return lines


def goals_summary(report: dict[str, Any]) -> list[str]:
    by_name = {part["part"]: part for part in report["parts"]}
    lines = ['## Goals of "Chat and the edge at real scale"', ""]
    for goal, names in SCALE_GOALS:
        lines.append(f"{goal}:")
        for name in names.split():
            part = by_name.get(name)
            if part is None:
                lines.append(f"- {name}: not run")
                continue
            when = part.get("date", report["date"])
            found = verdicts(part) or [f"(no verdict: {part['status']})"]
            lines += [f"- {name} ({when}): {line}" for line in found]
        lines.append("")
    lines += [
        (
            "6. `make bench` installs wrk and nginx when missing (and says so); every part "
            "below stands beside its previous run."
        ),
        "",
    ]
    return lines + tracing_summary(by_name.get("catalog"), report["date"])


def tracing_summary(catalog: dict[str, Any] | None, date: str) -> list[str]:
    """The observability issue's measured goal: what tracing costs get-by-id."""
    lines = ['## Goals of "Observability"', ""]
    if not catalog or not (tracing := (catalog.get("figures") or {}).get("tracing")):
        return [*lines, "- catalog: tracing cost not run", ""]
    when = catalog.get("date", date)
    for variant, cost in tracing.get("cost_from_cpu", {}).items():
        measured = tracing.get("cost", {}).get(variant)
        verdict = "met" if cost <= tracing["goal"] else "MISSED"
        lines.append(
            f"- catalog ({when}): [{verdict}] tracing {variant} costs <= {tracing['goal']:.0%} "
            f"of get-by-id rps: {cost:.1%} by CPU per request"
            + (f", {measured:.1%} by measured rps" if measured is not None else "")
        )
    return [*lines, ""]


def without_logs(report: str) -> str:
    """A part's report without the log lines of the apps it ran in process
    (kit's JSON lines on the same stdout): they are not figures."""
    return "\n".join(line for line in report.splitlines() if not line.startswith('{"ts": '))


def markdown(report: dict[str, Any]) -> str:
    """The goals' verdicts, then each part's report of this run, and beside it
    the previous run's."""
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
        *goals_summary(report),
    ]
    for part in report["parts"]:
        lines += [f"## {part['part']}", ""]
        if part["part"] in METHODS:
            lines += [METHODS[part["part"]], ""]
        ran = part.get("date", report["date"])
        carried = " (not run this time: the last run's)" if ran != report["date"] else ""
        load = part.get("load_average")
        busy = f" (1-minute load average {load[0]} before, {load[1]} after)" if load else ""
        lines += [f"This run, {ran}{carried}: {part['status']}{busy}", ""]
        if part.get("report"):
            lines += ["```", without_logs(part["report"]), "```", ""]
        previous = part.get("previous")
        if previous:
            lines += [f"Previous run, {previous.get('date', '?')}: {previous['status']}", ""]
            if previous.get("report"):
                lines += ["```", without_logs(previous["report"]), "```", ""]
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
    parser.add_argument(
        "--render", action="store_true", help="only write results.md again from results.json"
    )
    args = parser.parse_args()
    if args.render:
        saved = json.loads((HERE / "results.json").read_text())
        (HERE / "results.md").write_text(markdown(saved))
        return
    date = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    parts = [run_part(part) for part in args.parts]
    report = {"date": date, "machine": machine(), "parts": with_history(parts, date)}
    (HERE / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    (HERE / "results.md").write_text(markdown(report))
    print(f"\nwrote {HERE / 'results.md'} and {HERE / 'results.json'}")


if __name__ == "__main__":
    main()
