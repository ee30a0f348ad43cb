"""``python -m hf_cb``: the ``hf-cb`` command line."""

from .cli import main

main()
