"""The math only: the Phi-3/Phi-4 modules, rotary tables, attention kernels, ring attention, KV cache."""
