"""What "logs a person can read" means, as a check on a run's console output (tests/test_flow.py on
the toy stages, tests/test_logs.py on the real tiny pipeline): no traceback, no line repeated over and
over, and not more lines than a person reads."""

from __future__ import annotations

import re
from collections import Counter

# Prefect's console prefix: "15:10:01.008 | INFO    | Task run 'tokenizer' - "
_TIMESTAMP = re.compile(r"^\d\d:\d\d:\d\d\.\d+ \| ")


def problems(output: str, max_lines: int, max_repeats: int = 3) -> list[str]:
    lines = [line for line in output.splitlines() if line.strip()]
    found = []
    if any("Traceback (most recent call last)" in line for line in lines):
        first = next(i for i, line in enumerate(lines) if "Traceback" in line)
        found.append("a traceback:\n" + "\n".join(lines[max(0, first - 2):first + 12]))
    repeated = [(line, n) for line, n in Counter(_TIMESTAMP.sub("", line) for line in lines).items() if n > max_repeats]
    if repeated:
        found.append(f"lines repeated more than {max_repeats} times: {repeated[:5]}")
    if len(lines) > max_lines:
        found.append(f"{len(lines)} lines, more than {max_lines}")
    return found
