"""Who is who in a federation: node id -> site name and language community (a site whose
reports come in both languages is one site of ``en+es``, medunic_core.data.language).

A site's name and community are not taken from its replies. In a deployment the
coordinator registers each site's public key (``medunic server register KEY --name
--language``); Flower gives the key a node id, and :class:`SiteRegistry` keeps node id ->
(name, language) in ``<state>/sites.json``. Only the holder of that key can act as that
node (SuperNode authentication), so a reply's node id says who sent it.

In a simulation every node is local and there is no registry: a node's first valid
reply binds its (name, community) for the rest of the run. Either way
:class:`SiteIdentities` refuses a reply whose claimed identity differs from the bound one,
a name that another node holds, and a community the run does not have.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from medunic_core.data.language import site_language, site_languages
from medunic_core.errors import ConfigError
from medunic_core.federation.replies import InvalidReply
from medunic_core.keyfiles import key_fingerprint

REGISTRY_FILE = "sites.json"


@dataclass(frozen=True)
class RegisteredSite:
    node_id: int
    name: str
    language: str
    key_sha256: str


class SiteRegistry:
    """The coordinator's record of registered sites (``<state>/sites.json``)."""

    def __init__(self, path: Path, sites: dict[int, RegisteredSite]) -> None:
        self.path, self.sites = path, sites

    @classmethod
    def load(cls, path: Path) -> "SiteRegistry":
        if not path.exists():
            return cls(path, {})
        try:
            raw = json.loads(path.read_text())
            sites = {int(s["node_id"]): RegisteredSite(int(s["node_id"]), str(s["name"]), str(s["language"]),
                                                       str(s["key_sha256"])) for s in raw["sites"]}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{path} is not a site registry ({exc}); restore it from a backup") from None
        return cls(path, sites)

    def check_new(self, name: str, public_key: bytes) -> None:
        """Refuse a name or a key that is registered already."""
        digest = key_fingerprint(public_key)
        for site in self.sites.values():
            if site.name == name:
                raise ConfigError(f"site '{name}' is registered already (node {site.node_id}); unregister it first")
            if site.key_sha256 == digest:
                raise ConfigError(f"this key is registered already, as site '{site.name}' (node {site.node_id})")

    def add(self, node_id: int, name: str, language: str, public_key: bytes) -> None:
        self.sites[node_id] = RegisteredSite(node_id, name, language, key_fingerprint(public_key))

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"sites": [asdict(s) for s in sorted(self.sites.values(), key=lambda s: s.name)]},
                                  indent=1))
        os.replace(tmp, self.path)


class SiteIdentities:
    """Binds each node to one (site, community) for a run and checks every reply against it."""

    def __init__(self, communities: Sequence[str], registry: Optional[SiteRegistry] = None) -> None:
        self.communities = tuple(communities)
        self.registry = registry
        self.bound: dict[int, tuple[str, str]] = {}
        if registry is not None:
            self.bound = {n: (s.name, s.language) for n, s in registry.sites.items()}

    def name(self, node_id: int) -> str:
        return self.bound[node_id][0] if node_id in self.bound else f"node-{node_id}"

    def resolve(self, node_id: int, claimed: tuple[str, str]) -> tuple[str, str]:
        """The node's (site, community); raises :class:`InvalidReply` when the claim differs
        from what is known of the node, or names a community this run does not have."""
        if node_id in self.bound:
            if claimed != self.bound[node_id]:
                name, lang = self.bound[node_id]
                raise InvalidReply(f"node {node_id} is site '{name}' ({lang}) but its reply claims "
                                   f"'{claimed[0][:40]}' ({claimed[1][:10]})")
            return self.bound[node_id]
        if self.registry is not None:
            raise InvalidReply(f"node {node_id} is not in the site registry {self.registry.path}")
        name, community = claimed
        try:
            langs = site_languages(community)
        except ConfigError:
            langs = ()
        if not langs or not set(langs) <= set(self.communities) or community != site_language(community):
            raise InvalidReply(f"community '{community[:10]}' is not one of this run's {list(self.communities)} "
                               "(or several of them, joined by '+' in that order)")
        holder = next((n for n, (other, _) in self.bound.items() if other == name), None)
        if holder is not None:
            raise InvalidReply(f"site name '{name}' belongs to node {holder}")
        self.bound[node_id] = (name, community)
        return self.bound[node_id]


def site_identities(communities: Sequence[str], run_config: Mapping[str, Any]) -> SiteIdentities:
    """Node -> site bindings of a run: from the coordinator's site registry (run config
    ``registry``, set by ``medunic server run``) or, in a simulation, from first replies."""
    path = str(run_config.get("registry", "") or "")
    if not path:
        return SiteIdentities(communities)
    if not Path(path).is_file():
        raise ConfigError(f"run config registry={path}: no such site registry")
    return SiteIdentities(communities, SiteRegistry.load(Path(path)))
