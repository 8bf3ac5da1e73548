"""``tandem bench SUITE``: methods side by side on one workload, as real Flower runs.

See :mod:`tandem.bench.cli` for the options and :mod:`tandem.bench.suites` for
what each suite compares.
"""
