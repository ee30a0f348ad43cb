"""``hf-cb eval ARGS``: lm-evaluation-harness's command line with hf_cb's model registered as
``hf_cb`` (the default ``--model``): ``hf-cb eval --model_args pretrained=PATH --tasks arc_easy``
runs lm-eval's ``hf`` backend with its requests on the engine (`entrypoints.lm_eval_model`)."""

from __future__ import annotations

import sys


def run_lm_eval(args: list[str]) -> None:
    """lm-eval's CLI on ``args``, ``--model hf_cb`` unless they name a model."""
    try:
        from lm_eval.__main__ import cli_evaluate

        import hf_cb.entrypoints.lm_eval_model  # noqa: F401 - registers the "hf_cb" model
    except ModuleNotFoundError as error:
        sys.exit(f"hf-cb eval: {error.name} is missing: pip install 'hf_cb[eval]'")
    if not any(a == "--model" or a.startswith("--model=") for a in args):
        args = ["--model", "hf_cb", *args]
    sys.argv = ["lm-eval", *args]
    cli_evaluate()
