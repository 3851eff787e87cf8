"""The worked examples in docs/protocol.md are exactly what the code produces."""

from __future__ import annotations

import ast
import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
KIND = re.compile(r"[a-z]+(-[a-z]+)*")
PROBLEM_TABLE_HEADER = "| `type` (after `urn:hashfed:problem:`) | status | meaning |"


def _load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("hashfed_docs_examples", DOCS / "examples.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def generator() -> ModuleType:
    return _load_generator()


@pytest.fixture(scope="module")
def generated(generator: ModuleType) -> dict[str, str]:
    return generator.generate()  # type: ignore[no-any-return]


def test_every_example_in_the_docs_matches_the_code(generator: ModuleType, generated: dict[str, str]) -> None:
    embedded = generator.embedded((DOCS / "protocol.md").read_text())
    unknown = sorted(set(embedded) - set(generated))
    assert not unknown, f"docs/protocol.md names examples the generator does not make: {unknown}"
    missing = sorted(set(generated) - set(embedded))
    assert not missing, f"examples not shown in docs/protocol.md: {missing}"
    stale = [name for name in generated if embedded[name] != generated[name]]
    assert not stale, (
        f"docs/protocol.md examples differ from the code: {stale}; "
        "check the change, then run `python docs/examples.py --write`"
    )


def test_examples_are_deterministic(generator: ModuleType, generated: dict[str, str]) -> None:
    again = {**generator.key_examples(), **generator.envelope_examples(), **generator.log_examples()}
    again.update(generator.http_signature_examples())
    assert {name: generated[name] for name in again} == again


def test_the_batch_envelope_example_is_accepted_by_the_parser(generator: ModuleType) -> None:
    from federation.envelope import Envelope

    text = generator.envelope_examples()["batch-envelope"]
    envelope = Envelope.parse(text.strip())
    assert envelope.verify(generator.ACME.verifier)
    assert envelope.canonical().decode() == text.strip()


def _problem_kinds_in_code() -> dict[str, set[int]]:
    """Every problem kind the hub can emit, with the statuses given with it literally."""
    kinds: dict[str, set[int]] = {}
    for path in sorted((ROOT / "federation").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            found: list[ast.AST] = []
            status: int | None = None
            if isinstance(node, ast.Call) and len(node.args) >= 2:
                callee = node.func
                name = callee.id if isinstance(callee, ast.Name) else getattr(callee, "attr", "")
                if name in (
                    "Problem",
                    "Refusal",
                    "problem_response",
                    "shed_response",
                    "_problem_body",
                    "__init__",
                ):
                    found.append(node.args[1])
                    first = node.args[0]
                    if isinstance(first, ast.Constant) and isinstance(first.value, int):
                        status = first.value
            elif isinstance(node, ast.Assign) and any(
                isinstance(target, ast.Name) and target.id == "kind" for target in node.targets
            ):
                found.append(node.value)
            elif isinstance(node, ast.FunctionDef) and node.name == "_kind_of":
                found.append(node)
            for expr in found:
                for sub in ast.walk(expr):
                    if (
                        isinstance(sub, ast.Constant)
                        and isinstance(sub.value, str)
                        and KIND.fullmatch(sub.value)
                    ):
                        statuses = kinds.setdefault(sub.value, set())
                        if status is not None:
                            statuses.add(status)
    return kinds


def _problem_kinds_in_docs() -> dict[str, str]:
    lines = (DOCS / "protocol.md").read_text().splitlines()
    start = lines.index(PROBLEM_TABLE_HEADER) + 2
    rows: dict[str, str] = {}
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        rows[cells[0].strip("`")] = cells[1]
    return rows


def test_the_problem_table_lists_every_kind_the_hub_emits() -> None:
    in_code = _problem_kinds_in_code()
    in_docs = _problem_kinds_in_docs()
    assert len(in_code) > 20, "the scan of federation/ for problem kinds found too few"
    assert sorted(set(in_code) - set(in_docs)) == [], "problem kinds missing from docs/protocol.md"
    assert sorted(set(in_docs) - set(in_code)) == [], "docs/protocol.md lists kinds the code never emits"
    for kind, statuses in in_code.items():
        for status in statuses:
            assert str(status) in in_docs[kind], (
                f"{kind}: the code answers {status}, the docs say {in_docs[kind]}"
            )
