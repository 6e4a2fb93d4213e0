//! RFC 6962 / RFC 9162 Merkle tree arithmetic, with no storage in it.
//!
//! The store keeps the hash of every *perfect* subtree (an aligned run of
//! 2^level leaves) once it is complete; every hash a proof needs is either
//! such a node or the hash of a right-edge range that starts on a boundary
//! aligned to its size, which is the right fold of the perfect subtrees
//! that make it up. So a proof is: the ranges RFC 9162 names, decomposed
//! into stored nodes, fetched in one query, folded back.

use sha2::{Digest, Sha256};

/// A SHA-256 hash.
pub type Hash = [u8; 32];

/// `SHA-256(0x00 || data)`: the hash of a leaf.
pub fn leaf_hash(data: &[u8]) -> Hash {
    let mut h = Sha256::new();
    h.update([0u8]);
    h.update(data);
    h.finalize().into()
}

/// `SHA-256(0x01 || left || right)`: the hash of an interior node.
pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut h = Sha256::new();
    h.update([1u8]);
    h.update(left);
    h.update(right);
    h.finalize().into()
}

/// The root of the empty tree: SHA-256 of the empty string.
pub fn empty_root() -> Hash {
    Sha256::digest(b"").into()
}

/// A perfect subtree: `2^level` leaves starting at `index << level`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId {
    /// Height above the leaves (0 = a leaf).
    pub level: u8,
    /// Position among the nodes of that level.
    pub index: u64,
}

/// A half-open run of leaves `[begin, end)`.
pub type Range = (u64, u64);

/// The largest power of two strictly below `n` (`n` ≥ 2).
fn split_point(n: u64) -> u64 {
    let k = 1u64 << (63 - (n - 1).leading_zeros());
    if k == n { k / 2 } else { k }
}

/// The perfect subtrees covering `[begin, end)`, left to right, each as
/// large as alignment allows.
pub fn decompose((begin, end): Range) -> Vec<NodeId> {
    let mut out = Vec::new();
    let mut at = begin;
    while at < end {
        let mut level = if at == 0 { 63 } else { at.trailing_zeros() };
        while level > 0 && (1u64 << level.min(63)) > end - at {
            level -= 1;
        }
        let size = 1u64 << level;
        out.push(NodeId {
            level: u8::try_from(level).unwrap_or(63),
            index: at >> level,
        });
        at += size;
    }
    out
}

/// The hash of a range from the hashes of its [`decompose`]d subtrees, in
/// the same order. Exact for the ranges RFC 9162 proofs use (and for
/// `[0, n)`): those start on a boundary aligned to their size, so the
/// subtrees shrink left to right and the RFC's split is a right fold.
pub fn fold(hashes: &[Hash]) -> Option<Hash> {
    let (last, rest) = hashes.split_last()?;
    Some(rest.iter().rev().fold(*last, |acc, h| node_hash(h, &acc)))
}

/// The ranges whose hashes make the inclusion proof of leaf `index` in the
/// tree of `size` leaves, bottom to top (RFC 9162 section 2.1.3.1).
pub fn inclusion_ranges(index: u64, size: u64) -> Vec<Range> {
    fn path(m: u64, begin: u64, end: u64, out: &mut Vec<Range>) {
        let n = end - begin;
        if n <= 1 {
            return;
        }
        let k = split_point(n);
        if m - begin < k {
            path(m, begin, begin + k, out);
            out.push((begin + k, end));
        } else {
            path(m, begin + k, end, out);
            out.push((begin, begin + k));
        }
    }
    let mut out = Vec::new();
    if index < size {
        path(index, 0, size, &mut out);
    }
    out
}

/// The ranges whose hashes make the consistency proof from the tree of
/// `old` leaves to the tree of `new` leaves (RFC 9162 section 2.1.4.1).
pub fn consistency_ranges(old: u64, new: u64) -> Vec<Range> {
    fn subproof(m: u64, begin: u64, end: u64, whole: bool, out: &mut Vec<Range>) {
        let n = end - begin;
        if m == n {
            if !whole {
                out.push((begin, end));
            }
            return;
        }
        let k = split_point(n);
        if m <= k {
            subproof(m, begin, begin + k, whole, out);
            out.push((begin + k, end));
        } else {
            subproof(m - k, begin + k, end, false, out);
            out.push((begin, begin + k));
        }
    }
    let mut out = Vec::new();
    if 0 < old && old < new {
        subproof(old, 0, new, true, &mut out);
    }
    out
}

/// The right edge of a tree being built: the perfect subtrees of
/// `[0, size)` with their hashes. Appending a leaf yields the nodes that
/// became complete, for the store to keep.
#[derive(Debug, Clone, Default)]
pub struct Frontier {
    size: u64,
    stack: Vec<(NodeId, Hash)>,
}

