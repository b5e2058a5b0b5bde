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
    config = ModelConfig(image_variant="mu", text_variant="mu", image_size=32, patch_size=8, embed_dim=32,
                         text_length=32, vocab_size=ByteTokenizer().vocab_size)
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
    score.run([f"--input={tiny_corpus}/web/*.tar", f"--output={output}", f"--reference_checkpoint={reference_checkpoint}",
               "--min_image_size=4"])
    return output
