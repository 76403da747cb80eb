//! Enumerating the members of sets.

use super::{Interp, Mode, Point, Result, internal_set};
use crate::ir::*;
use crate::runtime::error::RunError;
use crate::runtime::sample::{WeightedSampler, stream};
use std::rc::Rc;

/// The members of a set at one point, in index order.
#[derive(Debug)]
pub enum Members {
    /// Columns of one anchor's row.
    Cols { cols: Vec<usize>, space: Space },
    /// Entries (row, col) of the whole matrix, row-major.
    Entries {
        entries: Vec<(usize, usize)>,
        space: Space,
    },
    /// Pairs (left column, right column) of one anchor's cross set.
    Pairs {
        pairs: Vec<(usize, usize)>,
        space: Space,
    },
    /// Anchors of a block.
    Anchors {
        anchors: Vec<usize>,
        block: Handle<Block>,
    },
    /// The entries of a vector of this length.
    Vector(usize),
}

impl Members {
    pub fn len(&self) -> usize {
        match self {
            Members::Cols { cols, .. } => cols.len(),
            Members::Entries { entries, .. } => entries.len(),
            Members::Pairs { pairs, .. } => pairs.len(),
            Members::Anchors { anchors, .. } => anchors.len(),
            Members::Vector(n) => *n,
        }
    }

    /// Where each member is evaluated, given the point the set hangs off.
    pub fn points(&self, at: Point) -> Box<dyn Iterator<Item = Point> + '_> {
        let (block, anchor) = match at {
            Point::Row { block, anchor } => (Some(block), anchor),
            _ => (None, 0),
        };
        match self {
            Members::Cols { cols, space } => Box::new(cols.iter().map(move |&col| Point::Member {
                block,
                row: anchor,
                col,
                space: *space,
            })),
            Members::Entries { entries, space } => {
                Box::new(entries.iter().map(move |&(row, col)| Point::Member {
                    block: None,
                    row,
                    col,
                    space: *space,
                }))
            }
            Members::Pairs { pairs, space } => {
                Box::new(pairs.iter().filter_map(move |&(left, right)| {
                    Some(Point::Cross {
                        block: block?,
                        anchor,
                        left,
                        right,
                        space: *space,
                    })
                }))
            }
            Members::Anchors { anchors, block } => {
                Box::new(anchors.iter().map(move |&anchor| Point::Row {
                    block: *block,
                    anchor,
                }))
            }
            Members::Vector(n) => Box::new((0..*n).map(Point::Entry)),
        }
    }

    /// The same kind of member list, keeping the positions `keep` (ascending).
    fn select(&self, keep: &[usize]) -> Members {
        fn pick<T: Copy>(items: &[T], keep: &[usize]) -> Vec<T> {
            keep.iter().map(|&k| items[k]).collect()
        }
        match self {
            Members::Cols { cols, space } => Members::Cols {
                cols: pick(cols, keep),
                space: *space,
            },
            Members::Entries { entries, space } => Members::Entries {
                entries: pick(entries, keep),
                space: *space,
            },
            Members::Pairs { pairs, space } => Members::Pairs {
                pairs: pick(pairs, keep),
                space: *space,
            },
            Members::Anchors { anchors, block } => Members::Anchors {
                anchors: pick(anchors, keep),
                block: *block,
            },
            Members::Vector(n) => Members::Vector(keep.len().min(*n)),
        }
    }
}

