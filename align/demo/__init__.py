"""The embedded demo (``vidalign demo``): the whole alignment loop, small, on a CPU, in a
synthetic world whose oracle stands in for the human.

- :mod:`align.demo.run`: the loop, composed of the functions the CLI commands call
  (``run_demo``, ``parse_overrides``, ``DemoConfig``, ``sample_groups``);
- :mod:`align.demo.synthetic`: the world of coloured moving shapes, its prompts and its oracle;
- :mod:`align.demo.pretrain`: the demo's tiny generator and reward backbone, pretrained on the
  world (``vidalign pretrain``) and shipped in ``align/demo_models/``.

Nothing outside this package but the ``oracle`` judge uses the synthetic world.
"""

from __future__ import annotations

RUNNER = ("DemoConfig", "parse_overrides", "run_demo", "sample_groups")  # align.demo.run's, also here


def __getattr__(name: str):
    """``from align.demo import run_demo`` and the other ``RUNNER`` names: :mod:`align.demo.run`
    is imported on first use, so the oracle judge, which needs only :mod:`align.demo.synthetic`,
    does not import the training stack with it."""
    if name in RUNNER:
        from align.demo import run

        return getattr(run, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
