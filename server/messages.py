"""The coordinator's side of the wire: Flower messages <-> plain data, and one broadcast.

- :func:`content_of`: a reply's records as :class:`~medunic_core.federation.replies.Content`
  (numpy arrays and plain values), decoding defensively: a record that cannot be decoded
  makes the reply invalid, never the coordinator fail;
- :func:`broadcast`: send one content to every node, wait for the replies, and hand each
  reply that is not an error to a check; what fails is logged with the site's name and the
  reason, and counted (:class:`Collected`), and the round goes on with the others.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Generic, Iterable, TypeVar

import numpy as np
from flwr.app import Array, ArrayRecord, Message
from flwr.serverapp import Grid

from medunic_core.federation.replies import Content, InvalidReply, check_identity
from server.registry import SiteIdentities

log = logging.getLogger("flwr.medunic")  # Flower's handlers: streamed by `flwr run --stream`

T = TypeVar("T")


def arrays_record(arrays: dict[str, np.ndarray], dtype=None) -> ArrayRecord:
    """An ArrayRecord of named arrays, optionally cast (fp16 on the wire)."""
    return ArrayRecord({k: Array.from_numpy_ndarray(np.ascontiguousarray(v if dtype is None else v.astype(dtype)))
                        for k, v in arrays.items()})


def record_arrays(record: ArrayRecord, dtype=None) -> dict[str, np.ndarray]:
    """Named numpy arrays of an ArrayRecord, optionally cast (fp32 before averaging)."""
    return {k: (v.numpy() if dtype is None else v.numpy().astype(dtype)) for k, v in record.items()}


def content_of(message: Message) -> Content:
    """A reply's records as plain data; :class:`InvalidReply` if any record cannot be decoded."""
    try:
        rd = message.content
        return Content(
            arrays={str(name): record_arrays(rec) for name, rec in rd.array_records.items()},
            metrics={str(name): dict(rec) for name, rec in rd.metric_records.items()},
            configs={str(name): dict(rec) for name, rec in rd.config_records.items()},
        )
    except InvalidReply:
        raise
    except Exception as exc:  # noqa: BLE001 -- whatever a crafted record raises, it is the reply's fault
        raise InvalidReply(f"records cannot be decoded ({type(exc).__name__}: {str(exc)[:100]})") from None


@dataclass
class Collected(Generic[T]):
    """The outcome of one exchange with the sites."""

    accepted: dict[str, T] = field(default_factory=dict)  # site -> what its check returned
    communities: dict[str, str] = field(default_factory=dict)  # site -> community
    nodes: dict[str, int] = field(default_factory=dict)  # site -> node id
    invalid: dict[str, str] = field(default_factory=dict)  # site -> why its reply was rejected
    failed: dict[str, str] = field(default_factory=dict)  # site -> error or "no reply"


def collect(replies: Iterable[Message], sent_to: Iterable[int], identities: SiteIdentities,
            check: Callable[[Content, str], T], what: str) -> Collected[T]:
    """Validate the replies to messages sent to ``sent_to``: each node once, its identity
    bound (``identities``), its content checked by ``check(content, community)``. An error
    reply may come from the SuperLink (a lost node), so the nodes without a usable reply are
    named from ``sent_to``, with the errors that came back."""
    out: Collected[T] = Collected()
    expected = list(sent_to)
    answered: set[int] = set()
    errors: list[str] = []
    for reply in replies:
        if reply.has_error():
            errors.append(reply.error.reason[:300])
            continue
        node = reply.metadata.src_node_id
        name = identities.name(node)
        try:
            if node not in expected or node in answered:
                raise InvalidReply(f"node {node} was not asked, or answered twice")
            answered.add(node)
            content = content_of(reply)
            name, community = identities.resolve(node, check_identity(content))
            out.accepted[name] = check(content, community)
            out.communities[name], out.nodes[name] = community, node
        except InvalidReply as exc:
            out.invalid[name] = str(exc)
            log.warning("%s: reply of %s rejected: %s", what, name, exc)
    reason = "; ".join(errors) or "no reply before fed.round_timeout"
    out.failed = {identities.name(node): reason for node in expected if node not in answered}
    if out.failed:
        log.warning("%s: no update from %s (%s)", what, ", ".join(out.failed), reason)
    return out


def broadcast(grid: Grid, nodes: Iterable[int], content, message_type: str, timeout: float,
              identities: SiteIdentities, check: Callable[[Content, str], T], what: str) -> Collected[T]:
    """Send ``content`` (one RecordDict for all) to every node and :func:`collect` the replies."""
    nodes = list(nodes)
    messages = [Message(content=content, message_type=message_type, dst_node_id=n) for n in nodes]
    return collect(grid.send_and_receive(messages, timeout=timeout), nodes, identities, check, what)
