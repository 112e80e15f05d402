"""labkit: hands-on courseware for operating distributed systems.

The notebook-facing API grows here; the local sandbox cluster lives in
``labkit.sandbox`` and the command line in ``labkit.cli``.
"""

__version__ = "0.1.0"
