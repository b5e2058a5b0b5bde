"""The demo: a generator for the synthetic demo corpus and the end-to-end run on it (`python -m demo`)."""

import models.environment  # noqa: F401  (keras on JAX, quiet tensorflow imports: before anything else)
