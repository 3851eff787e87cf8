// Checks an entry's inclusion proof in the browser (RFC 6962), independently of the hub's own check.
"use strict";

function fromBase64(text) {
  return Uint8Array.from(atob(text), (c) => c.charCodeAt(0));
}

function join(...parts) {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const part of parts) {
    out.set(part, at);
    at += part.length;
  }
  return out;
}

async function sha256(bytes) {
  return new Uint8Array(await crypto.subtle.digest("SHA-256", bytes));
}

async function rootFromProof(leafData, index, size, proof) {
  let hash = await sha256(join(Uint8Array.of(0), leafData));
  let fn = index;
  let sn = size - 1;
  for (const sibling of proof) {
    if (sn === 0) return null;
    if (fn % 2 === 1 || fn === sn) {
      hash = await sha256(join(Uint8Array.of(1), sibling, hash));
      if (fn % 2 === 0) {
        while (fn !== 0 && fn % 2 === 0) {
          fn = Math.floor(fn / 2);
          sn = Math.floor(sn / 2);
        }
      }
    } else {
      hash = await sha256(join(Uint8Array.of(1), hash, sibling));
    }
    fn = Math.floor(fn / 2);
    sn = Math.floor(sn / 2);
  }
  return sn === 0 ? hash : null;
}

async function checkProof() {
  const data = document.getElementById("proof");
  const out = document.getElementById("proof-browser");
  if (!data || !out) return;
  if (!window.crypto || !crypto.subtle) {
    out.textContent = "cannot check here (this page is not in a secure context)";
    return;
  }
  const proof = data.dataset.hashes ? data.dataset.hashes.split(" ").map(fromBase64) : [];
  const root = await rootFromProof(fromBase64(data.dataset.leaf), Number(data.dataset.index), Number(data.dataset.size), proof);
  const expected = fromBase64(data.dataset.root);
  const ok = root !== null && root.length === expected.length && root.every((byte, i) => byte === expected[i]);
  out.textContent = ok ? "the proof verifies" : "the proof does NOT verify";
  out.className = ok ? "ok" : "error";
}

document.addEventListener("DOMContentLoaded", checkProof);
