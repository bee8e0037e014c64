//! Directories too large for one tree: pages.
//!
//! A directory whose listing does not fit one page ([`PAGE_MAX`] nodes or
//! [`PAGE_BYTES`] of encoding) is stored as a *page index*: a tree blob listing, in name
//! order, the trees (pages) that hold its nodes, each an ordinary tree. Where a page
//! ends depends on the names (content-defined, as chunk boundaries depend on bytes), so
//! a change to one file of a directory of millions writes one page and the index again,
//! not the whole listing, and nothing on either side ever holds more than a page of it.
//! A directory that fits one page keeps the single-tree form (and the id it always had).
//!
//! ```text
//! pages = "HTP1" count:varint (first:bytes page_id[32])*count
//!         (count >= 2; first names valid and strictly increasing)
//! ```
//!
//! Each page's first node is named `first`, and its last name sorts before the next
//! page's `first`: [`check_page`] holds a page read to that when it is read (a page
//! index cannot say it by itself). A page is never itself a page index.

use super::{put_bytes, put_varint, valid_name, DecodeError, Node, Reader, Tree};
use crate::id::TreeId;

const MAGIC_PAGES: &[u8; 4] = b"HTP1";

/// Nodes per page, at most, and at least before a name may end a page; a name ends a
/// page past the least when the low bits of its BLAKE3 are zero ([`PAGE_MASK`]), so
/// pages hold about `PAGE_MIN + PAGE_MASK + 1` nodes (half a megabyte of small files).
pub const PAGE_MAX: usize = 16384;
pub const PAGE_MIN: usize = 1024;
const PAGE_MASK: u32 = 4095;
/// A page ends once it holds this many bytes of encoded nodes, whatever its names
/// (files with many chunks each make large nodes).
pub const PAGE_BYTES: usize = 4 << 20;
/// Bytes a page reference takes at least: a one-byte name with its length and an id.
const MIN_PAGE_REF_BYTES: usize = 2 + 32;

/// One page of a paged directory: its first name and its tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageRef {
    pub first: Vec<u8>,
    pub id: TreeId,
}

/// A page index: the pages of one directory, in name order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Pages {
    pub pages: Vec<PageRef>,
}

/// What a tree blob holds: a directory's nodes, or the pages that hold them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TreeBlob {
    Nodes(Tree),
    Pages(Pages),
}

/// A page that does not hold what its index says it does.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("page {page} of a paged directory: {reason}")]
pub struct PageError {
    pub page: TreeId,
    pub reason: &'static str,
}

