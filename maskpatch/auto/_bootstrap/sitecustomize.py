"""maskpatch's ``sitecustomize``: ``maskpatch run`` puts this folder first on ``PYTHONPATH``.

It starts auto-enable (the same :func:`maskpatch.auto.bootstrap.start` as the ``.pth`` line, which
does nothing the second time), then runs the ``sitecustomize`` this one shadows, if there is one,
so the user's own start-up code still runs. Nothing here raises because of maskpatch; an error
in the user's ``sitecustomize`` propagates as it would without maskpatch (``site`` reports it).
"""

import os
import sys


def _start_maskpatch() -> None:
    try:
        from maskpatch.auto import bootstrap
    except ImportError:
        sys.stderr.write(
            "maskpatch: `maskpatch run` started an interpreter in which maskpatch is not installed "
            f"({sys.executable}); no model will be patched.\n"
        )
        return
    bootstrap.start()


def _run_shadowed_sitecustomize() -> None:
    from importlib.machinery import PathFinder

    here = os.path.dirname(os.path.realpath(__file__))
    rest = [entry for entry in sys.path if os.path.realpath(entry or os.curdir) != here]
    spec = PathFinder.find_spec("sitecustomize", rest)
    if spec is None or spec.loader is None:
        return
    from importlib.util import module_from_spec  # only now: it costs imports at every start

    module = module_from_spec(spec)
    sys.modules["sitecustomize"] = module
    spec.loader.exec_module(module)


_start_maskpatch()
_run_shadowed_sitecustomize()
