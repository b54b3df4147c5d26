"""Run the Triton kernels under the interpreter when no GPU is present.

TRITON_INTERPRET must be set before any @triton.jit function is defined, so this runs
before the package's kernel modules are imported.
"""

import os
import sys

if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        assert "triton" not in sys.modules or "w4a16moe.kernels.decode" not in sys.modules
        os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ON_GPU = DEVICE == "cuda"


@pytest.fixture
def device() -> str:
    return DEVICE


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
    yield


@pytest.fixture(autouse=True)
def _fresh_config_scans():
    """Tests that patch the config lookup must not see another test's cached scan of what
    the configs need (w4a16moe.experts._CONFIG_NEEDS)."""
    from w4a16moe import experts

    experts._CONFIG_NEEDS.clear()
    yield
    experts._CONFIG_NEEDS.clear()
