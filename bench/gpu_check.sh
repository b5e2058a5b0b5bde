#!/usr/bin/env bash
# The GPU check (bench/gpu_check.py): pure JAX, so it runs where only jax, flax, optax, orbax, numpy and pillow are
# installed. Uses the project's .venv when there is one, else python3.
#   bash bench/gpu_check.sh --out /tmp/gpu_check          # GPU form
#   bash bench/gpu_check.sh --cpu --out /tmp/gpu_check    # reduced CPU form (run by make test)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-}"
if [ -z "$python" ]; then
  if [ -x "$here/../.venv/bin/python" ]; then python="$here/../.venv/bin/python"; else python="$(command -v python3)"; fi
fi
exec "$python" "$here/gpu_check.py" "$@"
