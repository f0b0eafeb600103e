"""The nesting rule of ``patched`` blocks, shared by :func:`maskpatch.patched` and the host adapters.

A block opens (or joins) an install and counts itself in the install's record; the last block
to exit removes the install, unless an explicit :func:`maskpatch.apply` pinned it. The count and
the install change under one lock, so a block exiting on another thread can never remove an
install between its opening here and the count going up.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from .handle import LOCK, PatchHandle

__all__ = ["counted_block"]


@contextmanager
def counted_block(open_install: Callable[[], PatchHandle]) -> Iterator[PatchHandle]:
    """Run ``open_install()`` (it makes or finds an install) under :data:`LOCK`, yield its handle, count the block.

    On exit (also when the body raises) the block is uncounted; the last block of an install
    that no :func:`maskpatch.apply` pinned removes it (``handle.remove()``). Errors of
    ``open_install`` propagate before anything is counted.
    """
    with LOCK:
        handle = open_install()
        handle._record.contexts += 1
    try:
        yield handle
    finally:
        with LOCK:
            handle._record.contexts -= 1
            if handle._record.contexts == 0 and not handle._record.pinned:
                handle.remove()
