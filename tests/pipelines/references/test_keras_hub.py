"""keras-hub presets as references: scored through the Beam job, checked against keras-hub's own calls."""

import glob
import io
import json
import os
import posixpath
import subprocess
import sys

import keras_hub
import numpy as np
import pyarrow.parquet as pq
import pytest
from apache_beam.io.filesystems import FileSystems
from PIL import Image

from curation.shared import batches
from curation.shared.manifest import Manifest
from curation.shared.validation import ValidationOptions, decode_image
from curation.trainer import scored_input
from pipelines import references, score
from pipelines.jax_inference import DualEncoderHandler
from tests.pipelines.references.conftest import PRESETS

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
PREPROCESSORS = {
    "siglip": keras_hub.models.SigLIPPreprocessor,
    "siglip_gemma": keras_hub.models.SigLIPPreprocessor,
    "clip": keras_hub.models.CLIPPreprocessor,
}


def _manifest(summary) -> Manifest:
    (manifest,) = batches.read_manifests(summary["output"])
    return manifest


def _table(summary):
    return pq.read_table(_manifest(summary).shard_paths("parquet"))


def _head(backbone, loss):
    head = backbone.siglip_head if loss == "sigmoid" else backbone.clip_head
    t = float(np.exp(np.asarray(head.logit_scale.value, np.float64)))
    return t, float(np.asarray(head.logit_bias.value)) if loss == "sigmoid" else 0.0


