"""Reading the observability profile's files, and the stack's logs and metrics."""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from .conftest import ROOT, Stack

OBSERVABILITY = ROOT / "observability"
PROMETHEUS_CONFIG = OBSERVABILITY / "prometheus" / "prometheus.yml"
DASHBOARD = OBSERVABILITY / "grafana" / "dashboards" / "bazaar.json"
DATASOURCES = OBSERVABILITY / "grafana" / "provisioning" / "datasources" / "datasources.yml"

_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"')
_MATCHERS = re.compile(r"\{[^}]*\}")
_RANGES = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_WORD = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
_KEYWORDS = frozenset(
    {"and", "or", "unless", "bool", "offset", "inf", "nan", "group_left", "group_right"}
)


def metric_names(expression: str) -> set[str]:
    """The series names a PromQL expression reads: every bare identifier left
    once label matchers, ranges, grouping clauses and strings are gone, that is
    not a function or aggregation (followed by a parenthesis) or a keyword."""
    expression = _STRINGS.sub('""', expression)
    expression = _MATCHERS.sub("", expression)
    expression = _RANGES.sub("", expression)
    expression = _GROUPING.sub("", expression)
    names: set[str] = set()
    for match in _WORD.finditer(expression):
        word = match.group()
        if expression[match.end() :].lstrip().startswith("(") or word.lower() in _KEYWORDS:
            continue
        names.add(word)
    return names


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def dashboard_panels(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in board["panels"]:
        yield panel
        yield from panel.get("panels", [])


def dashboard_expressions(board: dict[str, Any]) -> list[str]:
    return [
        target["expr"]
        for panel in dashboard_panels(board)
        for target in panel.get("targets", [])
        if "expr" in target
    ]


def promtool() -> str:
    """promtool from PROMTOOL (`make tools` installs it), else from PATH."""
    found = os.environ.get("PROMTOOL") or shutil.which("promtool")
    if not found or not Path(found).exists():
        raise AssertionError("promtool is missing: `make tools` installs it into .tools/bin")
    return found


def scrape(stack: Stack, service: str) -> str:
    """`/metrics` of one replica of `service`, read from inside its container
    (only the gateway publishes a port)."""
    program = (
        "import sys, urllib.request; sys.stdout.write(urllib.request.urlopen("
        "'http://127.0.0.1:8000/metrics', timeout=5).read().decode())"
    )
    result = stack.compose_cmd("exec", "-T", service, "python", "-c", program)
    return result.stdout.decode()


def sample_names(exposition: str) -> set[str]:
    return {
        sample.name
        for family in text_string_to_metric_families(exposition)
        for sample in family.samples
    }


def log_lines(stack: Stack, *services: str) -> list[dict[str, Any]]:
    """Every JSON log line the services wrote so far."""
    output = stack.compose_cmd("logs", "--no-color", "--no-log-prefix", *services).stdout
    lines: list[dict[str, Any]] = []
    for raw in output.decode(errors="replace").splitlines():
        start = raw.find("{")  # after any terminal control sequence compose writes
        if start >= 0:
            try:
                lines.append(json.loads(raw[start:]))
            except ValueError:
                continue
    return lines
