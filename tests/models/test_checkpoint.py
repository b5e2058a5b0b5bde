import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from models import checkpoint
from models.tokenizer import ByteTokenizer, WordTokenizer
from models.two_towers import ModelConfig, init_params

CONFIG = ModelConfig(embed_dim=16, text_length=8)


@pytest.fixture(scope="module")
def params():
    return init_params(CONFIG, jax.random.key(1))


def _leaves(tree):
    return jax.tree_util.tree_leaves_with_path(tree)


def test_roundtrip_is_bit_exact_and_fingerprint_stable(tmp_path, params):
    digest = checkpoint.save(str(tmp_path / "ckpt"), params, CONFIG, ByteTokenizer())
    restored = checkpoint.restore(str(tmp_path / "ckpt"))
    assert restored.config == CONFIG
    assert restored.fingerprint == digest == checkpoint.fingerprint(params, CONFIG, ByteTokenizer())
    assert len(digest) == 64
    assert jax.tree_util.tree_structure(restored.params) == jax.tree_util.tree_structure(params)
    for (path, original), (_, loaded) in zip(_leaves(params), _leaves(restored.params)):
        original, loaded = np.asarray(original), np.asarray(loaded)
        assert original.dtype == loaded.dtype, path
        assert original.tobytes() == loaded.tobytes(), path


def test_word_tokenizer_is_saved_with_the_checkpoint(tmp_path):
    tokenizer = WordTokenizer.build(["a red circle", "a red square", "a blue circle"], min_count=1)
    config = ModelConfig(embed_dim=16, text_length=8, vocab_size=tokenizer.vocab_size)
    params = init_params(config, jax.random.key(0))
    checkpoint.save(str(tmp_path / "ckpt"), params, config, tokenizer)
    restored = checkpoint.restore(str(tmp_path / "ckpt"))
    assert restored.tokenizer.vocab == tokenizer.vocab
    np.testing.assert_array_equal(restored.tokenizer.encode("a blue square", 8), tokenizer.encode("a blue square", 8))
    # The vocabulary is part of the identity of the model.
    other = WordTokenizer(list(reversed(tokenizer.vocab)), tokenizer.n_hash_buckets)
    assert checkpoint.fingerprint(params, config, other) != restored.fingerprint


def test_fingerprint_changes_when_any_param_or_the_config_changes(params):
    base = checkpoint.fingerprint(params, CONFIG, ByteTokenizer())
    leaves, treedef = jax.tree_util.tree_flatten(params)
    for index in range(len(leaves)):
        changed = list(leaves)
        flat = np.array(changed[index]).ravel()
        flat[-1] = np.nextafter(flat[-1], np.float32(np.inf))  # the smallest possible change
        changed[index] = flat.reshape(np.shape(leaves[index]))
        assert checkpoint.fingerprint(jax.tree_util.tree_unflatten(treedef, changed), CONFIG, ByteTokenizer()) != base
    other_config = ModelConfig(**{**CONFIG.to_dict(), "bias_init": -9.0})
    assert checkpoint.fingerprint(params, other_config, ByteTokenizer()) != base


def _rewrite_meta(directory, **changes):
    path = os.path.join(directory, "meta", "metadata")
    with open(path) as f:
        meta = json.load(f)
    meta["model"].update(changes)
    with open(path, "w") as f:
        json.dump(meta, f)


def test_restore_refuses_params_that_do_not_match_the_config(tmp_path, params):
    directory = str(tmp_path / "ckpt")
    checkpoint.save(directory, params, CONFIG, ByteTokenizer())
    _rewrite_meta(directory, embed_dim=32)
    with pytest.raises(
        ValueError,
        match=r"image_tower/head/kernel: checkpoint has float32\(32, 16\), config needs "
        r"float32\(32, 32\)",
    ):
        checkpoint.restore(directory)


def test_restore_names_unknown_and_missing_keys(tmp_path, params):
    directory = str(tmp_path / "ckpt")
    extra = {**params, "stray_layer": {"kernel": np.zeros((2, 2), np.float32)}}
    del extra["bias"]
    meta = {"meta_version": 1, "model": CONFIG.to_dict(), "tokenizer": {"kind": "bytes"}, "fingerprint": "0" * 64}
    ocp.Checkpointer(ocp.CompositeCheckpointHandler()).save(
        directory, args=ocp.args.Composite(params=ocp.args.StandardSave(extra), meta=ocp.args.JsonSave(meta))
    )
    with pytest.raises(ValueError) as error:
        checkpoint.restore(directory)
    assert "unknown keys in checkpoint: ['stray_layer/kernel']" in str(error.value)
    assert "lacks: ['bias']" in str(error.value)


def test_save_refuses_a_tokenizer_of_another_vocabulary_size(tmp_path, params):
    tokenizer = WordTokenizer(["a", "b"])
    with pytest.raises(ValueError, match=f"tokenizer has {tokenizer.vocab_size} ids .* expects 259"):
        checkpoint.save(str(tmp_path / "ckpt"), params, CONFIG, tokenizer)


def test_restore_detects_params_changed_on_disk(tmp_path, params):
    directory = str(tmp_path / "ckpt")
    checkpoint.save(directory, params, CONFIG, ByteTokenizer())
    path = os.path.join(directory, "meta", "metadata")
    with open(path) as f:
        meta = json.load(f)
    meta["fingerprint"] = "f" * 64
    with open(path, "w") as f:
        json.dump(meta, f)
    with pytest.raises(ValueError, match="is corrupt"):
        checkpoint.restore(directory)


def test_a_relative_directory_saves_and_restores(tmp_path, params, monkeypatch):
    monkeypatch.chdir(tmp_path)
    digest = checkpoint.save("runs/model", params, CONFIG, ByteTokenizer())
    assert (tmp_path / "runs" / "model").is_dir()
    assert checkpoint.restore("runs/model").fingerprint == digest == checkpoint.read_meta("runs/model")["fingerprint"]
