"""Process-wide auto-enable: the environment settings, the start-up bootstrap, the launcher.

* :mod:`maskpatch.auto.constants`: the ``MASKPATCH_*`` variables and how their values are read;
* :mod:`maskpatch.auto.bootstrap`: what the ``maskpatch_auto.pth`` line and ``maskpatch run``
  start at interpreter start (post-import hooks on sentence-transformers and peft);
* :mod:`maskpatch.auto.autoenable`: what those hooks turn on: ``enable``/``disable``, which wrap
  the libraries' model constructors;
* :mod:`maskpatch.auto.launcher`: ``maskpatch run -- COMMAND``.

This package, ``constants`` and ``bootstrap`` import the standard library only (and ``maskpatch``
itself imports nothing until a public name is used), so interpreter start-up never imports torch,
wrapt or maskpatch's core. See ``docs/auto-enable.md``.
"""
