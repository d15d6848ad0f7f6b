"""``medunic client ...``: what a hospital site runs (``check`` now; the daemon next)."""

from __future__ import annotations

import argparse

from client.check import add_check_parser


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("client", help="hospital site tools: validate data before joining")
    commands = parser.add_subparsers(dest="client_command", required=True)
    add_check_parser(commands)
