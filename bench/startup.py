"""Time to a trained model: ``jaxnet train`` against scikit-learn's MLPClassifier, as whole processes.

The same work on both sides: digits, standardized features, a (64, 64) ReLU MLP, Adam, batch 64,
30 epochs (jaxnet also holds out a validation split and tests; scikit-learn tests). Each repeat runs
both processes back to back, alternating which goes first; jaxnet runs with its persistent
compilation cache in a fresh folder, warmed by one untimed run first (the "second run" a user
sees), and once more with the cache off. Reported: medians and the median of paired ratios.

    python bench/startup.py --repeats 7
    python bench/startup.py --repeats 7 --path DIR   # DIR first on both processes' PYTHONPATH

Also reported: the versions of jax, numpy and ml_dtypes, and the median time of ``import
ml_dtypes`` alone after numpy, which every jax import pays (ml_dtypes 0.7.0 registers its ufunc
loops in about a second on this machine, 0.5.4 in 10 ms).
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


VERSIONS = (
    "import jax, numpy, ml_dtypes; "
    "print(f'jax {jax.__version__}, numpy {numpy.__version__}, ml_dtypes {ml_dtypes.__version__}')"
)
ML_DTYPES = "import time, numpy; t = time.perf_counter(); import ml_dtypes; print(time.perf_counter() - t)"


def _seconds(command: list[str], env: dict) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--path", default=None, help="a folder put first on PYTHONPATH (another ml_dtypes, say)")
    args = parser.parse_args()
    jaxnet = [sys.executable, "-m", "jaxnet.app", "train", "--quiet"]
    sklearn = [sys.executable, "-c", SKLEARN]
    with tempfile.TemporaryDirectory() as cache:
        path = os.pathsep.join(p for p in (args.path, str(ROOT)) if p)
        env = dict(os.environ, JAXNET_CACHE_DIR=cache, PYTHONPATH=path)
        env.pop("JAX_COMPILATION_CACHE_DIR", None)
        _seconds(jaxnet, env)  # fills the cache: what follows is a second run
        rows = {"jaxnet": [], "sklearn": []}
        for i in range(args.repeats):
            order = [("jaxnet", jaxnet), ("sklearn", sklearn)]
            for name, command in order if i % 2 == 0 else order[::-1]:
                rows[name].append(_seconds(command, env))
        cold = _seconds(jaxnet, dict(env, JAXNET_CACHE_DIR=""))
        versions = subprocess.run([sys.executable, "-c", VERSIONS], env=env, capture_output=True, text=True).stdout
        ml_dtypes = statistics.median(
            float(subprocess.run([sys.executable, "-c", ML_DTYPES], env=env, capture_output=True, text=True).stdout)
            for _ in range(5)
        )
    ratios = [a / b for a, b in zip(rows["jaxnet"], rows["sklearn"])]
    print(
        f"# time to a trained model ({datetime.date.today()}, {platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()})"
    )
    print(f"jaxnet train (cache warm): median {statistics.median(rows['jaxnet']):.2f} s")
    print(f"scikit-learn MLPClassifier: median {statistics.median(rows['sklearn']):.2f} s")
    print(f"jaxnet / scikit-learn: {statistics.median(ratios):.2f}x (median of {len(ratios)} paired repeats)")
    print(f"jaxnet train with the cache off: {cold:.2f} s (one run)")
    print(f"{versions.strip()}; import ml_dtypes alone: median {ml_dtypes:.2f} s of 5")


if __name__ == "__main__":
    main()
