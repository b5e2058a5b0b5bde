"""bench/gpu_check.sh in its reduced CPU form, with TensorFlow, Beam and keras-hub made unimportable: the script a
lent GPU runs (where none of them is installed) cannot rot, and the model and selection code stay pure JAX."""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ABSENT = ("tensorflow", "tensorflow_text", "apache_beam", "keras", "keras_hub")


def test_gpu_check_runs_in_its_cpu_form_without_tensorflow_or_beam(tmp_path):
    blockers = tmp_path / "absent"
    for name in ABSENT:  # earlier on the path than site-packages: importing any of them fails
        (blockers / name).mkdir(parents=True)
        (blockers / name / "__init__.py").write_text(f"raise ImportError('{name} is not installed on the GPU box')\n")
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(blockers), "PYTHON": sys.executable}
    done = subprocess.run(
        ["bash", os.path.join(REPO, "bench", "gpu_check.sh"), "--cpu", "--out", str(out)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]

    results = json.loads((out / "gpu_check.json").read_text())
    assert results["name"] == "cpu" and results["device"]["platform"] == "cpu"
    blocked = [row for row in results["selection"] if row["kind"] == "blocked"]
    dense = [row for row in results["selection"] if row["kind"] == "dense"]
    assert blocked[0]["B"] == results["form"]["B"] and blocked[0]["seconds"] > 0
    assert blocked[0]["compiled_bytes"] > 0
    # dense from B/16 doubling up to B (it fits on CPU), compared with the blocked selection at the smallest
    assert [row["B"] for row in dense] == [results["form"]["B"] // 16 * 2**k for k in range(5)]
    assert all(row["seconds"] > 0 for row in dense)
    assert [row["dtype"] for row in results["forward"]] == ["float32", "bfloat16"]
    assert all(row["examples_per_s"] > 0 for row in results["forward"])
    steps = results["steps"]
    assert [row["b"] for row in steps][0] == results["form"]["step_b"] and len(steps) >= 1
    for row in steps:
        assert row["B"] == 5 * row["b"]
        assert min(row["scoring"], row["selection"], row["update"]) > 0
        assert abs(row["step"] - row["scoring"] - row["selection"] - row["update"]) < 1e-9
    section = (out / "gpu_check.md").read_text()
    assert results["device"]["device"] in section and "| dense |" in section and "| bfloat16 |" in section
