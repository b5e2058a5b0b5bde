"""Fixtures shared by the test packages."""

import socket

import pytest


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
        patch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{port}")
        # Anonymous credentials straight away: no search for default credentials with its retry back-off.
        patch.setattr(google.auth, "default", lambda *args, **kwargs: (AnonymousCredentials(), "test-project"))
        patch.setattr(beam_auth._Credentials, "_credentials_init", False)
        yield "gs://corpus-test"
    server.stop()
