"""The host-side core of the engine: its config, sequences, the scheduler, the prefix cache,
request limits, and the staging of each step's index arrays to the device. (The page pool,
`hf_cb.manager`, belongs here too; it stays at the top level as part of the public surface.)"""
