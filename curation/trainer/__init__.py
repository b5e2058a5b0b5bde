"""The online JAX trainer: configs, input, the step, selection, loop, checkpoints, evaluation, report."""
