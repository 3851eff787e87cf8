"""Reading hash lists: CSV and one-per-line inputs, type detection, labels, quality, merging."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

import pytest

from federation.envelope import Addition
from federation.hashfile import HashCollector, HashFileError, parse_hash, read_hash_items, read_text
from federation.signals import MD5, PDQ, SHA256, SignalError

PDQ_HASH = "f8f8f0cee0f4a84f06370a22038f63f0b36e2ed596621e1d33e6b39c4e9c9b22"
SHA_HASH = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
MD5_HASH = "d41d8cd98f00b204e9800998ecf8427e"


def test_one_hash_per_line_with_comments_blank_lines_and_type_prefixes() -> None:
    text = f"# exported 2026-01-01\n\n{MD5_HASH}\npdq:{PDQ_HASH}\n  sha256,{SHA_HASH}  \n# end\n"
    assert read_text(text) == [
        Addition("md5", MD5_HASH),
        Addition("pdq", PDQ_HASH),
        Addition("sha256", SHA_HASH),
    ]


def test_default_type_applies_to_bare_hashes_only() -> None:
    items = read_text(f"{PDQ_HASH}\nsha256:{SHA_HASH}\n", default_type="pdq")
    assert [(i.signal, i.hash) for i in items] == [("pdq", PDQ_HASH), ("sha256", SHA_HASH)]


def test_uppercase_hex_and_type_names_are_normalised() -> None:
    items = read_text(f"PDQ:{PDQ_HASH.upper()}\n{MD5_HASH.upper()}\n")
    assert items == [Addition("pdq", PDQ_HASH), Addition("md5", MD5_HASH)]


def test_csv_with_all_columns_and_extra_ones_ignored() -> None:
    text = (
        "Hash,Type,Labels,Quality,source\n"
        f"{PDQ_HASH},pdq,csam;sextortion,90,partner-a\n"
        f"{SHA_HASH},sha256,terror|violent ,,partner-b\n"
        f"{MD5_HASH},,,,\n"
    )
    assert read_text(text) == [
        Addition("pdq", PDQ_HASH, ("csam", "sextortion"), 90),
        Addition("sha256", SHA_HASH, ("terror", "violent")),
        Addition("md5", MD5_HASH),
    ]


def test_csv_with_hash_column_only_uses_default_type_and_command_line_labels() -> None:
    text = f"hash\n{PDQ_HASH}\n\n{PDQ_HASH[:-1]}0\n"
    items = read_text(text, default_type="pdq", labels=["ncii"])
    assert items == [Addition("pdq", PDQ_HASH, ("ncii",)), Addition("pdq", PDQ_HASH[:-1] + "0", ("ncii",))]


def test_csv_hash_column_may_carry_a_type_prefix_when_the_type_cell_is_empty() -> None:
    items = read_text(f"labels,hash\nx,pdq:{PDQ_HASH}\n")
    assert items == [Addition("pdq", PDQ_HASH, ("x",))]


def test_quoted_csv_fields_and_comment_rows() -> None:
    text = f'hash,labels\n# a comment row\n"{MD5_HASH}","a;b"\n'
    assert read_text(text) == [Addition("md5", MD5_HASH, ("a", "b"))]


def test_duplicates_are_merged_with_labels_unioned_and_highest_quality_kept() -> None:
    text = (
        f"hash,type,labels,quality\n{PDQ_HASH},pdq,a,60\n{PDQ_HASH.upper()},pdq,b;a,80\n{PDQ_HASH},pdq,c,\n"
    )
    assert read_text(text) == [Addition("pdq", PDQ_HASH, ("a", "b", "c"), 80)]


def test_same_hash_with_different_types_is_not_a_duplicate() -> None:
    items = read_text(f"pdq:{PDQ_HASH}\nsha256:{PDQ_HASH}\n")
    assert [i.signal for i in items] == ["pdq", "sha256"]


def test_ambiguous_64_digit_hash_is_refused_with_its_line_number() -> None:
    with pytest.raises(HashFileError) as caught:
        read_text(f"{MD5_HASH}\n# comment\n{PDQ_HASH}\n")
    message = str(caught.value)
    assert message.startswith("<text>:3: ")
    assert "--type" in message and "pdq:HASH" in message


def test_every_bad_line_is_counted_and_the_first_named() -> None:
    text = f"{MD5_HASH}\nnot-a-hash\n{MD5_HASH[:-1]}z\nfoo:{MD5_HASH}\n"
    with pytest.raises(HashFileError) as caught:
        read_text(text)
    error = caught.value
    assert [p.where for p in error.problems] == ["<text>:2", "<text>:3", "<text>:4"]
    assert "non-hex character 'z'" in error.problems[1].message
    assert "unknown signal type 'foo'" in error.problems[2].message
    assert str(error).endswith("(and 2 more problems)")


def test_wrong_length_for_the_given_type_names_the_line() -> None:
    with pytest.raises(HashFileError, match=r"^<text>:1: pdq hash must be 64 hex digits, got 32$"):
        read_text(f"{MD5_HASH}\n", default_type="pdq")


def test_csv_problems_name_the_file_line_including_after_multiline_fields(tmp_path: Path) -> None:
    path = tmp_path / "hashes.csv"
    path.write_text(
        f'hash,type,labels,quality\n{PDQ_HASH},pdq,"a\nb",90\n{PDQ_HASH[:-2]}00,pdq,,30\n,pdq,,\n'
    )
    with pytest.raises(HashFileError) as caught:
        read_hash_items(path)
    problems = caught.value.problems
    assert [p.where for p in problems] == [f"{path}:2", f"{path}:4", f"{path}:5"]
    assert "control character" in problems[0].message
    assert "below 50" in problems[1].message
    assert "the hash (or type-named) columns are empty" in problems[2].message


def test_quality_must_be_a_number_and_only_for_pdq() -> None:
    with pytest.raises(HashFileError, match="<text>:2: quality 'high' is not a whole number"):
        read_text(f"hash,type,quality\n{PDQ_HASH},pdq,high\n")
    with pytest.raises(HashFileError, match="<text>:2: quality does not apply to md5 hashes"):
        read_text(f"hash,quality\n{MD5_HASH},80\n")


def test_csv_row_with_more_fields_than_the_header_is_refused() -> None:
    with pytest.raises(HashFileError, match="<text>:2: 3 fields but the header on line 1 has 2"):
        read_text(f"hash,type\n{MD5_HASH},md5,extra\n")


def test_type_given_in_column_and_prefix_is_refused() -> None:
    with pytest.raises(HashFileError, match="type is given twice"):
        read_text(f"hash,type\npdq:{PDQ_HASH},pdq\n")


def test_too_many_labels_after_merging_is_refused_on_the_later_line() -> None:
    first = ";".join(f"a{n}" for n in range(20))
    second = ";".join(f"b{n}" for n in range(20))
    with pytest.raises(HashFileError, match=r"<text>:3: .* more than 32 labels"):
        read_text(f"hash,labels\n{MD5_HASH},{first}\n{MD5_HASH},{second}\n")


def test_bad_label_on_the_command_line_is_refused_before_reading() -> None:
    with pytest.raises(SignalError, match="longer than 128"):
        HashCollector(labels=["x" * 129])
    with pytest.raises(SignalError, match="unknown signal type"):
        HashCollector(default_type="sha3")


def test_file_with_bom_and_crlf_line_endings(tmp_path: Path) -> None:
    path = tmp_path / "excel.csv"
    path.write_bytes(f"\ufeffhash,type\r\n{SHA_HASH},sha256\r\n".encode())
    assert read_hash_items(str(path)) == [Addition("sha256", SHA_HASH)]


def test_non_utf8_file_is_refused_with_a_line(tmp_path: Path) -> None:
    path = tmp_path / "latin1.txt"
    path.write_bytes(MD5_HASH.encode() + b"\n\xff\xfe\n")
    with pytest.raises(HashFileError, match="not UTF-8"):
        read_hash_items(path)


def test_lines_from_an_iterable_are_named() -> None:
    with pytest.raises(HashFileError, match=r"^<stdin>:1: "):
        read_hash_items(["zz\n"], name="<stdin>")
    assert read_hash_items(iter([MD5_HASH + "\n"])) == [Addition("md5", MD5_HASH)]


def test_empty_input_gives_no_items() -> None:
    assert read_text("# nothing\n\n") == []


def test_parse_hash_forms() -> None:
    assert parse_hash(MD5_HASH) == (MD5, MD5_HASH)
    assert parse_hash(f"sha256:{SHA_HASH}") == (SHA256, SHA_HASH)
    assert parse_hash(PDQ_HASH, default_type="pdq") == (PDQ, PDQ_HASH)
    with pytest.raises(SignalError, match="hash is empty"):
        parse_hash("pdq:")


def test_csv_columns_named_after_types_each_give_a_hash(tmp_path: Path) -> None:
    """Hash-list exports with one column per type (an md5, a sha1 and a PhotoDNA per file)."""
    photodna = ",".join(str(n % 256) for n in range(144))
    sha1 = "a" * 40
    path = tmp_path / "export.csv"
    path.write_text(
        f'file,MD5,SHA1,PhotoDNA,labels\nx.jpg,{MD5_HASH},{sha1},"{photodna}",csam\ny.jpg,,{sha1},,\n'
    )
    items = read_hash_items(str(path))
    assert [(a.signal, a.hash, a.labels) for a in items] == [
        ("md5", MD5_HASH, ("csam",)),
        ("sha1", sha1, ("csam",)),
        ("photodna", bytes(range(144)).hex(), ("csam",)),
    ]
    path.write_text("file,md5\nz.jpg,\n")
    with pytest.raises(HashFileError, match=r"export\.csv:2: no hash in this row"):
        read_hash_items(str(path))


def test_a_bare_photodna_hash_in_any_form_is_recognised() -> None:
    vector = bytes(range(100, 244))
    for form in (vector.hex(), ",".join(map(str, vector)), base64.b64encode(vector).decode()):
        assert read_text(form + "\n") == [Addition("photodna", vector.hex())]
    assert read_text("sha1:" + "B" * 40 + "\n") == [Addition("sha1", "b" * 40)]
    assert read_text("c" * 40 + "\n") == [Addition("sha1", "c" * 40)]


def test_a_vpdq_json_file_is_one_video_with_its_identity(tmp_path: Path) -> None:
    frames = [f"{n:064x}" for n in range(1, 5)]
    lines = [f"{frames[0]},90,0.0", f"{frames[1]},70,1.0", f"{frames[0]},95,2.0", f"{frames[2]},10,3.0"]
    path = tmp_path / "clip.json"
    path.write_text(json.dumps(lines))
    (item,) = read_hash_items(str(path), labels=["propaganda"])
    good = sorted({frames[0], frames[1]})
    assert item.signal == "vpdq" and item.labels == ("propaganda",)
    assert item.hash == hashlib.sha256("".join(f + "\n" for f in good).encode()).hexdigest()
    assert item.frames is not None and [f.quality for f in item.frames] == [90, 70, 95, 10]
    path.write_text(json.dumps([f"{frames[0]},90"]))
    with pytest.raises(HashFileError, match=r"clip\.json: frame 1: expected 'pdqhex,quality,timestamp'"):
        read_hash_items(str(path))
    path.write_text(json.dumps([f"{frames[0]},20,0"]))
    with pytest.raises(HashFileError, match="no frame of quality 50"):
        read_hash_items(str(path))
