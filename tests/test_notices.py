"""fura quiets exactly the bitsandbytes kernel notices it names and nothing else (fura's filter, not upstream text)."""

from __future__ import annotations

import logging

import pytest

from fura import _bnb_notice


def record(logger: str, message: str) -> logging.LogRecord:
    return logging.LogRecord(logger, logging.WARNING, __file__, 1, message, None, None)


@pytest.mark.parametrize(("logger", "prefix"), sorted(_bnb_notice.DROPPED.items()))
def test_the_named_notice_is_dropped_and_nothing_else(logger, prefix):
    filters = logging.getLogger(logger).filters
    assert any(isinstance(f, _bnb_notice.DropNotice) for f in filters)  # installed by `import fura`
    passes = lambda message: all(f.filter(record(logger, message)) for f in filters)  # noqa: E731
    assert not passes(prefix + " because of whatever the library says next")
    assert passes("Skipping publisher trust check for 'someone/another-kernel' because the hub is offline.")
    assert passes("any other " + prefix)
