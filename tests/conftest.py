"""Fixtures shared by the test packages."""

import os
import socket

os.environ.setdefault("KERAS_BACKEND", "jax")  # before tensorflow (and so keras) is first imported
# gcsfs (read at its import) probes a bucket's layout on the real storage-control service over gRPC, which the GCS
# emulator does not serve: the probe would wait on the network.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

import jax
import pytest

from demo.make_corpus import write_corpus
from models import checkpoint
from models.tokenizer import ByteTokenizer
from models.two_towers import ModelConfig, init_params


def pytest_collection_modifyitems(config, items):
    """Every test on the GCS emulator is marked `gcs`: `make test` runs the others on two pytest-xdist workers and
    these after them in one process (orbax's checkpoints on the emulator failed inside an xdist worker that had run
    other tests first, and passed alone)."""
    for item in items:
        if "gcs_bucket" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.gcs)


def _serve_generations_as_gcs_does():
    """Makes the emulator's object generations behave as on GCS, which orbax's OCDBT checkpoints rely on.

    gcp-storage-emulator ignores `ifGenerationMatch` / `ifGenerationNotMatch` and sends no `x-goog-generation`
    header with a media download. TensorStore revalidates a cached OCDBT manifest with `ifGenerationNotMatch`: GCS
    answers 304, the emulator answered 200 with no generation, and the next request failed with "Malformed
    StorageGeneration" (seen only when a loaded CPU let the cache go stale between a checkpoint's writes)."""
    from http import HTTPStatus

    from gcp_storage_emulator import server as emulator
    from gcp_storage_emulator.exceptions import NotFound
    from gcp_storage_emulator.handlers import objects

    if getattr(objects, "_generations_as_gcs", False):
        return

    def current(storage, bucket, name):
        """The object's resource (its generation and metageneration), None when there is no object."""
        try:
            return storage.get_file_obj(bucket, name)
        except NotFound:
            return None

    def holds(condition, generation):
        """A `ifGenerationMatch` value against the object's generation (None: no object); "0" means no object."""
        return generation is None if condition == "0" else generation == condition

    def failed(response, status, message):
        response.status = status
        response.json({"error": {"code": int(status), "message": message}})

    original_download, original_insert = objects.download, objects.insert

    def download(request, response, storage, *args, **kwargs):
        found = current(storage, request.params["bucket_name"], request.params["object_id"])
        generation = found and found["generation"]
        if_match = request.query.get("ifGenerationMatch", [None])[0]
        if_not_match = request.query.get("ifGenerationNotMatch", [None])[0]
        if generation is not None and if_match is not None and not holds(if_match, generation):
            return failed(response, HTTPStatus.PRECONDITION_FAILED, "ifGenerationMatch does not hold")
        if generation is not None and if_not_match is not None and holds(if_not_match, generation):
            response.status = HTTPStatus.NOT_MODIFIED
            return None
        original_download(request, response, storage, *args, **kwargs)
        if generation is not None and response.status in (HTTPStatus.OK, HTTPStatus.PARTIAL_CONTENT):
            response["x-goog-generation"] = generation
            response["x-goog-metageneration"] = found["metageneration"]
        return None

    def insert(request, response, storage, *args, **kwargs):
        if_match = request.query.get("ifGenerationMatch", [None])[0]
        name = request.query.get("name", [None])[0]
        if if_match is not None and name is not None:
            found = current(storage, request.params["bucket_name"], name)
            if not holds(if_match, found and found["generation"]):
                return failed(response, HTTPStatus.PRECONDITION_FAILED, "ifGenerationMatch does not hold")
        return original_insert(request, response, storage, *args, **kwargs)

    # `objects.get` (alt=media) calls the module's `download`; the routes hold the functions themselves. The server
    # is a plain (one-thread) HTTPServer, so a check and the handler after it see the same object.
    objects.download, objects.insert = download, insert
    for _, handlers in emulator.HANDLERS:
        for method, handler in list(handlers.items()):
            handlers[method] = {original_download: download, original_insert: insert}.get(handler, handler)
    objects._generations_as_gcs = True


@pytest.fixture(scope="session")
def gcs_bucket():
    """A `gs://` bucket served in-process by gcp-storage-emulator on a free loopback port, used anonymously."""
    import google.auth
    from apache_beam.internal.gcp import auth as beam_auth
    from gcp_storage_emulator.server import create_server
    from google.auth.credentials import AnonymousCredentials

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    _serve_generations_as_gcs_does()
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket="corpus-test")
    server.start()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{port}")  # Beam, google-cloud-storage, gcsfs
        patch.setenv("TENSORSTORE_GCS_HTTP_URL", f"http://127.0.0.1:{port}")  # orbax's array data
        # Anonymous credentials straight away: no search for default credentials with its retry back-off.
        patch.setattr(google.auth, "default", lambda *args, **kwargs: (AnonymousCredentials(), "test-project"))
        patch.setattr(beam_auth._Credentials, "_credentials_init", False)
        yield "gs://corpus-test"
    server.stop()


@pytest.fixture(scope="session")
def reference_checkpoint(tmp_path_factory) -> str:
    """A 1-layer reference model (random weights, byte tokenizer) saved as the scoring job loads it."""
    path = str(tmp_path_factory.mktemp("reference") / "model")
    config = ModelConfig(
        image_variant="mu",
        text_variant="mu",
        image_size=32,
        patch_size=8,
        embed_dim=32,
        text_length=32,
        vocab_size=ByteTokenizer().vocab_size,
    )
    checkpoint.save(path, init_params(config, jax.random.key(0)), config, ByteTokenizer())
    return path


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
    """A small demo corpus (web 240 with every noise kind, curated 64, eval 48 + 48), in 3 web shards."""
    out = str(tmp_path_factory.mktemp("corpus") / "corpus")
    write_corpus(out, size=240, format="wds", seed=3, curated_size=64, eval_size=48, shard_size=100, image_size=32)
    return out


@pytest.fixture(scope="session")
def scored_tiny_corpus(tiny_corpus, reference_checkpoint, tmp_path_factory):
    """The tiny corpus's web split scored by the test reference model (Parquet shards with images)."""
    from pipelines import score

    output = str(tmp_path_factory.mktemp("scored") / "scored")
    score.run(
        [
            f"--input={tiny_corpus}/web/*.tar",
            f"--output={output}",
            f"--reference_checkpoint={reference_checkpoint}",
            "--min_image_size=4",
        ]
    )
    return output