impl Pages {
    pub fn encode(&self) -> Vec<u8> {
        assert!(
            self.pages.len() >= 2,
            "a page index of fewer than two pages"
        );
        let mut out = Vec::with_capacity(8 + self.pages.len() * 48);
        out.extend_from_slice(MAGIC_PAGES);
        put_varint(&mut out, self.pages.len() as u64);
        let mut prev: Option<&[u8]> = None;
        for p in &self.pages {
            assert!(valid_name(&p.first), "invalid first name of a page");
            assert!(
                prev.is_none_or(|prev| prev < p.first.as_slice()),
                "pages not sorted"
            );
            prev = Some(&p.first);
            put_bytes(&mut out, &p.first);
            out.extend_from_slice(&p.id.0);
        }
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Pages, DecodeError> {
        let mut r = Reader { buf: bytes, pos: 0 };
        if r.take(4)? != MAGIC_PAGES {
            return Err(r.err("not a page index (bad magic)"));
        }
        let count = r.varint()?;
        if count > (r.remaining() / MIN_PAGE_REF_BYTES) as u64 {
            return Err(r.err("page count larger than the encoding"));
        }
        if count < 2 {
            return Err(r.err("a page index of fewer than two pages"));
        }
        let mut pages: Vec<PageRef> = Vec::with_capacity(count as usize);
        for _ in 0..count {
            let first = r.bytes()?.to_vec();
            if !valid_name(&first) {
                return Err(r.err("invalid first name of a page"));
            }
            if pages.last().is_some_and(|p| p.first >= first) {
                return Err(r.err("pages not sorted and unique"));
            }
            let id = TreeId(r.array32()?);
            pages.push(PageRef { first, id });
        }
        if r.pos != bytes.len() {
            return Err(r.err("trailing bytes after the last page"));
        }
        Ok(Pages { pages })
    }

    /// The page that holds `name` if any does: the last one whose first name is not
    /// after it.
    pub fn page_for(&self, name: &[u8]) -> Option<usize> {
        self.pages
            .partition_point(|p| p.first.as_slice() <= name)
            .checked_sub(1)
    }
}

/// Whether `bytes` are a page index rather than a directory's nodes.
pub fn is_pages(bytes: &[u8]) -> bool {
    bytes.starts_with(MAGIC_PAGES)
}

impl TreeBlob {
    pub fn decode(bytes: &[u8]) -> Result<TreeBlob, DecodeError> {
        if is_pages(bytes) {
            Pages::decode(bytes).map(TreeBlob::Pages)
        } else {
            Tree::decode(bytes).map(TreeBlob::Nodes)
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        match self {
            TreeBlob::Nodes(t) => t.encode(),
            TreeBlob::Pages(p) => p.encode(),
        }
    }

    /// The trees this one refers to: its subdirectories' trees, or its pages.
    pub fn subtrees(&self) -> Vec<TreeId> {
        match self {
            TreeBlob::Nodes(t) => t.nodes.iter().filter_map(|n| n.subtree).collect(),
            TreeBlob::Pages(p) => p.pages.iter().map(|p| p.id).collect(),
        }
    }

    /// The nodes of a directory held in one tree; none for a page index.
    pub fn as_nodes(&self) -> Option<&Tree> {
        match self {
            TreeBlob::Nodes(t) => Some(t),
            TreeBlob::Pages(_) => None,
        }
    }

    /// The chunks its nodes refer to (none for a page index).
    pub fn chunks(&self) -> impl Iterator<Item = &crate::id::ChunkId> {
        let nodes = match self {
            TreeBlob::Nodes(t) => t.nodes.as_slice(),
            TreeBlob::Pages(_) => &[],
        };
        nodes.iter().flat_map(|n| &n.content)
    }

    /// The nodes, for a tree that must be a page (or a directory's only tree).
    pub fn into_page(self, id: &TreeId) -> Result<Tree, PageError> {
        match self {
            TreeBlob::Nodes(t) => Ok(t),
            TreeBlob::Pages(_) => Err(PageError {
                page: *id,
                reason: "a page index where a page was expected",
            }),
        }
    }
}

/// Checks that page `at` of `pages`, read as `tree`, holds what the index says: its
/// first node is the page's first name, its last sorts before the next page's.
pub fn check_page(pages: &Pages, at: usize, tree: &Tree) -> Result<(), PageError> {
    let page = &pages.pages[at];
    let err = |reason| PageError {
        page: page.id,
        reason,
    };
    let (Some(first), Some(last)) = (tree.nodes.first(), tree.nodes.last()) else {
        return Err(err("an empty page"));
    };
    if first.name != page.first {
        return Err(err("its first name is not the one its index names"));
    }
    if let Some(next) = pages.pages.get(at + 1) {
        if last.name >= next.first {
            return Err(err("it reaches into the next page"));
        }
    }
    Ok(())
}

/// Page `at` of `pages`, loaded by `load` and checked against the index.
pub fn read_page<E: From<PageError>>(
    pages: &Pages,
    at: usize,
    mut load: impl FnMut(&TreeId) -> Result<TreeBlob, E>,
) -> Result<Tree, E> {
    let id = pages.pages[at].id;
    let tree = load(&id)?.into_page(&id)?;
    check_page(pages, at, &tree)?;
    Ok(tree)
}

/// A directory's nodes, a page at a time, in name order: the directory's tree itself,
/// or each page it lists, loaded by `load` (and checked) when it is reached.
pub fn for_each_page<E: From<PageError>>(
    blob: TreeBlob,
    mut load: impl FnMut(&TreeId) -> Result<TreeBlob, E>,
    mut visit: impl FnMut(Tree) -> Result<(), E>,
) -> Result<(), E> {
    match blob {
        TreeBlob::Nodes(t) => visit(t),
        TreeBlob::Pages(pages) => {
            for at in 0..pages.pages.len() {
                visit(read_page(&pages, at, &mut load)?)?;
            }
            Ok(())
        }
    }
}

/// One node of a directory, by name: from the directory's tree, or from the one page of
/// it that can hold the name.
pub fn find_node<E: From<PageError>>(
    blob: &TreeBlob,
    name: &[u8],
    load: impl FnMut(&TreeId) -> Result<TreeBlob, E>,
) -> Result<Option<Node>, E> {
    match blob {
        TreeBlob::Nodes(t) => Ok(t.find(name).cloned()),
        TreeBlob::Pages(pages) => {
            let Some(at) = pages.page_for(name) else {
                return Ok(None);
            };
            Ok(read_page(pages, at, load)?.find(name).cloned())
        }
    }
}

/// A directory's listing for lookups by name in name order (the walker's parent
/// directory, a verification): of a paged one, the index and the page last read.
pub struct Lookup {
    blob: TreeBlob,
    page: Option<(usize, Tree)>,
}

impl Lookup {
    pub fn new(blob: TreeBlob) -> Self {
        Lookup { blob, page: None }
    }

