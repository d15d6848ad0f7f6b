"""``medunic client ...``: what a hospital site runs: make its ``keygen`` key pair, ``check``
its data, print the ``app-hash`` it allows, write its site config and service unit
(``init``), ``start`` its daemon."""

from __future__ import annotations

import argparse

from client.check import add_check_parser
from client.daemon import add_app_hash_parser, add_init_parser, add_start_parser
from client.keys import add_keygen_parser


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("client", help="hospital site: key pair, data check, site daemon")
    commands = parser.add_subparsers(dest="client_command", required=True)
    add_keygen_parser(commands)
    add_check_parser(commands)
    add_app_hash_parser(commands)
    add_init_parser(commands)
    add_start_parser(commands)
