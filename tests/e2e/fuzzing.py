"""Generated requests for some operations of the gateway's merged OpenAPI
document, run as a process of its own so several run side by side (most of
a run is spent waiting for answers; Hypothesis is not safe to share between
threads). `test_hostile.py` starts these and reads the JSON they print:

    python tests/e2e/fuzzing.py '{"base_url": ..., "headers": ..., "labels": [...],
                                  "seed": ..., "examples": ..., "deadline": ...}'
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import requests
import schemathesis
from hypothesis import HealthCheck, given, seed, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error
from schemathesis.core.result import Ok
from schemathesis.generation.modes import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
)

CHECKS = [not_a_server_error, response_schema_conformance, content_type_conformance]
NO_INPUT = 0  # negative examples of an operation that takes no input at all


def run_operation(
    operation: Any, mode: GenerationMode, *, job: dict[str, Any], session: requests.Session
) -> int:
    """Generated requests for one operation in one mode; returns how many ran."""
    ran = 0

    @seed(job["seed"])
    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=job["examples"],
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def probe(case: Any) -> None:
        nonlocal ran
        assert time.time() < job["deadline"], "over the run's time budget"
        ran += 1
        case.call_and_validate(
            base_url=job["base_url"], session=session, headers=job["headers"], checks=CHECKS
        )

    probe()
    return ran


def run(job: dict[str, Any]) -> dict[str, Any]:
    schema = schemathesis.openapi.from_url(f"{job['base_url']}/openapi.json")
    # every string may carry a NUL byte (the default, stated here as a requirement)
    schema.config.generation.update(allow_x00=True)
    operations = []
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), result
        if result.ok().label in job["labels"]:
            operations.append(result.ok())
    examples: dict[str, int] = {}
    failures: dict[str, str] = {}
    session = requests.Session()
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            key = f"{operation.label} ({mode.value})"
            try:
                examples[key] = run_operation(operation, mode, job=job, session=session)
            except Unsatisfiable:
                # no input to vary (one request is the whole space): none can be invalid
                if examples.get(f"{operation.label} (positive)") == 1:
                    examples[key] = NO_INPUT
                else:
                    failures[key] = "no invalid input could be generated"
            except (Exception, BaseExceptionGroup) as error:  # noqa: BLE001 - all are reported
                failures[key] = str(error)[:3000]
    session.close()
    return {"examples": examples, "failures": failures}


if __name__ == "__main__":
    print(json.dumps(run(json.loads(sys.argv[1]))))  # noqa: T201 - read by the parent
