"""What the instance tests share: `runtime`, one real backend per parameter (docker and
process, tests/backends.py), per test module; whatever a failed test left behind on it is
removed at the module's end. A module that needs another set-up defines its own `runtime`."""

import pytest

from tests import backends


@pytest.fixture(scope="module", params=backends.BACKENDS)
def runtime(request):
    backends.require(request.param)
    rt = backends.make(request.param)
    yield rt
    for name in rt.owned_instances():
        rt.remove(name)
