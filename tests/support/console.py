"""What a clipline command may print on stderr: its own log records only (issue 20's console), checked line by line."""

from __future__ import annotations

import re

from pipeline.core.logs import OWN_LOGGERS

# pipeline.core.logs.FORMAT and WORKER_FORMAT: "time LEVEL name: message", workers add "[process]" before the name.
RECORD = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ (?:\[[^\]]+\] )?([^\s:]+): ")


def foreign_lines(stderr: str) -> list[str]:
    """Every non-empty stderr line that is not a log record of clipline's own loggers: other libraries' records,
    prints, progress bars, Python warnings. A successful run on good data has none (a library's WARNING still
    passes the console filter, so a run that provokes one is reported here too, on purpose)."""
    out = []
    for line in stderr.splitlines():
        m = RECORD.match(line)
        if line.strip() and (m is None or m.group(1).split(".", 1)[0] not in OWN_LOGGERS):
            out.append(line)
    return out
