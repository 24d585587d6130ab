"""Shared fixtures."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import CIFAR10_CLASSES, SERVICE_MARKERS, make_image_folder, pack_archive, required_message, services_required

@pytest.fixture(scope="session")
def tiny_image_folder_archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CIFAR-10-shaped ``cifar10-tiny.tar.gz`` (PNG, 20 train + 5 test images per class, labels readable
    with ``tests.helpers.label_from_image``), alone in its folder: pass it, or its parent as data_dir, to
    ``experiments.data.load_dataset("cifar10", ...)`` (give cache_dir a tmp_path to keep ~/.cache clean)."""
    tree = make_image_folder(tmp_path_factory.mktemp("tiny_tree"), 20, 5, CIFAR10_CLASSES)
    return pack_archive(tree, tmp_path_factory.mktemp("tiny_data") / "cifar10-tiny.tar.gz")


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def device(request: pytest.FixtureRequest) -> str:
    """The device a device-dependent test runs on: "cpu" always, "cuda" too where torch sees a GPU. The cuda
    case skips elsewhere (expected on CI and CPU machines; `-m "not cuda"` leaves it out)."""
    if request.param == "cuda":
        import torch  # here, not at the top: the torch-free test packages load this conftest too

        if not torch.cuda.is_available():
            pytest.skip("no CUDA device visible to torch (expected without a GPU)")
    return request.param


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """With CNN_ZOO_REQUIRE_SERVICES=1, a test marked postgres or browser may not skip (a skipif marker, a
    fixture's pytest.skip): the skip becomes a failure carrying its reason. Tests should still call
    ``tests.helpers.service_missing``; this catches the ones that do not."""
    report = yield
    service_test = any(item.get_closest_marker(m) for m in SERVICE_MARKERS)
    if report.skipped and not hasattr(report, "wasxfail") and service_test and services_required():
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        reason = reason.removeprefix("Skipped: ")
        report.outcome = "failed"
        report.longrepr = f"{item.nodeid}: {required_message(reason)}"
    return report
