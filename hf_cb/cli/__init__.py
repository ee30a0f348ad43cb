"""``hf-cb``: the command line (``serve``, ``generate``) and the launcher of parallel ranks."""
