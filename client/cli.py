"""``medunic client ...``: what a hospital site runs: ``check`` its data, ``start`` its daemon."""

from __future__ import annotations

import argparse

from client.check import add_check_parser
from client.daemon import add_start_parser


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("client", help="hospital site: validate data (check), run the site daemon (start)")
    commands = parser.add_subparsers(dest="client_command", required=True)
    add_check_parser(commands)
    add_start_parser(commands)
