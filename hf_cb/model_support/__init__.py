"""Which models hf_cb can serve (a probe step, not a class flag), and what it reads from them."""
