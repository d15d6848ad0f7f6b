"""A grid that delivers messages to the real ClientApp in this process (no Ray, no SuperLink)."""

from __future__ import annotations

from typing import Iterable

from flwr.app import Context, Message, RecordDict

from client.app import app as client_app


class InProcessGrid:
    """The two Grid calls our server uses, answered by the real ClientApp in-process.

    Node ``i`` is simulation partition ``i - 1``; each node keeps its Context (and so its
    ``state``) across rounds as Flower does. ``fail`` names nodes whose replies are errors.
    """

    def __init__(self, run_config: dict, num_nodes: int = 2) -> None:
        self.contexts = {
            n: Context(run_id=1, node_id=n, node_config={"partition-id": n - 1, "num-partitions": num_nodes},
                       state=RecordDict(), run_config=run_config)
            for n in range(1, num_nodes + 1)
        }
        self.sent: list[Message] = []

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def send_and_receive(self, messages: Iterable[Message], timeout: float | None = None) -> list[Message]:
        replies = []
        for msg in messages:
            self.sent.append(msg)
            replies.append(client_app(msg, self.contexts[msg.metadata.dst_node_id]))
        return replies
