"""Backend discovery: lazy, by name, with reasons; required backends must be present in CI."""

import os

import pytest

from ondevice.backends import KNOWN, available_backends, backend_class, resolve
from ondevice.errors import BackendUnavailableError


def test_every_known_backend_is_reported_with_a_reason():
    report = available_backends()
    assert set(report) == set(KNOWN)
    for name, (_, detail) in report.items():
        assert detail, name
    assert report["numpy"][0]


def test_required_backends_are_available():
    """CI sets ONDEVICE_REQUIRE_BACKENDS: a backend that should run here and does not fails."""
    required = [b for b in os.environ.get("ONDEVICE_REQUIRE_BACKENDS", "numpy").split(",") if b]
    report = available_backends()
    missing = {b: report.get(b, (False, "unknown backend"))[1] for b in required
               if not report.get(b, (False,))[0]}
    assert not missing, f"required backends unavailable: {missing}"


def test_auto_resolves_to_an_available_backend():
    assert available_backends()[resolve("auto")][0]


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(BackendUnavailableError, match="unknown backend 'cuda'"):
        backend_class("cuda")
