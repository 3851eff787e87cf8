"""Index snapshots: a restart loads the large segment's codes and replays only the tail of the log."""

from __future__ import annotations

import json

import pytest

from federation.config import DataDir
from federation.hub import open_node
from federation.node import Node
from federation.signals import MD5, PDQ
from tests.conftest import Federation
from tests.helpers import batch_doc, envelope, flip, item, md5, node_lookup, pdq


def _submit(
    node: Node, federation: Federation, member: str, add: list[str] = (), remove: list[str] = ()
) -> None:  # type: ignore[assignment]
    doc = batch_doc(member, [item("pdq", h) for h in add], [("pdq", h) for h in remove])
    node.submit("main", envelope(federation.members[member], doc))


def _answers(node: Node, hashes: list[str]) -> list[list[tuple[str, int]]]:
    results = node_lookup(node, ["main"], [(PDQ, h) for h in hashes], 31)
    return [[(m.hash, m.distance) for m in matches] for matches in results]


def test_restart_loads_the_snapshot_and_replays_the_tail(
    federation: Federation, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = [pdq(seed) for seed in range(200)]
    later = [flip(pdq(1000 + seed), 3) for seed in range(20)]
    node = open_node(federation.data)
    node.load()
    _submit(node, federation, "acme", first)
    node.submit("main", envelope(federation.members["acme"], batch_doc("acme", [item("md5", md5(1))])))
    node.indexes.snapshot_all()
    snapshot_position = node.store.log_size("main")
    _submit(node, federation, "beta", later)
    _submit(node, federation, "acme", remove=first[:10])
    probes = first[:15] + later[:5] + [flip(first[20], 31), flip(first[21], 32)]
    expected = _answers(node, probes)
    node.store.close()
    assert expected[0] == [] and expected[10] == [(first[10], 0)] and expected[-2] and not expected[-1]

    reopened = open_node(DataDir(federation.data.path))
    asked: list[object] = []
    original = reopened.store.listed

    def spy(collection: str, signal: str | None = None) -> object:
        asked.append(signal)
        return original(collection, signal)

    monkeypatch.setattr(reopened.store, "listed", spy)
    reopened.load()
    assert PDQ.name not in asked and None not in asked  # PDQ came from the snapshot
    assert reopened.indexes.size("main")["pdq"] == 200 - 10 + 20
    assert _answers(reopened, probes) == expected
    assert [m.hash for m in node_lookup(reopened, ["main"], [(MD5, md5(1))], 0)[0]] == [md5(1)]
    assert snapshot_position < reopened.store.log_size("main")
    reopened.store.close()


def test_an_unusable_snapshot_is_ignored(federation: Federation) -> None:
    node = open_node(federation.data)
    node.load()
    _submit(node, federation, "acme", [pdq(1), pdq(2)])
    node.indexes.snapshot_all()
    node.store.close()
    for path in federation.data.index_dir.rglob("*.npy"):
        path.write_bytes(b"not an array")
    reopened = open_node(federation.data)
    reopened.load()
    assert _answers(reopened, [pdq(1)]) == [[(pdq(1), 0)]]
    reopened.store.close()


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("position", "log size"),
        ("count", 1),
        ("collection", "other"),
        ("format", 1),
        ("codes_sha256", "0" * 64),
    ],
)
def test_a_damaged_metadata_field_makes_the_snapshot_ignored(
    federation: Federation, field: str, value: object
) -> None:
    """A ``position`` moved forward would otherwise skip the listing changes after the real one."""
    node = open_node(federation.data)
    node.load()
    early = [pdq(seed) for seed in range(50)]
    later = [pdq(500 + seed) for seed in range(300)]
    _submit(node, federation, "acme", early)
    node.indexes.snapshot_all()
    _submit(node, federation, "beta", later)
    size = node.store.log_size("main")
    node.store.close()
    for meta_path in federation.data.index_dir.glob("main.*.json"):  # each type's snapshot alike
        meta = json.loads(meta_path.read_text())
        meta[field] = size if value == "log size" else value
        meta_path.write_text(json.dumps(meta))

    reopened = open_node(federation.data)
    reopened.load()
    assert reopened.indexes.size("main")["pdq"] == 350
    assert all(answer == [(h, 0)] for h, answer in zip(later, _answers(reopened, later), strict=True))
    reopened.store.close()
