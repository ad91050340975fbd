import os


os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download; real checkpoints sit behind @pytest.mark.slow

import pytest  # noqa: E402
import torch  # noqa: E402


if os.environ.get("PYTEST_XDIST_WORKER"):  # `pytest -n <cores>` (.ci/run): each worker and its scripts on one core;
    os.environ["OMP_NUM_THREADS"] = "1"       # more threads than cores make torch's parallel ops wait on each other
    torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if os.environ.get("RUN_SLOW") == "1":
        return
    skip_slow = pytest.mark.skip(reason="needs Hub checkpoints: set RUN_SLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def processor():
    """The tiny checkpoint's processor (hub_configs/anymal-tiny); test files may define their own."""
    from transformers import AutoProcessor

    from anymal_tester import TINY

    return AutoProcessor.from_pretrained(TINY)


@pytest.fixture(scope="module")
def model():
    """The tiny AnyMAL with seeded random weights, in eval mode."""
    from anymal_tester import tiny_model

    return tiny_model()
