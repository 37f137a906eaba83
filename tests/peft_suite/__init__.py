"""Run PEFT's own custom-model test matrix against our adapter methods.

``sdist`` fetches and unpacks PEFT's source distribution (it ships the test suite), ``rows`` declares
our rows for PEFT's parametrised tests, ``verdict`` decides which failures are our expected refusals
and ``plugin`` is the pytest plugin (loaded with ``-p peft_suite.plugin``) that adds the rows and
writes one JSON record per test. ``tests/test_peft_suite.py`` drives it in a subprocess.
"""
