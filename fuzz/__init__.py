"""Fuzz harnesses for vvu's parsers and state machines, with a bounded runner.

``python -m fuzz [HARNESS ...] (--cases N | --seconds S)`` runs each harness
(:mod:`fuzz.harnesses`) for its budget with the engine in :mod:`fuzz.engine` and
prints one line per harness; docs/fuzzing.md says what each harness covers,
what counts as a finding and how to replay one.
"""
