"""A model checkpoint saved on several devices restores, and scores, on one."""

import json
import os

import jax

from models import checkpoint
from pipelines import score
from tests.four_devices import run_on_four_cpu_devices

SAVE_ON_FOUR = """
import json, sys
import jax, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from models import checkpoint
from models.tokenizer import ByteTokenizer
from models.two_towers import ModelConfig, init_params
config = ModelConfig(image_variant="mu", text_variant="mu", image_size=32, patch_size=8, embed_dim=32,
                     text_length=32, vocab_size=ByteTokenizer().vocab_size)
mesh = Mesh(np.array(jax.devices()), ("data",))
params = jax.device_put(init_params(config, jax.random.key(3)), NamedSharding(mesh, PartitionSpec()))
digest = checkpoint.save(sys.argv[1] if len(sys.argv) > 1 else {path!r}, params, config, ByteTokenizer())
print(json.dumps({{"devices": len(jax.devices()), "fingerprint": digest}}))
"""


def test_a_checkpoint_saved_on_four_devices_restores_and_scores_on_one(tmp_path, tiny_corpus):
    path = str(tmp_path / "model")
    saved = run_on_four_cpu_devices(SAVE_ON_FOUR.format(path=path))
    assert saved["devices"] == 4
    restored = checkpoint.restore(path)  # this process has one device
    assert restored.fingerprint == saved["fingerprint"]
    assert {device for leaf in jax.tree_util.tree_leaves(restored.params) for device in leaf.devices()} == {
        jax.local_devices()[0]
    }
    summary = score.run(
        [
            f"--input={tiny_corpus}/web/*.tar",
            f"--output={tmp_path / 'scored'}",
            f"--reference={path}",
            "--min_image_size=4",
            "--inference_batch_size=64",
        ]
    )
    assert summary["read"] == 240 and summary["scored"] > 0
    with open(os.path.join(summary["batch_dir"], "_MANIFEST.json")) as f:
        assert json.load(f)["reference"]["fingerprint"] == saved["fingerprint"]
