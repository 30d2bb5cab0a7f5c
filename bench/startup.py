"""Time to a trained model: ``jaxnet train`` against scikit-learn's MLPClassifier, as whole processes.

The same work on both sides: digits, standardized features, a (64, 64) ReLU MLP, Adam, batch 64,
30 epochs (jaxnet also holds out a validation split and tests; scikit-learn tests). Each repeat runs
both processes back to back, alternating which goes first; jaxnet runs with its persistent
compilation cache in a fresh folder, warmed by one untimed run first (the "second run" a user
sees), and once more with the cache off. Reported: medians and the median of paired ratios.

    python bench/startup.py --repeats 7
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SKLEARN = """
import warnings
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier
from sklearn.preprocessing import StandardScaler
warnings.filterwarnings("ignore")
x, y = load_digits(return_X_y=True)
xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.2, random_state=0)
s = StandardScaler().fit(xtr)
m = MLPClassifier((64, 64), batch_size=64, max_iter=30, random_state=0).fit(s.transform(xtr), ytr)
print(m.score(s.transform(xte), yte))
"""


def _seconds(command: list[str], env: dict) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    jaxnet = [sys.executable, "-m", "jaxnet.cli", "train", "--quiet"]
    sklearn = [sys.executable, "-c", SKLEARN]
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, JAXNET_CACHE_DIR=cache, PYTHONPATH=str(ROOT))
        env.pop("JAX_COMPILATION_CACHE_DIR", None)
        _seconds(jaxnet, env)  # fills the cache: what follows is a second run
        rows = {"jaxnet": [], "sklearn": []}
        for i in range(args.repeats):
            order = [("jaxnet", jaxnet), ("sklearn", sklearn)]
            for name, command in order if i % 2 == 0 else order[::-1]:
                rows[name].append(_seconds(command, env))
        cold = _seconds(jaxnet, dict(env, JAXNET_CACHE_DIR=""))
    ratios = [a / b for a, b in zip(rows["jaxnet"], rows["sklearn"])]
    print(
        f"# time to a trained model ({datetime.date.today()}, {platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()})"
    )
    print(f"jaxnet train (cache warm): median {statistics.median(rows['jaxnet']):.2f} s")
    print(f"scikit-learn MLPClassifier: median {statistics.median(rows['sklearn']):.2f} s")
    print(f"jaxnet / scikit-learn: {statistics.median(ratios):.2f}x (median of {len(ratios)} paired repeats)")
    print(f"jaxnet train with the cache off: {cold:.2f} s (one run)")


if __name__ == "__main__":
    main()
