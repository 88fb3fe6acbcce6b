//! Resident rows: each live sequence holds one row of every layer's resident ids
//! (`[max_sequences, Hkv, budget_chunks]`) from `add_sequence` to `remove_sequence`, whatever
//! its place in the batch of a step, so no row ever moves.
use std::collections::BTreeSet;

/// The free rows of `0..rows`; the lowest free row goes first.
#[derive(Clone, Debug)]
pub(super) struct Rows {
    free: BTreeSet<u32>,
    rows: u32,
}

impl Rows {
    /// Rows `0..rows`, all free.
    pub(super) fn new(rows: u32) -> Rows {
        Rows {
            free: (0..rows).collect(),
            rows,
        }
    }

    /// The lowest free row, now taken; `None` when every row is taken.
    pub(super) fn alloc(&mut self) -> Option<u32> {
        self.free.pop_first()
    }

    /// Frees `row` (taken by [`alloc`](Self::alloc)); a row already free or out of range is
    /// left as it is.
    pub(super) fn release(&mut self, row: u32) {
        if row < self.rows {
            self.free.insert(row);
        }
    }

    /// Rows taken.
    #[cfg(test)]
    pub(super) fn taken(&self) -> usize {
        self.rows as usize - self.free.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Joins and leaves against a model: a join gets the lowest row no live sequence holds,
        /// fails only when all rows are held, and a leave's row is free again at once.
        #[test]
        fn rows_match_a_model(
            rows in 1u32..40,
            steps in prop::collection::vec((any::<bool>(), any::<prop::sample::Index>()), 1..200),
        ) {
            let mut allocator = Rows::new(rows);
            let mut held: Vec<u32> = Vec::new();
            for (join, pick) in steps {
                if join || held.is_empty() {
                    let lowest_free = (0..rows).find(|r| !held.contains(r));
                    let got = allocator.alloc();
                    prop_assert_eq!(got, lowest_free);
                    if let Some(row) = got {
                        prop_assert!(row < rows);
                        held.push(row);
                    } else {
                        prop_assert_eq!(held.len(), rows as usize);
                    }
                } else {
                    let row = held.swap_remove(pick.index(held.len()));
                    allocator.release(row);
                }
                prop_assert_eq!(allocator.taken(), held.len());
                let mut sorted = held.clone();
                sorted.sort_unstable();
                sorted.dedup();
                prop_assert_eq!(sorted.len(), held.len(), "a row held twice");
            }
        }
    }

    #[test]
    fn out_of_range_release_is_ignored() {
        let mut rows = Rows::new(2);
        rows.release(7);
        assert_eq!(rows.alloc(), Some(0));
        assert_eq!(rows.alloc(), Some(1));
        assert_eq!(rows.alloc(), None);
        rows.release(1);
        assert_eq!(rows.alloc(), Some(1));
    }
}
