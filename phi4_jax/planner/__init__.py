"""Planning without running: the engine's steps compiled for a mesh or an accelerator, read for memory and speed."""