def _unit(x):
    x = np.asarray(x, np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.mark.parametrize("name", PRESETS)
def test_a_preset_scores_the_corpus_and_the_manifest_records_the_reference(name, presets, scored_by_preset):
    summary, manifest = scored_by_preset[name], _manifest(scored_by_preset[name])
    assert summary["read"] == 240 and summary["read"] == summary["scored"] + sum(summary["dead_letter"].values())
    assert summary["scored"] > 150
    reference, backbone = manifest.reference, keras_hub.models.Backbone.from_preset(presets[name])
    loss = "softmax" if name == "clip" else "sigmoid"
    assert reference.id == presets[name] and reference.model["keras_hub"] == backbone.__class__.__name__
    assert reference.loss == loss and reference.width == 32 and reference.text_length == 16
    assert (reference.temperature, reference.bias) == pytest.approx(_head(backbone, loss))
    assert reference.fingerprint == references.resolve(presets[name]).info.fingerprint
    assert (
        reference.tokenizer
        == {"siglip": "SigLIPTokenizer", "siglip_gemma": "GemmaTokenizer", "clip": "CLIPTokenizer"}[name]
    )
    preprocessing = reference.preprocessing
    assert preprocessing.size == 48 and not preprocessing.antialias
    if name == "clip":
        assert (preprocessing.resize, preprocessing.interpolation) == ("crop_then_resize", "bicubic")
        assert preprocessing.mean == pytest.approx((0.48145466 * 255, 0.4578275 * 255, 0.40821073 * 255))
    else:
        assert (preprocessing.resize, preprocessing.interpolation) == ("squash", "bilinear")
        assert preprocessing.mean == pytest.approx((127.5,) * 3) and preprocessing.std == pytest.approx((127.5,) * 3)
    assert reference.forward_flops_per_example > 0


def test_the_references_differ_in_fingerprint(presets):
    fingerprints = {references.resolve(path).info.fingerprint for path in presets.values()}
    assert len(fingerprints) == len(presets)


@pytest.mark.parametrize("name", PRESETS)
def test_stored_embeddings_equal_keras_hub_embeddings_of_the_same_pixels_and_tokens(name, presets, scored_by_preset):
    """(a) forward parity: our pixels (as float32) and keras-hub's own token ids into get_vision_embeddings /
    get_text_embeddings, against the job's float32 forward (1e-3) and its stored float16 embeddings."""
    table = _table(scored_by_preset[name]).slice(0, 48)
    rows = table.to_pylist()
    preprocessing = _manifest(scored_by_preset[name]).reference.preprocessing
    pixels = np.stack(
        [preprocessing.resize_pixels(decode_image(row["image"], ValidationOptions(min_image_size=1))) for row in rows]
    )
    images = preprocessing.normalize(pixels)  # the identical float32 arrays both sides get
    preprocessor = PREPROCESSORS[name].from_preset(presets[name])
    tokens = np.asarray(preprocessor({"images": images, "prompts": [row["caption"] for row in rows]})["token_ids"])
    backbone = keras_hub.models.Backbone.from_preset(presets[name])
    theirs_img = _unit(backbone.get_vision_embeddings(images))
    theirs_txt = _unit(backbone.get_text_embeddings(tokens))

    ours_img, ours_txt = references.resolve(presets[name]).load(batch_size=64).embed(pixels, tokens)
    np.testing.assert_allclose(ours_img, theirs_img, atol=1e-3)
    np.testing.assert_allclose(ours_txt, theirs_txt, atol=1e-3)
    stored_img = np.stack(table.column("ref_image_embedding").to_numpy(zero_copy_only=False)).astype(np.float32)
    stored_txt = np.stack(table.column("ref_text_embedding").to_numpy(zero_copy_only=False)).astype(np.float32)
    np.testing.assert_allclose(stored_img, theirs_img, atol=1e-3 + 2**-11)  # plus float16 rounding of |x| ≤ 1
    np.testing.assert_allclose(stored_txt, theirs_txt, atol=1e-3 + 2**-11)


def _image_bytes(shape, format, seed):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (shape[0] // 4 + 1, shape[1] // 4 + 1, 3), dtype=np.uint8)
    image = Image.fromarray(base).resize((shape[1], shape[0]), Image.Resampling.BICUBIC)  # smooth, with detail
    buffer = io.BytesIO()
    image.save(buffer, format=format)
    return buffer.getvalue()


CAPTIONS = [
    "A small RED circle, on the left!",
    "a blue  square\tin the centre",
    "Two green stars (and a cross)",
    "un losange violet — à droite",
    "",
    "THE THE THE the the background background background photo",
]


@pytest.mark.parametrize("name", ["siglip", "siglip_gemma", "clip"])
def test_our_preprocessing_matches_keras_hub_preprocessor_on_the_same_bytes_and_captions(name, presets):
    """(b) preprocessing parity on images smaller, larger and of other aspect ratios than the model's 48 px.
    Tolerance: our resized pixels are stored as uint8 (PreparedExample), so they are keras-hub's float result
    rounded, at most 0.5 of a level off (0.5 · scale in normalized units), plus float32 noise; keras-hub's bicubic
    result can overshoot [0, 255], which uint8 cannot hold, so theirs is compared clipped to that range."""
    reference = references.resolve(presets[name])
    preprocessing = reference.info.preprocessing
    preprocessor = PREPROCESSORS[name].from_preset(presets[name])
    text = reference.text_encoder()
    lowest, highest = preprocessing.normalize(np.zeros(3, np.uint8)), preprocessing.normalize(np.full(3, 255, np.uint8))
    tolerance = 0.5 / min(preprocessing.std) + 1e-4
    for seed, (shape, format) in enumerate(
        [((32, 32), "PNG"), ((30, 70), "PNG"), ((120, 90), "JPEG"), ((300, 200), "PNG"), ((48, 48), "JPEG")]
    ):
        data = _image_bytes(shape, format, seed)
        pixels = preprocessing.resize_pixels(decode_image(data, ValidationOptions(min_image_size=1)))
        ours = preprocessing.normalize(pixels)
        decoded = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), np.float32)[None]
        out = preprocessor({"images": decoded, "prompts": [CAPTIONS[seed % len(CAPTIONS)]]})
        theirs = np.clip(np.asarray(out["images"])[0], lowest, highest)
        assert np.abs(ours - theirs).max() <= tolerance, (shape, format, np.abs(ours - theirs).max())
    images = np.zeros((len(CAPTIONS), 48, 48, 3), np.float32)
    theirs_tokens = np.asarray(preprocessor({"images": images, "prompts": CAPTIONS})["token_ids"])
    ours_tokens = np.stack([text.encode(caption) for caption in CAPTIONS])
    np.testing.assert_array_equal(ours_tokens, theirs_tokens)
    assert len(set(map(tuple, ours_tokens))) > 3  # the captions do not all collapse to unknowns