impl Frontier {
    /// The frontier of a tree of `size` leaves, from the hashes of
    /// `decompose((0, size))` in order. `None` when they do not match.
    pub fn from_nodes(size: u64, nodes: Vec<(NodeId, Hash)>) -> Option<Self> {
        let expected = decompose((0, size));
        (nodes.len() == expected.len() && nodes.iter().zip(&expected).all(|((a, _), b)| a == b))
            .then_some(Self { size, stack: nodes })
    }

    /// Leaves in the tree.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Adds the next leaf; returns every interior node completed by it
    /// (level ≥ 1), lowest first.
    pub fn push(&mut self, leaf: Hash) -> Vec<(NodeId, Hash)> {
        let mut completed = Vec::new();
        self.stack.push((
            NodeId {
                level: 0,
                index: self.size,
            },
            leaf,
        ));
        self.size += 1;
        while self.stack.len() >= 2 {
            let n = self.stack.len();
            let (right, left) = (self.stack[n - 1], self.stack[n - 2]);
            if right.0.level != left.0.level {
                break;
            }
            self.stack.truncate(n - 2);
            let parent = (
                NodeId {
                    level: left.0.level + 1,
                    index: left.0.index / 2,
                },
                node_hash(&left.1, &right.1),
            );
            completed.push(parent);
            self.stack.push(parent);
        }
        completed
    }

    /// The root hash of the tree so far.
    pub fn root(&self) -> Hash {
        let hashes: Vec<Hash> = self.stack.iter().map(|(_, h)| *h).collect();
        fold(&hashes).unwrap_or_else(empty_root)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// MTH straight from RFC 6962's recursive definition.
    fn mth(leaves: &[Hash]) -> Hash {
        match leaves.len() {
            0 => empty_root(),
            1 => leaves[0],
            n => {
                let k = split_point(n as u64) as usize;
                node_hash(&mth(&leaves[..k]), &mth(&leaves[k..]))
            }
        }
    }

    fn leaves(n: u64) -> Vec<Hash> {
        (0..n).map(|i| leaf_hash(&i.to_be_bytes())).collect()
    }

    #[test]
    fn split_point_is_the_largest_power_of_two_below() {
        assert_eq!(split_point(2), 1);
        assert_eq!(split_point(3), 2);
        assert_eq!(split_point(4), 2);
        assert_eq!(split_point(5), 4);
        assert_eq!(split_point(8), 4);
        assert_eq!(split_point(9), 8);
    }

    #[test]
    fn decompose_covers_ranges_with_aligned_perfect_subtrees() {
        assert_eq!(
            decompose((0, 7)),
            vec![
                NodeId { level: 2, index: 0 },
                NodeId { level: 1, index: 2 },
                NodeId { level: 0, index: 6 }
            ]
        );
        assert_eq!(decompose((8, 12)), vec![NodeId { level: 2, index: 2 }]);
        assert!(decompose((3, 3)).is_empty());
    }

    #[test]
    fn frontier_root_matches_the_rfc_definition_and_stores_every_completed_node() {
        let all = leaves(70);
        let mut f = Frontier::default();
        let mut stored = std::collections::HashMap::new();
        for (i, l) in all.iter().enumerate() {
            stored.insert(
                NodeId {
                    level: 0,
                    index: i as u64,
                },
                *l,
            );
            for (id, h) in f.push(*l) {
                stored.insert(id, h);
            }
            assert_eq!(f.root(), mth(&all[..=i]), "size {}", i + 1);
        }
        // Every range a proof asks for folds back to the RFC's subtree hash.
        for size in 1..=70u64 {
            for m in 0..size {
                for (b, e) in inclusion_ranges(m, size) {
                    let parts: Vec<Hash> = decompose((b, e)).iter().map(|id| stored[id]).collect();
                    assert_eq!(fold(&parts), Some(mth(&all[b as usize..e as usize])), "[{b},{e})");
                }
                for (b, e) in consistency_ranges(m + 1, size) {
                    let parts: Vec<Hash> = decompose((b, e)).iter().map(|id| stored[id]).collect();
                    assert_eq!(fold(&parts), Some(mth(&all[b as usize..e as usize])), "[{b},{e})");
                }
            }
        }
    }

    #[test]
    fn frontier_reloads_from_its_nodes() {
        let all = leaves(11);
        let mut f = Frontier::default();
        for l in &all {
            f.push(*l);
        }
        let again = Frontier::from_nodes(11, f.stack.clone());
        assert_eq!(again.map(|g| g.root()), Some(mth(&all)));
        assert!(Frontier::from_nodes(12, f.stack.clone()).is_none());
    }
}
