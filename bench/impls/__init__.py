"""One module per implementation; each exposes one function per case (see ``bench/run.py``)."""
