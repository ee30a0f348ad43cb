"""Attention inside an engine step: the step context, the custom op, the forward call that
enters a step, and the backends (PyTorch, FlashInfer, XQA). The registered function and the
`Cache` subclass (`hf_cb.attention_interface`, `hf_cb.paged_cache`) belong here too; they stay at
the top level as part of the public surface."""
