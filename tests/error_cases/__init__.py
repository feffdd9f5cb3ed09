"""The bad-input cases of ``tests/test_errors.py`` (and so of docs/ERRORS.md's table), one module per stage.

Each stage module exports ``CASES``, a list of :class:`~error_cases.base.Case`; ``tests/test_errors.py`` joins them
in the order of :data:`STAGES`, which is the order of the table. :mod:`error_cases.base` holds the machinery (cases,
their context and outcomes) and the helpers several stages share. No module here is named ``test_*``: pytest
collects none of them, and runs their cases through ``test_errors.py::test_bad_input``.
"""

# The table's order: a new stage module goes into this list (test_errors checks that none is left out).
STAGES = ("api", "loading", "outputs", "training", "cli", "inputs")