def test_clip_scores_have_no_own_pair_loss_and_offline_filtering_ranks_by_cosine(scored_by_preset):
    summary = scored_by_preset["clip"]
    table, manifest = _table(summary), _manifest(summary)
    assert table.column("ref_loss").null_count == table.num_rows
    cosine = table.column("ref_cosine").to_numpy()
    np.testing.assert_allclose(
        table.column("ref_logit").to_numpy(), manifest.reference.temperature * cosine, rtol=1e-5, atol=1e-5
    )
    shards = manifest.shard_paths("parquet")
    threshold = scored_input.difficulty_threshold(shards, 0.5, "softmax")
    kept = cosine[-cosine <= threshold]
    dropped = cosine[-cosine > threshold]
    assert len(kept) == pytest.approx(len(cosine) / 2, abs=1) and kept.min() >= dropped.max()


def test_a_preset_folder_on_gcs_scores_like_the_local_one(presets, scored_by_preset, tiny_corpus, gcs_bucket, tmp_path):
    local = presets["siglip"]
    remote = f"{gcs_bucket}/presets/siglip"
    for path in glob.glob(f"{local}/**", recursive=True):
        if os.path.isfile(path):
            with open(path, "rb") as f, FileSystems.create(posixpath.join(remote, os.path.relpath(path, local))) as out:
                out.write(f.read())
    assert references.resolve(remote).info.fingerprint == references.resolve(local).info.fingerprint
    summary = score.run(
        [
            f"--input={tiny_corpus}/web/*.tar",
            f"--output={tmp_path / 'scored'}",
            f"--reference={remote}",
            "--min_image_size=4",
            "--inference_batch_size=64",
        ]
    )
    remote_table = pq.read_table(batches.read_manifests(str(tmp_path / "scored"))[0].shard_paths("parquet"))
    local_table = _table(scored_by_preset["siglip"])
    assert summary["scored"] == scored_by_preset["siglip"]["scored"]
    by_key = {row["key"]: row for row in local_table.to_pylist()}
    for row in remote_table.to_pylist():
        assert row["ref_image_embedding"] == by_key[row["key"]]["ref_image_embedding"]
        assert row["ref_loss"] == by_key[row["key"]]["ref_loss"]


@pytest.mark.parametrize("name", PRESETS)
def test_jest_trains_from_each_references_scores(name, scored_by_preset, tiny_corpus, tmp_path, capsys):
    from curation import train as train_cli

    workdir = str(tmp_path / "jest")
    capsys.readouterr()
    train_cli.main(
        [
            "--config",
            "jest",
            "--smoke",
            f"--data={tiny_corpus}",
            f"--scored={scored_by_preset[name]['output']}",
            f"--workdir={workdir}",
        ]
    )
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    losses = [row["loss"] for row in rows if "loss" in row]
    assert losses and all(np.isfinite(losses))
    said = "selection scores learner and reference with the softmax loss" in capsys.readouterr().err
    assert said == (name == "clip")


