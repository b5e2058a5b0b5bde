from models import environment  # noqa: F401  (keras on JAX, quiet tensorflow imports: before anything else)
