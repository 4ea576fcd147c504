//! One tree vocabulary for the primitives of a speculative decoding step: the drafter ([`crate::drafter`])
//! proposes drafts, the policy ([`crate::policy`]) sizes trees, tree attention ([`crate::attention`]) scores the
//! nodes and appends their KV, the sampler ([`crate::sampling`]) verifies them, and compaction keeps the accepted
//! path's KV. They all number nodes the same way, take the same parent convention and the same maximum.
//!
//! # The verification tree
//!
//! Node 0 is the **root**: the last token already decided (the previous step's correction or bonus token, or the
//! prompt's last token). Its KV is not cached yet, so it is fed to the target with the drafts, and its target
//! row scores the first drafts. Nodes `1..` are the **drafts** in topological order: `parents[0] = -1`, and
//! `parents[i]` is in `0..i`. Children of a node are tried in increasing index order. A chain of `k` drafts is
//! the tree `parents[i] = i - 1`; no drafts at all is the root alone (plain decoding).
//!
//! A tree has at most [`MAX_TREE_NODES`] = 64 nodes, the root included, so at most [`MAX_DRAFTS`] = 63 drafts:
//! tree attention's ancestor sets are 64-bit masks, and the sampler, the policy and the drafter take the same
//! bound, so the largest tree any of them makes is scored and verified in one call.
//!
//! # Where a layout differs, and its converter
//!
//! * The drafter's [`Draft`](crate::drafter::Draft) holds the drafts alone, `u32` tokens, parent `-1` meaning the
//!   context's last token: [`VerifyTree::from_draft`] adds the root and shifts every parent by one.
//! * The sampler writes `accepted_nodes` as rows of `[B, emit_width]`: the accepted path **without** the root,
//!   then -1. Compaction takes the accepted path **with** the root, packed by offsets: slot `L + node_j` moves
//!   to slot `L + j`, so `j = 0` must be node 0 (which stays in place) and the `j`-th accepted draft lands at
//!   `L + j`, the position its RoPE was computed for. [`compaction_paths`] converts; passing the sampler's rows
//!   unchanged would move the first accepted draft onto the root's slot.
//! * A batch of trees: [`PackedTrees`] gives the sampler's `node_offsets`, `node_tokens`, `parents` and
//!   `emit_width`, and tree attention's `token_offsets` and `parents` (the same arrays).

use crate::error::{Error, Result};

/// The most nodes of one verification tree, its root included: tree attention's ancestor sets are 64-bit masks.
pub const MAX_TREE_NODES: usize = 64;

/// The most drafts of one verification tree (or chain): [`MAX_TREE_NODES`] less the root.
pub const MAX_DRAFTS: usize = MAX_TREE_NODES - 1;

/// One request's verification tree: node 0 the root, then the drafts (see the module documentation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyTree {
    tokens: Vec<i32>,
    parents: Vec<i32>,
}

impl VerifyTree {
    /// A tree from its nodes: `tokens[0]` is the root's token, `parents[0] = -1`, `parents[i]` in `0..i`, at most
    /// [`MAX_TREE_NODES`] nodes. Errors name `tokens` or `parents[i]`.
    pub fn new(tokens: Vec<i32>, parents: Vec<i32>) -> Result<Self> {
        if tokens.len() != parents.len() {
            return Err(Error::invalid(
                "parents",
                format!(
                    "has {} entries for {} tokens; a tree has one parent per node",
                    parents.len(),
                    tokens.len()
                ),
            ));
        }
        check_node_count("tokens", tokens.len())?;
        for (i, &parent) in parents.iter().enumerate() {
            parent_rule(i, parent).map_err(|rule| {
                Error::invalid(format!("parents[{i}]"), format!("is {parent}: {rule}"))
            })?;
        }
        Ok(VerifyTree { tokens, parents })
    }

    /// The root alone: no drafts (plain decoding).
    pub fn root(last_token: i32) -> Self {
        VerifyTree {
            tokens: vec![last_token],
            parents: vec![-1],
        }
    }