    /// The node called `name`. A page that cannot be read is reported once and then
    /// counts as empty.
    pub fn find<E: From<PageError>>(
        &mut self,
        name: &[u8],
        load: impl FnMut(&TreeId) -> Result<TreeBlob, E>,
    ) -> Result<Option<&Node>, E> {
        let pages = match &self.blob {
            TreeBlob::Nodes(t) => return Ok(t.find(name)),
            TreeBlob::Pages(p) => p,
        };
        let Some(at) = pages.page_for(name) else {
            return Ok(None);
        };
        if self.page.as_ref().map(|p| p.0) != Some(at) {
            match read_page(pages, at, load) {
                Ok(t) => self.page = Some((at, t)),
                Err(e) => {
                    self.page = Some((at, Tree::default()));
                    return Err(e);
                }
            }
        }
        Ok(self.page.as_ref().and_then(|p| p.1.find(name)))
    }
}

/// Builds a directory's tree from its nodes given one at a time in name order, writing
/// each page through `offer` as soon as it is complete: memory is one page of encoded
/// nodes, whatever the directory's size. The result is canonical: the same nodes give
/// the same trees, however they arrive.
#[derive(Default)]
pub struct Pager {
    /// Encoded nodes (without flags) not yet in a written page.
    held: Vec<u8>,
    /// Where each held node's encoding ends in `held`, and its flags.
    ends: Vec<(usize, u64)>,
    /// The pages written so far; none while the directory may still fit one.
    pages: Vec<PageRef>,
    last: Option<Vec<u8>>,
}

impl Pager {
    pub fn new() -> Self {
        Self::default()
    }

    /// Writes a directory whose nodes are all at hand, in name order: its only tree or
    /// its pages and their index.
    pub fn write<'n, E>(
        nodes: impl IntoIterator<Item = &'n Node>,
        offer: &mut impl FnMut(Vec<u8>) -> Result<TreeId, E>,
    ) -> Result<TreeId, E> {
        let mut pager = Pager::new();
        for node in nodes {
            pager.push(node, offer)?;
        }
        pager.finish(offer)
    }

    /// Nodes given so far and not yet written out.
    pub fn held(&self) -> usize {
        self.ends.len()
    }

