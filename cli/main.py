"""The ``dam`` command. Thin: each subcommand turns flags into a config and makes one library call.

Subcommands live in their own modules and are imported lazily, so ``dam --help`` is instant and a
command's heavy imports (torch, zarr, scikit-learn) load only when it runs.
"""

from __future__ import annotations

import importlib

import click

# name -> "module:attribute" of the click command
_COMMANDS = {
    "profile": "dam.cli.profile:profile",
    "compile": "dam.cli.compile:compile_cmd",
    "inspect": "dam.cli.inspect:inspect_cmd",
    "generate": "dam.cli.generate:generate",
    "eval": "dam.cli.eval:eval_cmd",
    "bench": "dam.cli.bench:bench",
    "demo": "dam.cli.demo:demo",
}


class _LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(_COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        return self._load(name)

    @staticmethod
    def _load(name: str) -> click.Command | None:
        target = _COMMANDS.get(name)
        if target is None:
            return None
        mod_name, attr = target.split(":")
        return getattr(importlib.import_module(mod_name), attr)


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
def main(verbose: int) -> None:
    """DAM: an ahead-of-time sparse-attention mask compiler for long-context LLMs."""
    import logging

    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


if __name__ == "__main__":  # pragma: no cover
    main()