    /// The chain `last_token -> drafts[0] -> drafts[1] -> ...` (at most [`MAX_DRAFTS`] drafts).
    pub fn chain(last_token: i32, drafts: &[i32]) -> Result<Self> {
        check_node_count("drafts", drafts.len() + 1)?;
        let mut tokens = Vec::with_capacity(drafts.len() + 1);
        tokens.push(last_token);
        tokens.extend_from_slice(drafts);
        Ok(VerifyTree {
            tokens,
            parents: (-1..drafts.len() as i32).collect(),
        })
    }

    /// The tree of a drafter's proposal: `last_token` (the context's last token) as node 0, and each draft's
    /// parent shifted by one (the drafter's -1, "the context's last token", becomes node 0).
    pub fn from_draft(last_token: i32, draft: &crate::drafter::Draft) -> Result<Self> {
        if draft.parents.len() != draft.tokens.len() {
            return Err(Error::invalid(
                "draft.parents",
                format!(
                    "has {} entries for {} tokens",
                    draft.parents.len(),
                    draft.tokens.len()
                ),
            ));
        }
        let mut tokens = Vec::with_capacity(draft.tokens.len() + 1);
        tokens.push(last_token);
        for (i, &token) in draft.tokens.iter().enumerate() {
            let token = i32::try_from(token).map_err(|_| {
                Error::invalid(
                    format!("draft.tokens[{i}]"),
                    format!("is {token}, beyond the i32 token ids of the sampler"),
                )
            })?;
            tokens.push(token);
        }
        check_node_count("draft.tokens", tokens.len())?;
        for (i, &parent) in draft.parents.iter().enumerate() {
            if parent < -1 || parent >= i as i32 {
                return Err(Error::invalid(
                    format!("draft.parents[{i}]"),
                    format!("is {parent}; a draft's parent is -1 (the context's last token) or in 0..{i}"),
                ));
            }
        }
        let mut parents = Vec::with_capacity(tokens.len());
        parents.push(-1);
        parents.extend(draft.parents.iter().map(|&p| p + 1));
        Ok(VerifyTree { tokens, parents })
    }

    /// The tokens, node 0 (the root) first.
    pub fn tokens(&self) -> &[i32] {
        &self.tokens
    }

    /// The parents: -1 for node 0, else an earlier node.
    pub fn parents(&self) -> &[i32] {
        &self.parents
    }

    /// Nodes, the root included (1..=[`MAX_TREE_NODES`]).
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// Always false: a tree has its root.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Drafts: nodes less the root.
    pub fn drafts(&self) -> usize {
        self.tokens.len() - 1
    }

    /// Each node's depth: 0 for the root, its parent's plus one otherwise. Node `i` sits at position `L + depth`
    /// for RoPE, `L` the tokens cached before the step.
    pub fn depths(&self) -> Vec<usize> {
        let mut depths = vec![0usize; self.len()];
        for i in 1..self.len() {
            depths[i] = depths[self.parents[i] as usize] + 1;
        }
        depths
    }

    /// The longest root-to-node path, in drafts.
    pub fn depth(&self) -> usize {
        self.depths().into_iter().max().unwrap_or(0)
    }

    /// The output row length the sampler needs for this tree: the deepest path's drafts plus the token emitted
    /// after them.
    pub fn emit_width(&self) -> usize {
        self.depth() + 1
    }
}

/// The parent rule of a verification tree, shared by every check of one: node 0's parent is -1, node `i`'s is
/// in `0..i`. `Err` holds the rule `parent` breaks, for the caller to name the element.
pub(crate) fn parent_rule(node: usize, parent: i32) -> std::result::Result<(), String> {
    match node {
        0 if parent == -1 => Ok(()),
        0 => Err("must be -1 (node 0 is the root)".to_string()),
        i if parent >= 0 && (parent as usize) < i => Ok(()),
        i => Err(format!(
            "must be in 0..{i} (parents come first: topological order)"
        )),
    }
}

fn check_node_count(argument: &str, nodes: usize) -> Result<()> {
    if nodes == 0 || nodes > MAX_TREE_NODES {
        return Err(Error::invalid(
            argument,
            format!(
                "gives {nodes} nodes; a verification tree has 1..={MAX_TREE_NODES}, its root included \
                 (at most {MAX_DRAFTS} drafts)"
            ),
        ));
    }
    Ok(())
}