    /// Adds the next node. Panics if it does not sort after the last one or its name is
    /// invalid (the caller's bug, as for [`Tree::encode`]).
    pub fn push<E>(
        &mut self,
        node: &Node,
        offer: &mut impl FnMut(Vec<u8>) -> Result<TreeId, E>,
    ) -> Result<(), E> {
        assert!(
            valid_name(&node.name),
            "invalid name in tree: {:?}",
            node.name
        );
        assert!(
            self.last
                .as_deref()
                .is_none_or(|l| l < node.name.as_slice()),
            "tree nodes not sorted and unique"
        );
        self.last = Some(node.name.clone());
        super::encode_node(&mut self.held, node);
        self.ends.push((self.held.len(), node.flags.0));
        if self.pages.is_empty() {
            // One page may still hold the whole directory: decided once it cannot.
            if self.ends.len() > PAGE_MAX || self.held.len() > PAGE_BYTES {
                while let Some(n) = self.cut() {
                    self.write_page(n, offer)?;
                }
            }
        } else if self.ends_page(self.ends.len() - 1) {
            self.write_page(self.ends.len(), offer)?;
        }
        Ok(())
    }

    /// Writes what is left and returns the directory's tree: its only tree, or its page
    /// index.
    pub fn finish<E>(
        mut self,
        offer: &mut impl FnMut(Vec<u8>) -> Result<TreeId, E>,
    ) -> Result<TreeId, E> {
        if self.pages.is_empty() {
            return offer(self.page_bytes(self.ends.len()));
        }
        if !self.ends.is_empty() {
            self.write_page(self.ends.len(), offer)?;
        }
        // Past a page's bytes only at its last node: the one page is the directory.
        if let [only] = self.pages.as_slice() {
            return Ok(only.id);
        }
        offer(
            Pages {
                pages: std::mem::take(&mut self.pages),
            }
            .encode(),
        )
    }

    fn start(&self, i: usize) -> usize {
        if i == 0 {
            0
        } else {
            self.ends[i - 1].0
        }
    }

    fn name(&self, i: usize) -> &[u8] {
        let mut r = Reader {
            buf: &self.held[self.start(i)..self.ends[i].0],
            pos: 0,
        };
        r.bytes().expect("a node this pager encoded")
    }

    /// Whether held node `i` ends a page (counted from the first held node).
    fn ends_page(&self, i: usize) -> bool {
        let count = i + 1;
        if count >= PAGE_MAX || self.ends[i].0 >= PAGE_BYTES {
            return true;
        }
        count >= PAGE_MIN && {
            let h = blake3::hash(self.name(i));
            u32::from_le_bytes(h.as_bytes()[..4].try_into().expect("4 bytes")) & PAGE_MASK == 0
        }
    }

    /// How many held nodes make the first page, if they end one.
    fn cut(&self) -> Option<usize> {
        (0..self.ends.len())
            .find(|&i| self.ends_page(i))
            .map(|i| i + 1)
    }

    /// The first `n` held nodes as one tree's encoding.
    fn page_bytes(&self, n: usize) -> Vec<u8> {
        let flagged = self.ends[..n].iter().any(|&(_, f)| f != 0);
        let body = self.start(n);
        let mut out = Vec::with_capacity(16 + body + if flagged { n } else { 0 });
        out.extend_from_slice(if flagged {
            super::MAGIC_FLAGS
        } else {
            super::MAGIC
        });
        put_varint(&mut out, n as u64);
        if flagged {
            for i in 0..n {
                out.extend_from_slice(&self.held[self.start(i)..self.ends[i].0]);
                put_varint(&mut out, self.ends[i].1);
            }
        } else {
            out.extend_from_slice(&self.held[..body]);
        }
        out
    }

