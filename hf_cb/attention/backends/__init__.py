"""Attention backends: each plans a step from its page table and attends over the pages."""