/// A batch of verification trees in the packed layout the sampler and tree attention share: request `b`'s nodes
/// are `offsets[b] .. offsets[b + 1]` of `tokens` and `parents`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackedTrees {
    /// `[B + 1]`: the sampler's `node_offsets`, tree attention's `token_offsets`.
    pub offsets: Vec<i32>,
    /// `[N]`: the sampler's `node_tokens` (node 0's entry is the root's token, which the sampler does not read).
    pub tokens: Vec<i32>,
    /// `[N]`: the parents of both.
    pub parents: Vec<i32>,
    /// The sampler's output row length: the largest [`VerifyTree::emit_width`] (1 for an empty batch).
    pub emit_width: usize,
    /// The largest tree: tree attention's `max_tree_size` (1 for an empty batch).
    pub max_tree_size: usize,
}

impl PackedTrees {
    /// Packs `trees` in order.
    pub fn new<'a>(trees: impl IntoIterator<Item = &'a VerifyTree>) -> Self {
        let mut packed = PackedTrees {
            offsets: vec![0],
            tokens: Vec::new(),
            parents: Vec::new(),
            emit_width: 1,
            max_tree_size: 1,
        };
        for tree in trees {
            packed.tokens.extend_from_slice(&tree.tokens);
            packed.parents.extend_from_slice(&tree.parents);
            packed.offsets.push(packed.tokens.len() as i32);
            packed.emit_width = packed.emit_width.max(tree.emit_width());
            packed.max_tree_size = packed.max_tree_size.max(tree.len());
        }
        packed
    }

    /// Requests.
    pub fn num_requests(&self) -> usize {
        self.offsets.len() - 1
    }
}