    fn write_page<E>(
        &mut self,
        n: usize,
        offer: &mut impl FnMut(Vec<u8>) -> Result<TreeId, E>,
    ) -> Result<(), E> {
        let first = self.name(0).to_vec();
        let id = offer(self.page_bytes(n))?;
        self.pages.push(PageRef { first, id });
        let body = self.start(n);
        self.held.drain(..body);
        self.ends.drain(..n);
        for e in &mut self.ends {
            e.0 -= body;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn node(i: usize) -> Node {
        Node {
            name: format!("f{i:08}").into_bytes(),
            size: i as u64,
            ..Default::default()
        }
    }

    /// Pages a directory of `nodes` into a map of blobs; returns the root tree's id.
    fn page(nodes: &[Node], blobs: &mut HashMap<TreeId, Vec<u8>>) -> TreeId {
        let mut offer = |b: Vec<u8>| {
            let id = TreeId::of(&b);
            blobs.insert(id, b);
            Ok::<_, PageError>(id)
        };
        Pager::write(nodes, &mut offer).unwrap()
    }

    fn read_all(id: TreeId, blobs: &HashMap<TreeId, Vec<u8>>) -> Vec<Node> {
        let load = |id: &TreeId| Ok::<_, PageError>(TreeBlob::decode(&blobs[id]).unwrap());
        let mut out = Vec::new();
        for_each_page(load(&id).unwrap(), load, |t| {
            out.extend(t.nodes);
            Ok(())
        })
        .unwrap();
        out
    }

    /// Paging `nodes` gives one tree: the single-tree encoding of them all.
    fn assert_one_tree(nodes: Vec<Node>) {
        let mut blobs = HashMap::new();
        let id = page(&nodes, &mut blobs);
        assert_eq!(blobs.len(), 1);
        assert_eq!(blobs[&id], Tree { nodes }.encode());
    }

    #[test]
    fn a_directory_that_fits_one_page_keeps_the_single_tree_form() {
        assert_one_tree((0..PAGE_MAX).map(node).collect());
    }

    #[test]
    fn a_large_directory_is_paged_and_reads_back_whole() {
        let mut nodes: Vec<Node> = (0..100_000).map(node).collect();
        nodes[70_000].flags.insert(crate::tree::NodeFlags::SPARSE);
        let mut blobs = HashMap::new();
        let id = page(&nodes, &mut blobs);
        let TreeBlob::Pages(pages) = TreeBlob::decode(&blobs[&id]).unwrap() else {
            panic!("not paged")
        };
        // Content-defined: pages average about PAGE_MIN + PAGE_MASK + 1 nodes.
        assert!(
            (10..60).contains(&pages.pages.len()),
            "{}",
            pages.pages.len()
        );
        assert_eq!(read_all(id, &blobs), nodes);
        // Found by name through one page.
        let load = |id: &TreeId| Ok::<_, PageError>(TreeBlob::decode(&blobs[id]).unwrap());
        let blob = TreeBlob::Pages(pages);
        assert_eq!(
            find_node(&blob, b"f00054321", load).unwrap(),
            Some(node(54321))
        );
        assert_eq!(find_node(&blob, b"f00054321x", load).unwrap(), None);
        assert_eq!(find_node(&blob, b"a", load).unwrap(), None);
    }

    #[test]
    fn a_change_to_one_entry_writes_one_page_and_the_index_again() {
        let mut nodes: Vec<Node> = (0..100_000).map(node).collect();
        let mut before = HashMap::new();
        page(&nodes, &mut before);
        nodes[50_000].size += 1;
        nodes.insert(
            20_001,
            Node {
                name: b"f00020000a".to_vec(),
                ..Default::default()
            },
        );
        let mut after = HashMap::new();
        page(&nodes, &mut after);
        let new = after.keys().filter(|k| !before.contains_key(k)).count();
        // The changed entry's page, the added entry's page, the index.
        assert_eq!(new, 3);
    }

    #[test]
    fn bytes_end_a_page_too() {
        // Nodes of 100 chunks (3.2 KB each): a page of PAGE_BYTES holds about 1,300.
        let nodes: Vec<Node> = (0..3000)
            .map(|i| Node {
                content: vec![crate::id::ChunkId([i as u8; 32]); 100],
                ..node(i)
            })
            .collect();
        let mut blobs = HashMap::new();
        let id = page(&nodes, &mut blobs);
        assert!(blobs.values().all(|b| b.len() <= PAGE_BYTES + 4096));
        assert!(blobs.len() >= 4);
        assert_eq!(read_all(id, &blobs), nodes);
    }

    #[test]
    fn a_directory_past_a_page_of_bytes_only_at_its_last_node_is_one_tree() {
        let big = |i| Node {
            content: vec![crate::id::ChunkId([1; 32]); PAGE_BYTES / 32 / 2 + 1000],
            ..node(i)
        };
        assert_one_tree(vec![big(0), big(1)]);
    }

    #[test]
    fn a_page_that_is_not_what_its_index_says_is_refused() {
        let nodes: Vec<Node> = (0..40_000).map(node).collect();
        let mut blobs = HashMap::new();
        let id = page(&nodes, &mut blobs);
        let TreeBlob::Pages(mut pages) = TreeBlob::decode(&blobs[&id]).unwrap() else {
            panic!("not paged")
        };
        let load = |id: &TreeId| Ok::<_, PageError>(TreeBlob::decode(&blobs[id]).unwrap());
        let reason = |pages: &Pages| {
            for_each_page(TreeBlob::Pages(pages.clone()), load, |_| Ok(()))
                .unwrap_err()
                .reason
        };
        // Two pages swapped: the first's first name is not what the index says.
        let mut swapped = pages.clone();
        let (a, b) = (swapped.pages[0].id, swapped.pages[1].id);
        swapped.pages[0].id = b;
        swapped.pages[1].id = a;
        assert_eq!(
            reason(&swapped),
            "its first name is not the one its index names"
        );
        // A page listed twice: it reaches into the next.
        pages.pages[1].id = pages.pages[0].id;
        pages.pages[1].first = pages.pages[0].first.clone();
        pages.pages[1].first.push(b'0');
        assert_eq!(reason(&pages), "it reaches into the next page");
        // A page index given as a page.
        let mut nested = Pages::decode(&blobs[&id]).unwrap();
        nested.pages[0].id = id;
        assert_eq!(reason(&nested), "a page index where a page was expected");
    }

    #[test]
    fn a_page_index_decodes_only_what_it_encodes() {
        let p = Pages {
            pages: vec![
                PageRef {
                    first: b"a".to_vec(),
                    id: TreeId([1; 32]),
                },
                PageRef {
                    first: b"b".to_vec(),
                    id: TreeId([2; 32]),
                },
            ],
        };
        let bytes = p.encode();
        assert!(is_pages(&bytes));
        assert_eq!(Pages::decode(&bytes).unwrap(), p);
        let mut one = p.clone();
        one.pages.pop();
        let mut bytes1 = MAGIC_PAGES.to_vec();
        put_varint(&mut bytes1, 1);
        put_bytes(&mut bytes1, b"a");
        bytes1.extend_from_slice(&[1; 32]);
        assert_eq!(
            Pages::decode(&bytes1).unwrap_err().reason,
            "a page index of fewer than two pages"
        );
        let mut unsorted = bytes.clone();
        unsorted[6] = b'c';
        assert_eq!(
            Pages::decode(&unsorted).unwrap_err().reason,
            "pages not sorted and unique"
        );
        let mut trailing = bytes.clone();
        trailing.push(0);
        assert_eq!(
            Pages::decode(&trailing).unwrap_err().reason,
            "trailing bytes after the last page"
        );
        let mut huge = MAGIC_PAGES.to_vec();
        put_varint(&mut huge, 1 << 40);
        assert_eq!(
            Pages::decode(&huge).unwrap_err().reason,
            "page count larger than the encoding"
        );
    }
}