impl Interp<'_> {
    /// The members of `set` at `at` (the batch, or one anchor), memoised.
    pub(super) fn members(&mut self, set: Handle<Set>, at: Point) -> Result<Rc<Members>> {
        let cached = match at {
            Point::Batch => self.batch_sets.get(&set).cloned(),
            Point::Row { block, anchor } => self
                .rows
                .get(&(block, anchor))
                .and_then(|r| r.sets.get(&set).cloned()),
            _ => return Err(internal_set(set)),
        };
        if let Some(members) = cached {
            return Ok(members);
        }
        let members = Rc::new(self.compute_members(set, at)?);
        match at {
            Point::Row { block, anchor } => {
                self.rows
                    .entry((block, anchor))
                    .or_default()
                    .sets
                    .insert(set, members.clone());
            }
            _ => {
                self.batch_sets.insert(set, members.clone());
            }
        }
        Ok(members)
    }

    fn compute_members(&mut self, set: Handle<Set>, at: Point) -> Result<Members> {
        let module = self.module;
        let s = &module.sets[set];
        Ok(match &s.kind {
            SetKind::Entries => {
                let SetShape::Members(space) = s.shape else {
                    return Err(internal_set(set));
                };
                let (Some(rows), Some(cols)) = (space.rows, space.cols) else {
                    return Err(internal_set(set));
                };
                let ncols = self.domain_len(cols);
                match at {
                    Point::Batch => {
                        let nrows = self.domain_len(rows);
                        let entries = (0..nrows)
                            .flat_map(|r| (0..ncols).map(move |c| (r, c)))
                            .collect();
                        Members::Entries { entries, space }
                    }
                    _ => Members::Cols {
                        cols: (0..ncols).collect(),
                        space,
                    },
                }
            }
            SetKind::Filter { base, predicate } => {
                let base = self.members(*base, at)?;
                let mut keep = Vec::new();
                for (position, point) in base.points(at).enumerate() {
                    if self.num(*predicate, point)? != 0.0 {
                        keep.push(position);
                    }
                }
                base.select(&keep)
            }
            SetKind::Extreme {
                base,
                count,
                largest,
            } => {
                let base_members = self.members(*base, at)?;
                let k = self.count(*count, at, set)?;
                let mut ranked: Vec<(f64, usize)> = Vec::with_capacity(base_members.len());
                for (position, point) in base_members.points(at).enumerate() {
                    ranked.push((self.num(s.value, point)?, position));
                }
                // The order: by value (descending when `largest`), ties to the lower position.
                // Selecting the k-th puts the first k before it, in some order.
                let order = |a: &(f64, usize), b: &(f64, usize)| {
                    let by_value = if *largest {
                        b.0.total_cmp(&a.0)
                    } else {
                        a.0.total_cmp(&b.0)
                    };
                    by_value.then(a.1.cmp(&b.1))
                };
                if (1..ranked.len()).contains(&k) {
                    ranked.select_nth_unstable_by(k - 1, order);
                }
                let mut keep: Vec<usize> = ranked.iter().take(k).map(|&(_, p)| p).collect();
                keep.sort_unstable();
                base_members.select(&keep)
            }
            SetKind::Sample {
                base,
                count,
                log_weight,
                site,
            } => {
                let Point::Row { anchor, .. } = at else {
                    return Err(internal_set(set));
                };
                if let Mode::Replay(frozen) = &self.mode
                    && let Some(members) = frozen.samples.get(&(set, at))
                {
                    let all: Vec<usize> = (0..members.len()).collect();
                    return Ok(members.select(&all));
                }
                let base_members = self.members(*base, at)?;
                let k = self.count(*count, at, set)?;
                let mut weights = Vec::with_capacity(base_members.len());
                for point in base_members.points(at) {
                    weights.push(self.num(*log_weight, point)?);
                }
                let mut rng = stream(self.seed, *site, anchor as u32);
                let mut sampler = WeightedSampler::new();
                let drawn = sampler
                    .sample(&weights, k, &mut rng)
                    .map_err(|error| RunError::Sampling { anchor, set, error })?;
                let mut keep = drawn.to_vec();
                keep.sort_unstable();
                let members = base_members.select(&keep);
                if let Mode::Record(frozen) = &mut self.mode {
                    let all: Vec<usize> = (0..members.len()).collect();
                    frozen
                        .samples
                        .insert((set, at), Rc::new(members.select(&all)));
                }
                members
            }
            SetKind::Union { left, right } => {
                let a = self.members(*left, at)?;
                let b = self.members(*right, at)?;
                merge(&a, &b).ok_or_else(|| internal_set(set))?
            }
            SetKind::Fallback { primary, fallback } => {
                let a = self.members(*primary, at)?;
                let chosen = if a.len() > 0 {
                    a
                } else {
                    self.members(*fallback, at)?
                };
                let all: Vec<usize> = (0..chosen.len()).collect();
                chosen.select(&all)
            }
            SetKind::Cross { left, right } => {
                let a = self.members(*left, at)?;
                let b = self.members(*right, at)?;
                let (Members::Cols { cols: lc, space }, Members::Cols { cols: rc, .. }) =
                    (a.as_ref(), b.as_ref())
                else {
                    return Err(internal_set(set));
                };
                let pairs = lc
                    .iter()
                    .flat_map(|&l| rc.iter().map(move |&r| (l, r)))
                    .collect();
                Members::Pairs {
                    pairs,
                    space: *space,
                }
            }
            SetKind::Anchors | SetKind::Skipped => {
                let SetShape::Anchors(block) = s.shape else {
                    return Err(internal_set(set));
                };
                let want_skipped = matches!(s.kind, SetKind::Skipped);
                let mut anchors = Vec::new();
                for anchor in 0..self.domain_len(module.blocks[block].rows) {
                    if self.skipped(block, anchor)? == want_skipped {
                        anchors.push(anchor);
                    }
                }
                Members::Anchors { anchors, block }
            }
            SetKind::VectorEntries => {
                let SetShape::Vector(n) = s.shape else {
                    return Err(internal_set(set));
                };
                Members::Vector(n as usize)
            }
        })
    }

    /// A count argument: a non-negative integer.
    pub(super) fn count(
        &mut self,
        count: Handle<Expr>,
        at: Point,
        set: Handle<Set>,
    ) -> Result<usize> {
        let value = self.num(count, at)?;
        if value < 0.0 || value != value.trunc() || !value.is_finite() {
            return Err(RunError::BadCount {
                value,
                set,
                anchor: at.anchor(),
            });
        }
        Ok(value as usize)
    }
}

/// The union of two member lists of the same kind, in index order.
fn merge(a: &Members, b: &Members) -> Option<Members> {
    fn union<T: Ord + Copy>(a: &[T], b: &[T]) -> Vec<T> {
        let mut all: Vec<T> = a.iter().chain(b).copied().collect();
        all.sort_unstable();
        all.dedup();
        all
    }
    Some(match (a, b) {
        (Members::Cols { cols: x, space }, Members::Cols { cols: y, .. }) => Members::Cols {
            cols: union(x, y),
            space: *space,
        },
        (Members::Entries { entries: x, space }, Members::Entries { entries: y, .. }) => {
            Members::Entries {
                entries: union(x, y),
                space: *space,
            }
        }
        _ => return None,
    })
}
