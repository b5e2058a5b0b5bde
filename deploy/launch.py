"""Flex Template entry point: the launcher runs this file with the template parameters as `--name=value` flags.

deploy/Dockerfile points FLEX_TEMPLATE_PYTHON_PY_FILE here; it is `python -m pipelines.score` that returns once the
job is submitted.
"""

from pipelines.score import main

if __name__ == "__main__":
    main(wait=False)  # a launcher submits the job and exits; Dataflow runs it
