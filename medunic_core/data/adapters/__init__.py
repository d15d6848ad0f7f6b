"""Dataset adapters: public datasets and hospital exports -> our manifest (``medunic prepare``).

Each module reads one dataset in its released layout and registers itself
(:func:`medunic_core.data.adapters.base.register`); :mod:`.base` validates and writes.
"""

from __future__ import annotations

import argparse
import inspect

from medunic_core.data.adapters.base import ADAPTERS, Candidate, Problem, Prepared, map_labels, prepare, register
from medunic_core.errors import ConfigError

__all__ = ["ADAPTERS", "Candidate", "Problem", "Prepared", "map_labels", "prepare", "register", "prepare_dataset"]


def _load_all() -> None:
    """Import every adapter module so that it registers itself."""
    import importlib
    import pkgutil

    for info in pkgutil.iter_modules(__path__):
        if info.name != "base":
            importlib.import_module(f"{__name__}.{info.name}")


def prepare_dataset(name: str, root: str, out: str, site: str = "", **options: str) -> Prepared:
    """Read dataset ``name`` at ``root`` and write ``out/manifest.jsonl`` (see :mod:`.base`)."""
    from pathlib import Path

    _load_all()
    if name not in ADAPTERS:
        raise ConfigError(f"unknown dataset '{name}'; known: {', '.join(sorted(ADAPTERS))}")
    info = ADAPTERS[name]
    accepted = [p for p in inspect.signature(info.read).parameters if p not in ("root", "site")]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ConfigError(f"{name}: unknown option(s) {unknown}; it accepts {accepted or 'none'}")
    root_path = Path(root)
    if not root_path.is_dir():
        raise ConfigError(f"--root {root} is not a folder")
    return prepare(name, info.read(root_path, site or name, **options), out, require_report=info.reports)


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    _load_all()
    names = "\n".join(f"  {n:14s} {a.help}" for n, a in sorted(ADAPTERS.items()))
    parser = subparsers.add_parser(
        "prepare", help="turn a public dataset or a hospital export into a manifest",
        description=f"datasets:\n{names}", formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", help="one of the datasets above")
    parser.add_argument("--root", required=True, help="the dataset's top folder, as released")
    parser.add_argument("--out", required=True, help="folder for manifest.jsonl and problems.csv")
    parser.add_argument("--site", default="", help="site name written into every row (default: the dataset)")
    parser.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE",
                        help="dataset option (repeat), e.g. --opt views=all")
    parser.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    options = {}
    for item in args.opt:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--opt {item!r} is not KEY=VALUE")
        options[key.replace("-", "_")] = value
    result = prepare_dataset(args.dataset, args.root, args.out, args.site, **options)
    print(result.summary())
    return 0
