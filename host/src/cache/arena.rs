//! First-fit arenas: the ranges each sequence takes of every per-layer buffer (the same
//! offsets in every layer).
use super::memory::Footprint;
use crate::error::{exhausted, Result};

/// First-fit ranges of one buffer (element offsets); every size is a multiple of 8 elements
/// where it must be, so offsets stay 16-byte aligned.
#[derive(Clone, Debug)]
struct Arena {
    name: &'static str,
    /// Free `(start, len)` ranges, sorted and merged.
    free: Vec<(usize, usize)>,
}

impl Arena {
    fn new(name: &'static str, size: usize) -> Arena {
        Arena {
            name,
            free: vec![(0, size)],
        }
    }

    fn alloc(&mut self, len: usize) -> Result<usize> {
        if len == 0 {
            return Ok(0);
        }
        let Some(index) = self.free.iter().position(|&(_, free)| free >= len) else {
            let largest = self.free.iter().map(|&(_, l)| l).max().unwrap_or(0);
            return Err(exhausted(self.name, len as u64, largest as u64, "elements"));
        };
        let (start, free) = self.free[index];
        if free == len {
            self.free.remove(index);
        } else {
            self.free[index] = (start + len, free - len);
        }
        Ok(start)
    }

    fn release(&mut self, start: usize, len: usize) {
        if len == 0 {
            return;
        }
        let index = self.free.partition_point(|&(s, _)| s < start);
        self.free.insert(index, (start, len));
        // Merge with the neighbours.
        if index + 1 < self.free.len() && start + len == self.free[index + 1].0 {
            self.free[index].1 += self.free[index + 1].1;
            self.free.remove(index + 1);
        }
        if index > 0 && self.free[index - 1].0 + self.free[index - 1].1 == start {
            self.free[index - 1].1 += self.free[index].1;
            self.free.remove(index);
        }
    }
}

/// The arenas of the five per-layer buffers that hold a sequence's state. A sequence takes a
/// range of each or of none.
#[derive(Clone, Debug)]
pub(super) struct Arenas {
    landmarks: Arena,
    a: Arena,
    bm: Arena,
    kv: Arena,
    values: Arena,
}

impl Arenas {
    /// Arenas over buffers of `sizes` elements.
    pub(super) fn new(sizes: &Footprint) -> Arenas {
        Arenas {
            landmarks: Arena::new(
                "the cache's landmark rows (a free range of the buffer)",
                sizes.landmark_rows,
            ),
            a: Arena::new(
                "the cache's rows of A (a free range of the buffer)",
                sizes.a,
            ),
            bm: Arena::new("the cache's Bm buffer (a free range)", sizes.bm),
            kv: Arena::new(
                "the cache's K/V blocks (a free range of the buffer)",
                sizes.kv,
            ),
            values: Arena::new("the cache's value buffer (a free range)", sizes.values),
        }
    }

    fn each(&mut self) -> [&mut Arena; 5] {
        [
            &mut self.landmarks,
            &mut self.a,
            &mut self.bm,
            &mut self.kv,
            &mut self.values,
        ]
    }

    /// Ranges of `footprint`'s lengths, one in each buffer: their starts, in a footprint's
    /// shape. On failure nothing stays taken.
    pub(super) fn alloc(&mut self, footprint: &Footprint) -> Result<Footprint> {
        let lens = footprint.parts();
        let mut starts = [0usize; 5];
        let arenas = self.each();
        for part in 0..arenas.len() {
            match arenas[part].alloc(lens[part]) {
                Ok(start) => starts[part] = start,
                Err(error) => {
                    for undo in 0..part {
                        arenas[undo].release(starts[undo], lens[undo]);
                    }
                    return Err(error);
                }
            }
        }
        Ok(Footprint::from_parts(starts))
    }

    /// Frees the ranges that start at `starts` with `footprint`'s lengths.
    pub(super) fn release(&mut self, starts: &Footprint, footprint: &Footprint) {
        let (starts, lens) = (starts.parts(), footprint.parts());
        for (part, arena) in self.each().into_iter().enumerate() {
            arena.release(starts[part], lens[part]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// First fit against a model of the buffer: ranges stay inside it and disjoint, an
        /// allocation fails only when no free run is long enough, and releasing everything
        /// merges the free list back into one range.
        #[test]
        fn arena_matches_a_model(
            size in 1usize..200,
            steps in prop::collection::vec((any::<bool>(), 0usize..60, any::<prop::sample::Index>()), 1..80),
        ) {
            let mut arena = Arena::new("test", size);
            let mut used = vec![false; size];
            let mut live: Vec<(usize, usize)> = Vec::new();
            for (allocate, len, pick) in steps {
                if allocate || live.is_empty() {
                    let longest_run = used
                        .split(|&u| u)
                        .map(|run| run.len())
                        .max()
                        .unwrap_or(0);
                    match arena.alloc(len) {
                        Ok(start) if len > 0 => {
                            prop_assert!(start + len <= size);
                            prop_assert!(used[start..start + len].iter().all(|&u| !u));
                            used[start..start + len].iter_mut().for_each(|u| *u = true);
                            live.push((start, len));
                        }
                        Ok(_) => {}
                        Err(error) => {
                            prop_assert!(longest_run < len, "{error}: a run of {longest_run} was free");
                            let exhausted = matches!(
                                error,
                                crate::Error::CapacityExhausted { needed, available, .. }
                                    if needed == len as u64 && available == longest_run as u64
                            );
                            prop_assert!(exhausted, "{error}");
                        }
                    }
                } else {
                    let (start, len) = live.swap_remove(pick.index(live.len()));
                    arena.release(start, len);
                    used[start..start + len].iter_mut().for_each(|u| *u = false);
                }
                let free: usize = arena.free.iter().map(|&(_, l)| l).sum();
                prop_assert_eq!(free, used.iter().filter(|&&u| !u).count());
                prop_assert!(arena.free.windows(2).all(|w| w[0].0 + w[0].1 < w[1].0));
            }
            for (start, len) in live.drain(..) {
                arena.release(start, len);
            }
            prop_assert_eq!(&arena.free, &vec![(0, size)]);
        }
    }
}
