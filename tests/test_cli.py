"""The ``hashfed`` CLI, run in-process: admin commands on a data dir, member commands on a live hub."""

from __future__ import annotations

import asyncio
import io
import json
import stat
from pathlib import Path

import pytest
from aiohttp.test_utils import TestServer

from federation.cli import main
from federation.cli_output import Progress, format_table, short_hash
from federation.config import DataDir
from federation.keys import SignerKey, VerifierKey, write_signer_file
from tests.conftest import COLLECTION, Federation

PDQ_HASH = "f8f8f0cce0f4e84d0e370a22028f67f0b36e2ed596623e1d33e6339c4e9c9b22"
NEAR_PDQ = "f8f8f0cce0f4e84d0e370a22028f67f0b36e2ed596623e1d33e6339c4e9c9b25"  # 3 bits away (2 ^ 5 = 0b111)
OTHER_PDQ = "b0a10efd71cc3f429413d48d0ffffe12e34e0e17ada952a9d29684210aa9e5af"
MD5_HASH = "d41d8cd98f00b204e9800998ecf8427e"


@pytest.fixture(autouse=True)
def _no_env_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HASHFED_HUB", raising=False)
    monkeypatch.delenv("HASHFED_KEY", raising=False)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


async def run_async(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """main() calls asyncio.run, so run it in a thread while the test's loop serves the hub."""
    code = await asyncio.to_thread(main, list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# ---- keygen ---------------------------------------------------------------


def test_keygen_writes_private_key_and_prints_verifier(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    code, out, _ = run(capsys, "keygen", "acme")
    assert code == 0
    key_file = tmp_path / "acme.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    signer = SignerKey.parse(key_file.read_text())
    assert out.strip() == signer.verifier.encode()
    assert VerifierKey.parse(out).name == "acme"
    assert (tmp_path / "acme.pub").read_text().strip() == out.strip()


def test_keygen_refuses_to_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_file = tmp_path / "keys" / "beta.key"
    assert run(capsys, "keygen", "beta", "--out", str(out_file))[0] == 0
    before = out_file.read_text()
    code, out, err = run(capsys, "keygen", "beta", "--out", str(out_file))
    assert code == 2
    assert out == ""
    assert "already exists" in err and err.count("\n") == 1
    assert out_file.read_text() == before


def test_keygen_rejects_bad_name_without_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(capsys, "keygen", "no spaces", "--out", str(tmp_path / "x.key"))
    assert code == 2
    assert "is not valid" in err and "Traceback" not in err
    assert not (tmp_path / "x.key").exists()


# ---- init, members, collections -------------------------------------------


@pytest.fixture
def hub_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    path = tmp_path / "hub"
    assert main(["init", str(path), "--name", "hub1", "--federation", "fed", "--collection", "csam"]) == 0
    capsys.readouterr()
    return path


def test_init_prints_hub_verifier_key_last(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "data"
    code, out, _ = run(
        capsys, "init", str(path), "--name", "hub1", "--federation", "fed", "--collection", "csam"
    )
    assert code == 0
    last = out.strip().splitlines()[-1]
    assert VerifierKey.parse(last) == DataDir(path).signer().verifier
    assert "csam" in out
    code, _, err = run(
        capsys, "init", str(path), "--name", "hub1", "--federation", "fed", "--collection", "csam"
    )
    assert code == 2
    assert "already a hub data directory" in err


def test_member_grant_list_revoke(hub_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    acme = SignerKey.generate("acme")
    beta = SignerKey.generate("beta")
    pub = tmp_path / "beta.pub"
    pub.write_text(beta.verifier.encode() + "\n")

    code, out, _ = run(
        capsys, "member", "grant", str(hub_dir), "--collection", "csam", "--key", acme.verifier.encode(),
        "--rights", "read,write",
    )  # fmt: skip
    assert code == 0 and acme.verifier.key_id in out and "log index 1" in out
    code, out, _ = run(
        capsys, "member", "grant", str(hub_dir), "--collection", "csam", "--key", str(pub), "--rights", "read"
    )
    assert code == 0 and beta.verifier.key_id in out

    code, out, _ = run(capsys, "member", "list", str(hub_dir))
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == [
        "COLLECTION",
        "MEMBER",
        "KEY",
        "ID",
        "RIGHTS",
        "GRANTED",
        "AT",
        "REVOKED",
        "AT",
    ]
    assert lines[1].split() == ["csam", "acme", acme.verifier.key_id, "read,write", "1", "-"]
    assert lines[2].split() == ["csam", "beta", beta.verifier.key_id, "read", "2", "-"]

    code, out, _ = run(capsys, "member", "revoke", str(hub_dir), "--collection", "csam", "--key", beta.key_id)
    assert code == 0 and "log index 3" in out
    _, out, _ = run(capsys, "member", "list", str(hub_dir))
    assert out.splitlines()[2].split() == ["csam", "beta", beta.verifier.key_id, "read", "2", "3"]

    # revoking again and re-granting a revoked key are refusals: exit 1, one line
    code, _, err = run(capsys, "member", "revoke", str(hub_dir), "--collection", "csam", "--key", beta.key_id)
    assert code == 1 and "not an active key" in err and err.count("\n") == 1
    code, _, err = run(
        capsys, "member", "grant", str(hub_dir), "--collection", "csam", "--key", str(pub), "--rights", "read"
    )
    assert code == 1 and "cannot be granted again" in err


def test_member_grant_takes_keys_whose_base64_holds_plus_and_slash(
    hub_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = next(
        k.verifier
        for k in (SignerKey.generate("acme") for _ in range(1000))
        if "+" in k.verifier.encode().split("+", 2)[2] and "/" in k.verifier.encode()
    )
    code, out, err = run(
        capsys,
        "member",
        "grant",
        str(hub_dir),
        "--collection",
        "csam",
        "--key",
        key.encode(),
        "--rights",
        "read",
    )
    assert code == 0, err
    assert f"granted {key.key_id} read" in out
    code, out, err = run(
        capsys, "member", "revoke", str(hub_dir), "--collection", "csam", "--key", key.encode()
    )
    assert code == 0 and f"revoked {key.key_id}" in out, err


def test_member_grant_input_errors(hub_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key = SignerKey.generate("acme").verifier.encode()
    code, _, err = run(
        capsys, "member", "grant", str(hub_dir), "--collection", "nope", "--key", key, "--rights", "read"
    )
    assert code == 2 and "no collection named 'nope'" in err
    code, _, err = run(
        capsys, "member", "grant", str(hub_dir), "--collection", "csam", "--key", key, "--rights", "admin"
    )
    assert code == 2 and "--rights" in err
    code, _, err = run(
        capsys,
        "member",
        "grant",
        str(hub_dir),
        "--collection",
        "csam",
        "--key",
        "missing.pub",
        "--rights",
        "read",
    )
    assert code == 2 and "neither a verifier key nor an existing .pub file" in err
    code, _, err = run(capsys, "member", "list", str(hub_dir.parent / "elsewhere"))
    assert code == 2 and "hashfed init" in err


def test_collection_add_and_grant_on_it(hub_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "collection", "add", str(hub_dir), "terror")
    assert code == 0 and "created collection terror (log index 0)" in out
    key = SignerKey.generate("acme").verifier
    assert (
        run(
            capsys,
            "member",
            "grant",
            str(hub_dir),
            "--collection",
            "terror",
            "--key",
            key.encode(),
            "--rights",
            "read",
        )[0]
        == 0
    )
    _, out, _ = run(capsys, "member", "list", str(hub_dir), "--collection", "terror")
    assert [line.split()[:3] for line in out.splitlines()[1:]] == [["terror", "acme", key.key_id]]
    code, _, err = run(capsys, "collection", "add", str(hub_dir), "terror")
    assert code == 2 and "terror" in err


def test_rebuild_prints_one_line_per_collection(hub_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "collection", "add", str(hub_dir), "terror")[0] == 0
    code, out, _ = run(capsys, "rebuild", str(hub_dir))
    assert code == 0
    assert sorted(out.splitlines()) == ["csam: replayed 1 log entries", "terror: replayed 1 log entries"]


def test_usage_errors_are_one_line_with_status_2(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "submit", "--collection", "main", "x.txt")
    assert code == 2 and err.strip() == "hashfed: error: no hub given: use --hub URL or set HASHFED_HUB"
    code, _, err = run(capsys, "lookup", "--max-distance", "64", "x")
    assert code == 2 and "64 is not between 0 and 63" in err and err.count("\n") == 1
    assert run(capsys, "submit", "--batch-size", "100001", "--collection", "c", "f")[0] == 2
    code, out, _ = run(capsys, "--version")
    assert code == 0 and out.startswith("hashfed ")


def test_help_teaches_with_examples(capsys: pytest.CaptureFixture[str]) -> None:
    for command in (
        ["submit"],
        ["lookup"],
        ["opinion"],
        ["member", "grant"],
        ["init"],
        ["keygen"],
        ["serve"],
    ):
        code, out, _ = run(capsys, *command, "--help")
        assert code == 0
        assert "examples:" in out and f"hashfed {' '.join(command)}" in out.split("examples:")[1]


def test_demo_help_delegates_to_the_demo_module(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "demo", "--help")
    assert code == 0 and "usage: hashfed demo" in out


def test_group_readable_signer_key_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key_file = tmp_path / "acme.key"
    write_signer_file(SignerKey.generate("acme"), key_file)
    key_file.chmod(0o640)
    hashes = tmp_path / "h.txt"
    hashes.write_text(MD5_HASH + "\n")
    code, _, err = run(
        capsys,
        "submit",
        "--hub",
        "http://127.0.0.1:9",
        "--key",
        str(key_file),
        "--collection",
        "main",
        str(hashes),
    )
    assert code == 2 and f"chmod 600 {key_file}" in err


def test_bad_input_is_refused_before_contacting_the_hub(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    hashes = tmp_path / "h.txt"
    hashes.write_text(f"{MD5_HASH}\n{PDQ_HASH}\n")
    # the hub URL is unreachable and the key file missing: the input error must come first
    code, _, err = run(
        capsys,
        "submit",
        "--hub",
        "http://127.0.0.1:9",
        "--key",
        "missing.key",
        "--collection",
        "main",
        str(hashes),
    )
    assert code == 2 and f"{hashes}:2: a 64-digit hash may be pdq or sha256" in err
    code, _, err = run(capsys, "lookup", "--hub", "http://127.0.0.1:9", "--key", "missing.key", PDQ_HASH)
    assert code == 2 and "hash argument 1" in err and "--type" in err
    code, _, err = run(
        capsys, "submit", "--hub", "http://h", "--key", "k", "--collection", "c", str(tmp_path / "no")
    )
    assert code == 2 and "No such file or directory" in err


def test_dash_reads_stdin(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{MD5_HASH}\nmd5:xyz\n"))
    code, _, err = run(
        capsys, "submit", "--hub", "http://127.0.0.1:9", "--key", "k", "--collection", "c", "-"
    )
    assert code == 2 and "<stdin>:2: md5 hash must be 32 hex digits" in err


# ---- output helpers -------------------------------------------------------


def test_progress_on_a_terminal_redraws_one_line() -> None:
    stream = io.StringIO()
    clock = iter([0.0, 2.0, 4.0]).__next__
    progress = Progress(100, stream, tty=True, clock=clock, width=10)
    progress.update(50, 1, 2)
    progress.update(100, 2, 2)
    progress.finish()
    text = stream.getvalue()
    assert text.startswith("\r[#####.....] 50/100 hashes (50%)  batch 1/2  25/s")
    assert "\r[##########] 100/100 hashes (100%)  batch 2/2  25/s" in text
    assert text.endswith("\n") and text.count("\n") == 1


def test_progress_elsewhere_prints_periodic_lines() -> None:
    stream = io.StringIO()
    times = iter([0.0, 1.0, 1.0, 6.0, 6.0, 6.0, 7.0, 7.0])
    progress = Progress(30, stream, tty=False, clock=lambda: next(times), interval=5.0)
    progress.update(10, 1, 3)  # 1 s in: too soon for a line
    progress.update(20, 2, 3)  # 6 s in: a line
    progress.update(30, 3, 3)  # done: always a line
    progress.finish()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2 and "\r" not in stream.getvalue()
    assert lines[0].startswith("sent 20/30 hashes (67%)  batch 2/3")
    assert lines[1].startswith("sent 30/30 hashes (100%)  batch 3/3")


def test_table_and_short_hash() -> None:
    assert short_hash(PDQ_HASH) == "f8f8f0cc…9b22"
    assert short_hash(PDQ_HASH, wide=True) == PDQ_HASH
    assert format_table(["A", "BB"], [["xyz", "1"], ["q", ""]]).splitlines() == ["A    BB", "xyz  1", "q"]


# ---- member commands against a live hub -------------------------------------


@pytest.fixture
def key_files(federation: Federation, tmp_path: Path) -> dict[str, Path]:
    files = {}
    for name, key in federation.members.items():
        files[name] = tmp_path / f"{name}.key"
        write_signer_file(key, files[name])
    return files


async def test_submit_lookup_opinion_remove_end_to_end(
    hub_server: TestServer, key_files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = str(hub_server.make_url(""))
    csv_file = tmp_path / "export.csv"
    csv_file.write_text(f"hash,type,labels,quality\n{PDQ_HASH},pdq,csam,90\n{MD5_HASH},md5,csam|video,\n")
    lines_file = tmp_path / "more.txt"
    lines_file.write_text(f"# more\n{OTHER_PDQ}\nmd5:{MD5_HASH.upper()}\n")
    member = ["--hub", url, "--key", str(key_files["acme"])]

    code, out, err = await run_async(
        capsys, "submit", *member, "--collection", COLLECTION, "--type", "pdq", "--label", "shared",
        "--batch-size", "2", str(csv_file), str(lines_file),
    )  # fmt: skip
    assert code == 0, err
    # 3 distinct hashes (the md5 appears twice): 2 batches after the membership entries 0 and 1
    assert out.strip() == "submitted 3 hashes to collection main in 2 batches (log indexes 2-3)"
    assert "sent 3/3 hashes" in err  # stderr is not a terminal: plain progress lines

    reader = ["--hub", url, "--key", str(key_files["reader"])]
    code, out, err = await run_async(
        capsys, "lookup", *reader, "--json", f"pdq:{NEAR_PDQ}", MD5_HASH, "sha256:" + "0" * 64
    )
    assert code == 0, err
    answer = json.loads(out)
    assert [a["query"] for a in answer] == [
        {"type": "pdq", "hash": NEAR_PDQ},
        {"type": "md5", "hash": MD5_HASH},
        {"type": "sha256", "hash": "0" * 64},
    ]
    near = answer[0]["matches"]
    assert [(m["hash"], m["distance"], m["submitters"]) for m in near] == [(PDQ_HASH, 3, ["acme"])]
    assert near[0]["labels"] == ["csam", "shared"]
    assert answer[1]["matches"][0]["labels"] == ["csam", "shared", "video"]
    assert answer[2]["matches"] == []

    code, _, err = await run_async(
        capsys, "opinion", *reader, "--collection", COLLECTION, "--verdict", "negative", "--note", "stock photo",
        f"pdq:{PDQ_HASH}",
    )  # fmt: skip
    assert code == 0, err

    queries = tmp_path / "queries.txt"
    queries.write_text(f"{PDQ_HASH}\n{OTHER_PDQ}\n")
    code, out, err = await run_async(
        capsys, "lookup", *reader, "--type", "pdq", "--file", str(queries), "--max-distance", "0"
    )
    assert code == 0, err
    rows = [line.split() for line in out.splitlines()]
    assert rows[0] == ["QUERY", "MATCH", "DISTANCE", "COLLECTION", "SUBMITTERS", "LABELS", "OPINIONS"]
    assert rows[1] == ["pdq:f8f8f0cc…9b22", "f8f8f0cc…9b22", "0", "main", "acme", "csam,shared", "+0/-1"]
    assert rows[2][:4] == ["pdq:b0a10efd…e5af", "b0a10efd…e5af", "0", "main"]
    assert rows[-1] == ["2", "queries,", "2", "matched"]

    code, out, err = await run_async(
        capsys, "submit", *member, "--collection", COLLECTION, "--remove", "--type", "pdq", str(lines_file)
    )
    assert code == 0, err
    assert out.startswith("removed 2 hashes from collection main in 1 batch (log index 5)")
    code, out, _ = await run_async(capsys, "lookup", *reader, MD5_HASH, "--wide")
    assert code == 0
    assert out.splitlines()[1].split() == [f"md5:{MD5_HASH}", "no", "match", "-", "-", "-", "-", "-"]


async def test_hub_refusals_exit_1(
    hub_server: TestServer, key_files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = str(hub_server.make_url(""))
    hashes = tmp_path / "h.txt"
    hashes.write_text(MD5_HASH + "\n")
    reader = ["--hub", url, "--key", str(key_files["reader"])]
    code, _, err = await run_async(capsys, "submit", *reader, "--collection", COLLECTION, str(hashes))
    assert code == 1
    assert "lacks the 'write' right" in err and "batch 1 of 1" in err and err.count("\n") == 1
    code, _, err = await run_async(capsys, "submit", *reader, "--collection", "nope", str(hashes))
    assert code == 1 and "no collection 'nope'" in err
    code, _, err = await run_async(
        capsys, "lookup", "--hub", url, "--key", str(key_files["outsider"]), MD5_HASH
    )
    assert code == 1 and "hashfed member grant" in err
    acme = ["--hub", url, "--key", str(key_files["acme"])]
    code, _, err = await run_async(
        capsys, "submit", *acme, "--collection", COLLECTION, "--remove", str(hashes)
    )
    assert code == 1 and "does not list md5 hash" in err


async def test_serving_hub_honours_a_cli_grant_at_once(
    hub_server: TestServer, federation: Federation, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = str(hub_server.make_url(""))
    key_file = tmp_path / "gamma.key"
    code, out, _ = run(capsys, "keygen", "gamma", "--out", str(key_file))
    assert code == 0
    gamma = ["--hub", url, "--key", str(key_file)]

    code, _, err = await run_async(capsys, "lookup", *gamma, MD5_HASH)
    assert code == 1 and "gamma+" in err

    code, _, err = await run_async(
        capsys, "member", "grant", str(federation.data.path), "--collection", COLLECTION,
        "--key", str(tmp_path / "gamma.pub"), "--rights", "read",
    )  # fmt: skip
    assert code == 0, err
    code, out, err = await run_async(capsys, "lookup", *gamma, MD5_HASH)
    assert code == 0, err
    assert "no match" in out
