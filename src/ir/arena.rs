//! Typed arenas: the IR's nodes live in vectors and refer to each other by index.
//!
//! A [`Handle<T>`] is a `u32` that remembers which arena it indexes. Nodes are only ever
//! appended, and a node only refers to nodes created before it, so arena order is a
//! topological order: evaluators and printers walk it front to back, the gradient pass
//! back to front. `ir::validate` checks that property once; afterwards indexing is plain
//! `arena[handle]`.

use std::fmt;
use std::hash::{Hash, Hasher};
use std::marker::PhantomData;

/// The short prefix a handle prints with (`e12`, `s3`, `m0`, `row1`).
pub trait Entity {
    const PREFIX: &'static str;
}

pub struct Handle<T> {
    index: u32,
    marker: PhantomData<fn() -> T>,
}

impl<T> Handle<T> {
    pub(crate) fn from_index(index: usize) -> Handle<T> {
        Handle {
            index: index as u32,
            marker: PhantomData,
        }
    }

    pub fn index(self) -> usize {
        self.index as usize
    }
}

impl<T> Clone for Handle<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for Handle<T> {}
impl<T> PartialEq for Handle<T> {
    fn eq(&self, other: &Self) -> bool {
        self.index == other.index
    }
}
impl<T> Eq for Handle<T> {}
impl<T> PartialOrd for Handle<T> {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl<T> Ord for Handle<T> {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.index.cmp(&other.index)
    }
}
impl<T> Hash for Handle<T> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.index.hash(state)
    }
}
impl<T: Entity> fmt::Debug for Handle<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", T::PREFIX, self.index)
    }
}
impl<T: Entity> fmt::Display for Handle<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", T::PREFIX, self.index)
    }
}

/// An append-only vector of `T`, indexed by `Handle<T>`.
#[derive(Clone, PartialEq)]
pub struct Arena<T> {
    items: Vec<T>,
}

impl<T> Default for Arena<T> {
    fn default() -> Self {
        Arena { items: Vec::new() }
    }
}

impl<T: fmt::Debug + Entity> fmt::Debug for Arena<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl<T> Arena<T> {
    pub fn new() -> Arena<T> {
        Arena::default()
    }

    pub fn append(&mut self, item: T) -> Handle<T> {
        let handle = Handle::from_index(self.items.len());
        self.items.push(item);
        handle
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    pub fn contains(&self, handle: Handle<T>) -> bool {
        handle.index() < self.items.len()
    }

    pub fn iter(&self) -> impl DoubleEndedIterator<Item = (Handle<T>, &T)> + ExactSizeIterator {
        self.items
            .iter()
            .enumerate()
            .map(|(i, item)| (Handle::from_index(i), item))
    }

    pub fn handles(
        &self,
    ) -> impl DoubleEndedIterator<Item = Handle<T>> + ExactSizeIterator + use<T> {
        (0..self.items.len()).map(Handle::from_index)
    }
}

impl<T> std::ops::Index<Handle<T>> for Arena<T> {
    type Output = T;
    fn index(&self, handle: Handle<T>) -> &T {
        &self.items[handle.index()]
    }
}

impl<T> std::ops::IndexMut<Handle<T>> for Arena<T> {
    fn index_mut(&mut self, handle: Handle<T>) -> &mut T {
        &mut self.items[handle.index()]
    }
}

/// A dense map from the handles of one arena to values: the side tables of the IR.
#[derive(Clone, PartialEq)]
pub struct HandleMap<K, V> {
    values: Vec<Option<V>>,
    marker: PhantomData<fn() -> K>,
}

impl<K, V> Default for HandleMap<K, V> {
    fn default() -> Self {
        HandleMap {
            values: Vec::new(),
            marker: PhantomData,
        }
    }
}

impl<K, V: fmt::Debug> fmt::Debug for HandleMap<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.values.iter().flatten())
            .finish()
    }
}

impl<K, V> HandleMap<K, V> {
    pub fn new() -> Self {
        HandleMap::default()
    }

    pub fn insert(&mut self, key: Handle<K>, value: V) {
        if self.values.len() <= key.index() {
            self.values.resize_with(key.index() + 1, || None);
        }
        self.values[key.index()] = Some(value);
    }

    pub fn get(&self, key: Handle<K>) -> Option<&V> {
        self.values.get(key.index()).and_then(Option::as_ref)
    }
}
