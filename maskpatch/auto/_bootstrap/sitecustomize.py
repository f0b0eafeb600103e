"""maskpatch's ``sitecustomize``: ``maskpatch run`` puts this folder first on ``PYTHONPATH``.

It starts auto-enable (the same :func:`_maskpatch_bootstrap.start` as the ``.pth`` line, which
does nothing the second time), then runs the ``sitecustomize`` this one shadows, if there is one,
so the user's own start-up code still runs. Nothing here raises because of maskpatch; an error
in the user's ``sitecustomize`` propagates as it would without maskpatch (``site`` reports it).
"""

import os
import sys


def _start_maskpatch() -> None:
    try:
        import _maskpatch_bootstrap
    except ImportError:
        sys.stderr.write(
            "maskpatch: `maskpatch run` started an interpreter in which maskpatch is not installed "
            f"({sys.executable}); no model will be patched.\n"
        )
        return
    _maskpatch_bootstrap.start()


def _run_shadowed_sitecustomize() -> None:
    from importlib.machinery import PathFinder
    from importlib.util import module_from_spec

    here = os.path.dirname(os.path.realpath(__file__))
    rest = [entry for entry in sys.path if os.path.realpath(entry or os.curdir) != here]
    spec = PathFinder.find_spec("sitecustomize", rest)
    if spec is None or spec.loader is None:
        return
    module = module_from_spec(spec)
    sys.modules["sitecustomize"] = module
    spec.loader.exec_module(module)


_start_maskpatch()
_run_shadowed_sitecustomize()
