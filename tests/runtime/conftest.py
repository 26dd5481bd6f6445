"""Runtime test fixtures.

The tests here compare the sparse path with its definition on tiny models, where every layer's
planned density is far above the CPU break-even, so the runtime's dense rule would run them all
dense. They run with the rule off (``DENSE_ABOVE`` empty: never dense); the rule has its own tests
(``test_dense_rule_*``), which turn it back on.
"""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _sparse_path_always(monkeypatch, request):
    if "dense_rule" in request.node.name:
        return
    from dam.runtime import integration

    monkeypatch.setattr(integration, "DENSE_ABOVE", {})
