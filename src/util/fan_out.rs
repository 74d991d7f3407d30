//! One job per device at once: the copies of a write, a flush of every
//! device, an intent log block on every device. Each takes as long as the
//! slowest device instead of the sum.

/// Run `f` on every item: the first on the calling thread, the others on
/// scoped helper threads named `name` when `parallel`, else one after
/// another here. An item whose thread cannot start runs here, after. The
/// results come back in the items' order.
pub fn each<T: Sync, R: Send>(
    items: &[T],
    parallel: bool,
    name: &str,
    f: impl Fn(&T) -> R + Sync,
) -> Vec<R> {
    if !parallel || items.len() < 2 {
        return items.iter().map(&f).collect();
    }
    let f = &f;
    std::thread::scope(|sc| {
        let others: Vec<_> = items[1..]
            .iter()
            .map(|it| {
                let t = std::thread::Builder::new().name(name.into());
                (it, t.spawn_scoped(sc, move || f(it)).ok())
            })
            .collect();
        let mut out = Vec::with_capacity(items.len());
        out.push(f(&items[0]));
        for (it, h) in others {
            out.push(match h {
                Some(h) => h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)),
                None => f(it),
            });
        }
        out
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn results_keep_the_items_order() {
        let items: Vec<u64> = (0..5).collect();
        for parallel in [false, true] {
            let out = super::each(&items, parallel, "t", |x| x * 10);
            assert_eq!(out, vec![0, 10, 20, 30, 40]);
        }
        let none: Vec<u64> = Vec::new();
        assert!(super::each(&none, true, "t", |x| *x).is_empty());
    }
}
