"""Structured fields: the fast reading of the usual headers agrees with the full parser on every input."""

from __future__ import annotations

import base64

from hypothesis import example, given, settings
from hypothesis import strategies as st

from federation.sfv import Member, StructuredFieldError, _one_plain_member, _Parser, parse_dictionary

keys = st.sampled_from(["sig1", "sig", "sha-256", "a", "*x", "keyid", "created", "k_1.2-3", "Sig", "1a"])
plain = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=12)
strings = st.one_of(plain, st.just("ed25519"), st.just("client0+66c0a837"))


def _quoted(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


parameter_values = st.one_of(
    st.integers(-(10**16), 10**16).map(str),
    strings.map(_quoted),
    st.sampled_from(["?1", "?0", "ed25519", "1.5", ":AAA=:", ""]),
)
parameters = st.lists(
    st.tuples(keys, parameter_values).map(lambda kv: f";{kv[0]}={kv[1]}" if kv[1] else f";{kv[0]}"),
    max_size=5,
).map("".join)
separators = st.sampled_from([" ", " ", " ", "  ", ""])
components = st.lists(
    st.tuples(
        st.sampled_from(["@method", "@path", "@query", "content-digest", "x"]), st.sampled_from(["", ";req"])
    ),
    max_size=5,
)
inner_lists = st.builds(
    lambda items, gaps, params: (
        "("
        + "".join(gap + _quoted(name) + p for (name, p), gap in zip(items, gaps, strict=False))
        + ")"
        + params
    ),
    components,
    st.lists(separators, min_size=5, max_size=5).map(lambda gaps: ["", *gaps[1:]] if gaps else gaps),
    parameters,
)
byte_sequences = st.one_of(
    st.binary(max_size=70).map(lambda raw: ":" + base64.b64encode(raw).decode() + ":"),
    st.binary(max_size=70).map(lambda raw: ":" + base64.b64encode(raw).decode().rstrip("=") + ":"),
    st.sampled_from([":ab=:", ":a=bc:", ":YQ==:", ":Y:", "::", ":YQ=:", ":YQ"]),
)
members = st.builds(lambda key, value: f"{key}={value}", keys, st.one_of(inner_lists, byte_sequences))
headers = st.one_of(
    members,
    st.lists(members, min_size=2, max_size=3).map(", ".join),
    st.tuples(members, st.sampled_from([" ", ",", "\t", ")", ";", '"'])).map("".join),
)


def _full(text: str) -> dict[str, Member] | str:
    try:
        return _Parser("Signature-Input", text).dictionary()
    except StructuredFieldError as exc:
        return exc.detail


@settings(max_examples=3000)
@given(headers)
@example('sig1=("@method" "@path");created=1;keyid="k";alg="ed25519";nonce="n"')
@example("sig1=:ab=:")
@example('sig1=("@method");created=1;created=2')
@example('sig1=("@method");created=1234567890123456')
def test_the_fast_reading_gives_what_the_full_parser_gives(text: str) -> None:
    full = _full(text)
    fast = _one_plain_member(text)
    if fast is not None:
        assert fast == full
    try:
        assert parse_dictionary("Signature-Input", text) == full
    except StructuredFieldError as exc:
        assert exc.detail == full


def test_the_signature_headers_every_signer_sends_are_read_the_fast_way() -> None:
    signature_input = (
        'sig1=("@method" "@path" "@query" "content-digest");created=1796588404;'
        'keyid="client0+66c0a837";alg="ed25519";nonce="dKvgkD3dg8MCKkI_tt0ezw"'
    )
    assert _one_plain_member(signature_input) == _full(signature_input)
    signature = "sig1=:" + base64.b64encode(bytes(range(64))).decode() + ":"
    assert _one_plain_member(signature) == {"sig1": _full(signature)["sig1"]}  # type: ignore[index]
