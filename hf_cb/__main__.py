"""``python -m hf_cb``: the ``hf-cb`` command line."""

from hf_cb.cli.main import main

main()
