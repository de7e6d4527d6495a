//! Delta debugging (Zeller and Hildebrandt's `ddmin`): the smallest subset of a failing input
//! that still fails, found with about `n log n` trials for `n` items. Each trial is a whole run
//! of an environment here, so the count of trials is what matters, and it is bounded.

use std::future::Future;

/// The outcome of a shrink.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Shrunk<T> {
    /// The smallest failing subset found (in the input's order).
    pub items: Vec<T>,
    /// Trials run (the first full input is not counted: the caller has seen it fail).
    pub trials: usize,
    /// Whether the budget of trials ran out before the subset was 1-minimal.
    pub budget_exhausted: bool,
}

/// Shrinks `items` (which fail) to a 1-minimal failing subset: removing any single item of the
/// result makes `fails` false, unless `max_trials` ran out first. `fails` is async because each
/// trial runs an environment; it must be deterministic enough that a subset's verdict holds.
pub async fn ddmin<T, F, Fut>(items: Vec<T>, max_trials: usize, mut fails: F) -> Shrunk<T>
where
    T: Clone,
    F: FnMut(Vec<T>) -> Fut,
    Fut: Future<Output = bool>,
{
    let mut current = items;
    let mut granularity = 2usize;
    let mut trials = 0usize;
    'search: while current.len() >= 2 {
        // Each chunk alone, then (past two chunks, where a complement is the other chunk)
        // each complement, with the granularity to go on with if it still fails.
        let chunks = split(&current, granularity);
        let complements = (granularity > 2).then(|| {
            (0..chunks.len()).map(|i| {
                let rest: Vec<T> = chunks
                    .iter()
                    .enumerate()
                    .filter(|(j, _)| *j != i)
                    .flat_map(|(_, c)| c.iter().cloned())
                    .collect();
                (rest, (granularity - 1).max(2))
            })
        });
        let candidates = chunks
            .iter()
            .map(|c| (c.clone(), 2))
            .chain(complements.into_iter().flatten());
        for (candidate, next_granularity) in candidates {
            if trials >= max_trials {
                return Shrunk {
                    items: current,
                    trials,
                    budget_exhausted: true,
                };
            }
            trials += 1;
            if fails(candidate.clone()).await {
                current = candidate;
                granularity = next_granularity;
                continue 'search;
            }
        }
        if granularity >= current.len() {
            break;
        }
        granularity = (granularity * 2).min(current.len());
    }
    Shrunk {
        items: current,
        trials,
        budget_exhausted: false,
    }
}

/// `items` in `n` contiguous chunks of near-equal size (none empty).
fn split<T: Clone>(items: &[T], n: usize) -> Vec<Vec<T>> {
    let n = n.clamp(1, items.len().max(1));
    let mut out = Vec::with_capacity(n);
    let mut start = 0;
    for i in 0..n {
        let end = start + (items.len() - start) / (n - i);
        out.push(items[start..end].to_vec());
        start = end;
    }
    out.retain(|c| !c.is_empty());
    out
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use proptest::prelude::*;

    use super::*;

    fn block_on<F: Future>(future: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
            .block_on(future)
    }

    /// A failure caused by two events together shrinks to exactly those two.
    #[test]
    fn finds_the_pair_that_fails_together() {
        let items: Vec<u32> = (0..16).collect();
        let shrunk = block_on(ddmin(items, 1000, |subset: Vec<u32>| async move {
            subset.contains(&3) && subset.contains(&11)
        }));
        assert_eq!(shrunk.items, [3, 11]);
        assert!(!shrunk.budget_exhausted);
        assert!(shrunk.trials <= 48, "{} trials", shrunk.trials);
    }

    /// One culprit among sixteen is found by halving: a handful of trials, not sixteen.
    #[test]
    fn one_culprit_is_found_by_halving() {
        let items: Vec<u32> = (0..16).collect();
        let shrunk = block_on(ddmin(items, 1000, |subset: Vec<u32>| async move {
            subset.contains(&9)
        }));
        assert_eq!(shrunk.items, [9]);
        assert!(shrunk.trials <= 8, "{} trials", shrunk.trials);
    }

    /// The budget stops the search and says so; what is returned still fails.
    #[test]
    fn a_budget_stops_the_search() {
        let items: Vec<u32> = (0..64).collect();
        let shrunk = block_on(ddmin(items, 3, |subset: Vec<u32>| async move {
            subset.contains(&40)
        }));
        assert!(shrunk.budget_exhausted);
        assert_eq!(shrunk.trials, 3);
        assert!(shrunk.items.contains(&40));
    }

    proptest! {
        /// For a monotone failure (any superset of a culprit set fails), the result fails, is
        /// a subset of the input in order, and is 1-minimal: dropping any item makes it pass.
        #[test]
        fn result_fails_and_is_one_minimal(
            n in 1usize..40,
            culprits in proptest::collection::btree_set(0usize..40, 1..4),
        ) {
            let culprits: BTreeSet<usize> = culprits.into_iter().filter(|c| *c < n).collect();
            prop_assume!(!culprits.is_empty());
            let items: Vec<usize> = (0..n).collect();
            let fails = |subset: &[usize]| culprits.iter().all(|c| subset.contains(c));
            let shrunk = block_on(ddmin(items.clone(), 10_000, |subset: Vec<usize>| {
                let verdict = fails(&subset);
                async move { verdict }
            }));
            prop_assert!(fails(&shrunk.items));
            prop_assert!(shrunk.items.windows(2).all(|w| w[0] < w[1]), "order kept");
            for i in 0..shrunk.items.len() {
                let mut fewer = shrunk.items.clone();
                fewer.remove(i);
                prop_assert!(!fails(&fewer), "not 1-minimal: {:?}", shrunk.items);
            }
        }
    }
}
