"""``jaxnet ARGS`` run in the test's own process: a process per command would spend seconds
importing jax. (Commands that need their own process, for XLA_FLAGS, signals or standard input,
run as subprocesses in their tests.)"""

import contextlib
import io
import os
import types

from jaxnet.app import cli


def run_cli(*args, cwd=None) -> types.SimpleNamespace:
    """The command's ``returncode`` and what it wrote (``stdout``, ``stderr``), run in ``cwd``."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.chdir(cwd or os.getcwd()), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main([str(a) for a in args])
    return types.SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())