def test_a_softmax_reference_refuses_sigmoid_selection(scored_by_preset, tiny_corpus, tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "curation.train",
            "--config",
            "jest",
            "--smoke",
            f"--data={tiny_corpus}",
            f"--scored={scored_by_preset['clip']['output']}",
            f"--workdir={tmp_path / 'w'}",
            "--selection_loss",
            "sigmoid",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert "needs a sigmoid (SigLIP) reference" in last and "Traceback" not in result.stderr
    assert not os.path.exists(tmp_path / "w")  # refused before anything is written


def test_the_handler_passes_sharing_and_copies_to_beam(presets):
    reference = references.resolve(presets["siglip"])
    plain = DualEncoderHandler(reference, 8)
    assert not plain.share_model_across_processes() and plain.model_copies() == 1
    shared = DualEncoderHandler(reference, 8, large_model=True)
    assert shared.share_model_across_processes() and shared.model_copies() == 1
    per_gpu = DualEncoderHandler(reference, 8, model_copies=4)
    assert per_gpu.share_model_across_processes() and per_gpu.model_copies() == 4


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("keras_hub:siglip2_base_patch16_244", "did you mean keras_hub:siglip2_base_patch16_224"),
        ("keras_hub:no_such_model", "keras-hub has no such preset"),
    ],
)
def test_a_wrong_preset_name_is_one_line_naming_the_fix(spec, expected, tiny_corpus, tmp_path, capsys):
    from tests.test_mistakes import refused

    line = refused(
        capsys, score.main, [f"--input={tiny_corpus}/web/*.tar", f"--output={tmp_path / 'out'}", f"--reference={spec}"]
    )
    assert expected in line
    assert not os.path.exists(tmp_path / "out")


def test_describing_a_preset_never_reads_its_weights(presets, gcs_bucket, monkeypatch):
    """The launcher's fingerprint of a hub preset fetches only its JSON files; of a gs:// folder, it opens no
    weights file (their CRC32C comes from the object's metadata)."""
    from keras_hub.src.utils import preset_utils

    from pipelines.references import keras_hub as hub_reference

    local = presets["siglip_gemma"]
    fetched = []

    def fake_hub_file(name, file):
        fetched.append(file)
        return os.path.join(local, file)

    monkeypatch.setitem(
        preset_utils.BUILTIN_PRESETS,
        "tiny_siglip_for_tests",
        {"kaggle_handle": "kaggle://tests/siglip/keras/tiny_siglip_for_tests/3", "metadata": {}},
    )
    monkeypatch.setattr(hub_reference, "_hub_file", fake_hub_file)
    info = references.resolve("keras_hub:tiny_siglip_for_tests").info
    assert fetched and all(file.endswith(".json") for file in fetched)
    assert info.model["kaggle_handle"].endswith("/3") and info.tokenizer == "GemmaTokenizer"
    assert info.fingerprint != references.resolve(local).info.fingerprint  # the handle's version is its identity

    remote = f"{gcs_bucket}/presets/gemma"
    for path in glob.glob(f"{local}/**", recursive=True):
        if os.path.isfile(path):
            with open(path, "rb") as f, FileSystems.create(posixpath.join(remote, os.path.relpath(path, local))) as out:
                out.write(f.read())
    opened = []
    real_open = FileSystems.open
    monkeypatch.setattr(
        FileSystems, "open", staticmethod(lambda path, *a, **k: (opened.append(path), real_open(path, *a, **k))[1])
    )
    assert references.resolve(remote).info.fingerprint == references.resolve(local).info.fingerprint
    assert opened and not [path for path in opened if path.startswith("gs://") and path.endswith(".weights.h5")]


def test_keras_on_another_backend_is_refused_in_one_line(presets, tmp_path):
    script = (
        "import keras, sys; from pipelines.references import keras_hub as k\n"
        "try:\n    k.check_backend()\nexcept Exception as e:\n    print(type(e).__name__, e); sys.exit(3)\n"
    )
    env = {**os.environ, "KERAS_BACKEND": "tensorflow"}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=REPO, timeout=300
    )
    assert result.returncode == 3 and "set KERAS_BACKEND=jax" in result.stdout
