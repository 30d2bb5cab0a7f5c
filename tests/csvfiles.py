"""Writing CSV files for tests (one helper, shared by the test modules)."""

import csv


def write_csv(path, header, rows):
    """Writes ``header`` and ``rows`` to ``path`` as CSV; returns ``path``."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path
