"""The ``jaxnet`` command-line application, built on the library (:mod:`jaxnet`).

Nothing in the library imports this package, and ``import jaxnet`` loads none of it. ``cli`` parses
arguments and reports; ``config`` (with ``configfields``, ``configfile``, ``cliflags`` and
``recipes``) is the frozen run config; ``data``, ``tables`` and ``task`` turn files and built-in
datasets into a training problem; ``arch`` builds the named architectures; ``run`` trains one run
(single, sweep or ensemble) through :func:`jaxnet.fit`; ``rundir``, ``files`` and ``saved`` are the
run folder, its model file and the model loaded back; ``exporting``, ``report`` and ``plot`` write
what a run shows; ``supervisor`` watches a multi-process run; ``worked_example`` is ``jaxnet seed``.
"""