/// Compaction's inputs from the sampler's outputs: `accepted_counts: [B]` and `accepted_nodes: [B, emit_width]`
/// (the accepted path without the root, then -1) become `(accepted_offsets [B + 1], accepted_nodes)` with each
/// request's path starting at the root, node 0 (the root rule of the module documentation).
///
/// Errors: `emit_width` 0 with requests; a count outside `0..emit_width` (`accepted_counts[b]`; -1 is a request the GPU flagged, which has
/// nothing to compact and must not be passed on), or a path that is not strictly increasing from node 1
/// (`accepted_nodes[b, j]`).
pub fn compaction_paths(
    accepted_counts: &[i32],
    accepted_nodes: &[i32],
    emit_width: usize,
) -> Result<(Vec<i32>, Vec<i32>)> {
    let cells = accepted_counts
        .len()
        .checked_mul(emit_width)
        .ok_or_else(|| {
            Error::invalid("emit_width", "accepted_counts.len() * emit_width overflows")
        })?;
    crate::error::check_len("accepted_nodes", accepted_nodes.len(), cells)?;
    if emit_width == 0 && !accepted_counts.is_empty() {
        return Err(Error::invalid(
            "emit_width",
            "is 0; the sampler's rows hold at least the emitted token",
        ));
    }
    let mut offsets = Vec::with_capacity(accepted_counts.len() + 1);
    offsets.push(0i32);
    let mut nodes = Vec::new();
    for (b, &count) in accepted_counts.iter().enumerate() {
        if count < 0 || count as usize >= emit_width {
            return Err(Error::invalid(
                format!("accepted_counts[{b}]"),
                format!(
                    "is {count}; a verified request accepted 0..{} drafts (-1 is a flagged request: \
                     nothing of it may be compacted)",
                    emit_width
                ),
            ));
        }
        nodes.push(0);
        let row = &accepted_nodes[b * emit_width..][..count as usize];
        let mut previous = 0;
        for (j, &node) in row.iter().enumerate() {
            if node <= previous || node as usize >= MAX_TREE_NODES {
                return Err(Error::invalid(
                    format!("accepted_nodes[{b}, {j}]"),
                    format!(
                        "is {node}; an accepted path increases strictly from node 1 and stays below \
                         {MAX_TREE_NODES} (previous {previous})"
                    ),
                ));
            }
            nodes.push(node);
            previous = node;
        }
        offsets.push(i32::try_from(nodes.len()).map_err(|_| {
            Error::invalid(
                "accepted_counts",
                "hold more accepted nodes in all than int32 offsets can count",
            )
        })?);
    }
    Ok((offsets, nodes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::drafter::Draft;

    fn named(result: Result<impl std::fmt::Debug>) -> String {
        match result {
            Err(Error::InvalidArgument { argument, .. }) => argument,
            other => panic!("expected an invalid argument, got {other:?}"),
        }
    }

    #[test]
    fn a_drafters_proposal_becomes_a_tree_under_its_root() {
        // Drafts 7 and 8 under the context's last token, 9 under 7.
        let draft = Draft {
            tokens: vec![7, 8, 9],
            parents: vec![-1, -1, 0],
            probs: vec![0.5, 0.3, 0.4],
            match_len: 3,
            ..Draft::default()
        };
        let tree = VerifyTree::from_draft(42, &draft).unwrap();
        assert_eq!(tree.tokens(), &[42, 7, 8, 9]);
        assert_eq!(tree.parents(), &[-1, 0, 0, 1]);
        assert_eq!((tree.depths(), tree.emit_width()), (vec![0, 1, 1, 2], 3));
        assert_eq!(
            VerifyTree::from_draft(42, &Draft::default()).unwrap(),
            VerifyTree::root(42)
        );
        let bad = Draft {
            tokens: vec![u32::MAX],
            parents: vec![-1],
            ..Draft::default()
        };
        assert_eq!(named(VerifyTree::from_draft(0, &bad)), "draft.tokens[0]");
    }

    #[test]
    fn trees_keep_the_one_maximum_and_the_parent_rule() {
        let drafts: Vec<i32> = (0..MAX_DRAFTS as i32).collect();
        let chain = VerifyTree::chain(5, &drafts).unwrap();
        assert_eq!(
            (chain.len(), chain.emit_width()),
            (MAX_TREE_NODES, MAX_TREE_NODES)
        );
        let too_long: Vec<i32> = (0..MAX_TREE_NODES as i32).collect();
        assert_eq!(named(VerifyTree::chain(5, &too_long)), "drafts");
        assert_eq!(named(VerifyTree::new(vec![1, 2], vec![0, 0])), "parents[0]");
        assert_eq!(
            named(VerifyTree::new(vec![1, 2], vec![-1, 1])),
            "parents[1]"
        );
        assert_eq!(named(VerifyTree::new(vec![], vec![])), "tokens");
    }

    #[test]
    fn compaction_paths_start_at_the_root() {
        // Request 0 accepted nodes 2 and 5, request 1 nothing, request 2 node 1 (emit_width 3).
        let (offsets, nodes) =
            compaction_paths(&[2, 0, 1], &[2, 5, -1, -1, -1, -1, 1, -1, -1], 3).unwrap();
        assert_eq!(offsets, [0, 3, 4, 6]);
        assert_eq!(nodes, [0, 2, 5, 0, 0, 1]);
        assert_eq!(
            named(compaction_paths(&[-1], &[-1, -1], 2)),
            "accepted_counts[0]"
        );
        assert_eq!(
            named(compaction_paths(&[2], &[3, 3, -1], 3)),
            "accepted_nodes[0, 1]"
        );
        assert_eq!(
            named(compaction_paths(&[1], &[0, -1], 2)),
            "accepted_nodes[0, 0]"
        );
        // Found by tests/fuzz_capi.rs: rows of width 0 hold no path at all (before, a count of 0 passed and the
        // root did not fit the C caller's output).
        assert_eq!(named(compaction_paths(&[0], &[], 0)), "emit_width");
        assert_eq!(compaction_paths(&[], &[], 0).unwrap(), (vec![0], vec![]));
    }

    #[test]
    fn packed_trees_give_both_layouts() {
        let trees = [
            VerifyTree::chain(1, &[2, 3]).unwrap(),
            VerifyTree::root(4),
            VerifyTree::new(vec![5, 6, 7], vec![-1, 0, 0]).unwrap(),
        ];
        let packed = PackedTrees::new(&trees);
        assert_eq!(packed.offsets, [0, 3, 4, 7]);
        assert_eq!(packed.tokens, [1, 2, 3, 4, 5, 6, 7]);
        assert_eq!(packed.parents, [-1, 0, 1, -1, -1, 0, 0]);
        assert_eq!((packed.emit_width, packed.max_tree_size), (3, 3));
        assert_eq!(packed.num_requests(), 3);
    }
}
