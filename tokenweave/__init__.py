"""tokenweave: token-aware fine-tuning and RL on top of TRL, where each token gets the gradient it deserves."""

__version__ = "0.1.0"
"""The release; pyproject.toml's ``version`` is the same (tests/test_provenance.py). With the git commit of the code
that runs: :func:`tokenweave.provenance.version_string`."""
