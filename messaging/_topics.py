"""The topic scheme both sides agree on."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DEFAULT_TOPIC_PREFIX", "Topics"]

DEFAULT_TOPIC_PREFIX = "fogline/v1"


def _check_segment(value: str, what: str) -> None:
    if not value or any(ch in value for ch in "/+#\x00"):
        raise ValueError(f"{what} {value!r} must be non-empty and contain no '/', '+', '#' or NUL")


@dataclass(frozen=True)
class Topics:
    """The topic scheme: ``<prefix>/<site>/features``, ``<prefix>/<site>/results`` and
    ``<prefix>/<site>/sync`` (a retained nudge: the site's desired state changed)."""

    prefix: str = DEFAULT_TOPIC_PREFIX

    def __post_init__(self) -> None:
        if not self.prefix or self.prefix.endswith("/") or any(c in self.prefix for c in "+#"):
            raise ValueError(f"topic prefix {self.prefix!r} must be non-empty, no wildcards")

    def features(self, site: str) -> str:
        _check_segment(site, "site")
        return f"{self.prefix}/{site}/features"

    def results(self, site: str) -> str:
        _check_segment(site, "site")
        return f"{self.prefix}/{site}/results"

    def sync(self, site: str) -> str:
        _check_segment(site, "site")
        return f"{self.prefix}/{site}/sync"

    def all_features(self, share_group: str | None = None) -> str:
        """Subscription filter for every site's features, shared when a group is given."""
        topic = f"{self.prefix}/+/features"
        if share_group:
            _check_segment(share_group, "share group")
            return f"$share/{share_group}/{topic}"
        return topic

    def site_of(self, topic: str) -> str:
        """The site segment of a features or results topic."""
        head = self.prefix + "/"
        if not topic.startswith(head):
            raise ValueError(f"topic {topic!r} is not under prefix {self.prefix!r}")
        rest = topic[len(head) :].split("/")
        if len(rest) != 2 or not rest[0]:
            raise ValueError(f"topic {topic!r} does not name a site")
        return rest[0]
