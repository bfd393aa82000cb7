"""Host-side work spread over a Ray cluster (optional extra `edgeblock[cluster]`): block selection's masked passes
on actors (cluster/selection.py) and the benchmark's (row, subject, seed) units as tasks (cluster/evaluation.py).
Ray is imported only here, and only when a command is given --ray; the device package never imports it.
"""
