"""Running the model: the sampler, prefill, the jitted generation programs and their state, the scheduler."""
