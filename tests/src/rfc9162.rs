//! A second, independent checker of the audit log's proofs and checkpoints,
//! written from RFC 6962 / RFC 9162 and the C2SP signed-note text with
//! `ring` for hashing and signatures: none of it shares code with the audit
//! service, so a bug there cannot make its own proofs look right here.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use ring::digest::{SHA256, digest};

/// A SHA-256 hash.
pub type H = [u8; 32];

/// SHA-256 of the concatenated parts.
pub fn sha(parts: &[&[u8]]) -> H {
    let joined: Vec<u8> = parts.concat();
    let mut out = [0u8; 32];
    out.copy_from_slice(digest(&SHA256, &joined).as_ref());
    out
}

/// A leaf's hash: SHA-256(0x00 || data).
pub fn leaf(data: &[u8]) -> H {
    sha(&[&[0], data])
}

/// An interior node's hash: SHA-256(0x01 || left || right).
pub fn node(l: &[u8], r: &[u8]) -> H {
    sha(&[&[1], l, r])
}

/// MTH by the RFC's recursive definition.
pub fn mth(leaves: &[H]) -> H {
    match leaves.len() {
        0 => sha(&[]),
        1 => leaves[0],
        n => {
            let mut k = 1;
            while k * 2 < n {
                k *= 2;
            }
            node(&mth(&leaves[..k]), &mth(&leaves[k..]))
        }
    }
}

/// RFC 9162 section 2.1.3.2: whether `path` proves `leaf_hash` at `index`
/// in the tree of `size` leaves with `root`.
pub fn verify_inclusion(index: u64, size: u64, leaf_hash: &H, path: &[H], root: &H) -> bool {
    if index >= size {
        return false;
    }
    let (mut f, mut s, mut r) = (index, size - 1, *leaf_hash);
    for p in path {
        if s == 0 {
            return false;
        }
        if f & 1 == 1 || f == s {
            r = node(p, &r);
            while f & 1 == 0 && f != 0 {
                f >>= 1;
                s >>= 1;
            }
        } else {
            r = node(&r, p);
        }
        f >>= 1;
        s >>= 1;
    }
    s == 0 && r == *root
}

/// RFC 9162 section 2.1.4.2: whether `proof` shows the tree of `first`
/// leaves with `first_root` is a prefix of the tree of `second` with `second_root`.
pub fn verify_consistency(first: u64, second: u64, first_root: &H, second_root: &H, proof: &[H]) -> bool {
    if first == second {
        return proof.is_empty() && first_root == second_root;
    }
    if first == 0 || first > second || (proof.is_empty() && !first.is_power_of_two()) {
        return false;
    }
    let mut path: Vec<H> = proof.to_vec();
    if first.is_power_of_two() {
        path.insert(0, *first_root);
    }
    let (mut f, mut s) = (first - 1, second - 1);
    while f & 1 == 1 {
        f >>= 1;
        s >>= 1;
    }
    let (mut fr, mut sr) = (path[0], path[0]);
    for c in &path[1..] {
        if s == 0 {
            return false;
        }
        if f & 1 == 1 || f == s {
            fr = node(c, &fr);
            sr = node(c, &sr);
            while f & 1 == 0 && f != 0 {
                f >>= 1;
                s >>= 1;
            }
        } else {
            sr = node(&sr, c);
        }
        f >>= 1;
        s >>= 1;
    }
    fr == *first_root && sr == *second_root && s == 0
}

/// A signature line: the key name and the decoded signature bytes.
pub type SignatureLine = (String, Vec<u8>);

/// A signed note split as a note verifier splits it: the text (with its
/// final newline) and each signature line's key name and decoded bytes.
pub fn note_parts(note: &str) -> Option<(String, Vec<SignatureLine>)> {
    let (text, sigs) = note.split_once("\n\n")?;
    let sigs = sigs
        .lines()
        .map(|l| {
            let rest = l.strip_prefix("\u{2014} ")?;
            let (name, b64) = rest.split_once(' ')?;
            Some((name.to_owned(), STANDARD.decode(b64).ok()?))
        })
        .collect::<Option<Vec<_>>>()?;
    Some((format!("{text}\n"), sigs))
}

/// Whether `note` is a checkpoint of `origin` at `size` with `root`, signed
/// (plain Ed25519 note signature) by the key in `verifier_key`
/// (`name+id+base64(0x01 || key)`).
pub fn checkpoint_verifies(note: &str, verifier_key: &str, origin: &str, size: u64, root: &H) -> bool {
    let mut parts = verifier_key.splitn(3, '+');
    let (Some(name), Some(id_hex), Some(material)) = (parts.next(), parts.next(), parts.next()) else {
        return false;
    };
    let Ok(material) = STANDARD.decode(material) else {
        return false;
    };
    let Some((&0x01, public)) = material.split_first() else {
        return false;
    };
    let id = sha(&[name.as_bytes(), b"\n", &[0x01], public]);
    let id_text: String = id[..4].iter().map(|b| format!("{b:02x}")).collect();
    let Some((text, sigs)) = note_parts(note) else {
        return false;
    };
    let body = format!("{origin}\n{size}\n{}\n", STANDARD.encode(root));
    let verifier = ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, public);
    id_text == id_hex
        && name == origin
        && text == body
        && sigs.iter().any(|(n, sig)| {
            n == name && sig.len() == 68 && sig[..4] == id[..4] && verifier.verify(text.as_bytes(), &sig[4..]).is_ok()
        })
}
