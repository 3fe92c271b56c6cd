//! Prefetch accounting and pacing on scripted sequences.

use super::tests::{config, get, settle, TestPack};
use super::*;
use crate::forward::ExpertProvider;

#[test]
fn prefetched_expert_found_resident_is_used() {
    let pack = TestPack::new(2, 4, |_, _| 9000);
    let mut c = pack.open(&config(4, 0, 4096));
    get(&mut c, &pack, 0, 0);
    c.prefetch(1, &[2, 3]);
    settle(&mut c);
    assert!(c.is_resident(1, 2) && c.is_resident(1, 3));
    let read = c.stats().bytes_read;
    get(&mut c, &pack, 1, 2);
    let s = c.stats();
    assert_eq!(s.bytes_read, read);
    assert_eq!(s.prefetch.issued, 2);
    assert_eq!(s.prefetch.used, 1);
    assert_eq!((s.prefetch.late, s.prefetch.wasted), (0, 0));
    // Hints for resident experts are not prefetches.
    c.prefetch(1, &[2, 3]);
    assert_eq!(c.stats().prefetch.issued, 2);
}

#[test]
fn prefetch_asked_for_before_it_lands_is_late() {
    let pack = TestPack::new(2, 4, |_, _| 9000);
    // One device slot, held by the current prepare call: the prefetch stays queued.
    let mut c = pack.open(&config(1, 0, 4096));
    get(&mut c, &pack, 0, 0);
    c.prefetch(1, &[1]);
    assert_eq!(c.prefetch_queue.len(), 1);
    get(&mut c, &pack, 1, 1);
    let s = c.stats();
    assert_eq!(
        (s.prefetch.issued, s.prefetch.late, s.prefetch.used),
        (1, 1, 0)
    );
    assert!(c.prefetch_queue.is_empty());
    // A prefetch already submitted: either it landed before the prepare drained it (used) or
    // the prepare waited on it (late).
    let mut c = pack.open(&config(4, 0, 4096));
    c.prefetch(0, &[3]);
    get(&mut c, &pack, 0, 3);
    let s = c.stats();
    assert_eq!(s.prefetch.used + s.prefetch.late, 1);
    assert_eq!(s.prefetch.wasted, 0);
}

#[test]
fn prefetch_evicted_unused_is_wasted() {
    let pack = TestPack::new(2, 4, |_, _| 9000);
    let mut c = pack.open(&config(2, 0, 4096));
    get(&mut c, &pack, 0, 0);
    c.prefetch(0, &[1]);
    settle(&mut c);
    assert!(c.is_resident(0, 1));
    get(&mut c, &pack, 1, 0);
    get(&mut c, &pack, 1, 1);
    let s = c.stats();
    assert!(!c.is_resident(0, 1));
    assert_eq!((s.prefetch.wasted, s.prefetch.used), (1, 0));
    // A prefetch never takes a slot of the current prepare set nor another unused prefetch:
    // with both slots so held, hints wait in the queue.
    c.prefetch(0, &[2]);
    settle(&mut c);
    c.prefetch(0, &[3]);
    settle(&mut c);
    assert!(c.is_resident(1, 1) && c.is_resident(0, 2) && !c.is_resident(0, 3));
    assert_eq!(c.prefetch_queue.len(), 1);
}

#[test]
fn failed_prefetches_are_counted_and_dropped() {
    let pack = TestPack::new(1, 4, |_, _| 9000);
    pack.corrupt(0, 2, 10);
    let mut c = pack.open(&config(4, 0, 4096));
    c.prefetch(0, &[1, 2]);
    settle(&mut c);
    let s = c.stats();
    assert_eq!(s.checksum_failures, 1);
    assert!(c.is_resident(0, 1) && !c.is_resident(0, 2));
    // Asked for, it is a demand read and its failure is an error.
    assert!(c.prepare(0, &[2]).is_err());
    assert_eq!(c.stats().checksum_failures, 2);
    get(&mut c, &pack, 0, 1);
}

#[test]
fn burst_smaller_than_an_expert_lets_one_prefetch_through_at_a_time() {
    let pack = TestPack::new(1, 4, |_, _| 9000);
    let mut cfg = config(4, 0, 4096);
    cfg.prefetch_burst_bytes = 100;
    let mut c = pack.open(&cfg);
    c.prefetch(0, &[1, 2, 3]);
    // Completions are only collected inside calls, so this is exact.
    assert_eq!(c.pacer.in_flight(), 9000);
    assert_eq!(c.prefetch_queue.len(), 2);
    settle(&mut c);
    for e in 1..4 {
        assert!(c.is_resident(0, e));
    }
    assert_eq!(c.pacer.in_flight(), 0);
    assert_eq!(c.stats().prefetch.issued, 3);
    // Demand reads do not wait for the pacer.
    let mut c = pack.open(&cfg);
    c.prefetch(0, &[1]);
    get(&mut c, &pack, 0, 0);
    get(&mut c, &pack, 0, 2);
}

#[test]
fn host_tier_copies_for_prefetch_and_always_verify() {
    let pack = TestPack::new(1, 3, |_, _| 9000);
    let mut cfg = config(1, 3 * 12_288, 4096);
    cfg.verify = Verify::Always;
    let mut c = pack.open(&cfg);
    get(&mut c, &pack, 0, 0);
    get(&mut c, &pack, 0, 1);
    let read = c.stats().bytes_read;
    // The only device slot holds the current expert: nothing can be prefetched.
    c.prefetch(0, &[0]);
    settle(&mut c);
    assert!(!c.is_resident(0, 0));
    get(&mut c, &pack, 0, 0);
    assert_eq!(c.stats().bytes_read, read);
    assert_eq!(c.stats().prefetch.late, 1);
}

#[test]
fn prefetch_after_prepare_keeps_the_prepared_experts() {
    let pack = TestPack::new(2, 4, |_, _| 9000);
    let mut c = pack.open(&config(3, 0, 4096));
    c.prepare(0, &[0, 1]).unwrap();
    // The forward pass may hint the next layers before computing this one.
    c.prefetch(1, &[0, 1, 2]);
    settle(&mut c);
    for e in [0, 1] {
        assert_eq!(
            c.expert(0, e).unwrap().bytes.host().unwrap(),
            pack.expected(0, e)
        );
    }
    assert!(c.is_resident(1, 0));
    assert_eq!(c.prefetch_queue.len(), 2);
    // The forward pass reaches layer 1 and asks only for expert 0: the hints for experts 1
    // and 2, still queued, were wrong, and are dropped unread as wasted.
    get(&mut c, &pack, 1, 0);
    settle(&mut c);
    assert!(!c.is_resident(1, 1) && !c.is_resident(1, 2));
    assert!(c.prefetch_queue.is_empty());
    let s = c.stats();
    assert_eq!(
        (s.prefetch.issued, s.prefetch.used, s.prefetch.wasted),
        (3, 1, 2)
    );
}

#[test]
fn queued_hints_for_later_layers_survive_a_prepare_and_proceed() {
    let pack = TestPack::new(3, 4, |_, _| 9000);
    let mut c = pack.open(&config(4, 0, 4096));
    c.prepare(0, &[0, 1]).unwrap();
    c.prefetch(2, &[0, 1, 2]);
    settle(&mut c);
    // Two slots are free: two hints start, one waits.
    assert_eq!(c.prefetch_queue.len(), 1);
    // Layer 1's prepare frees layer 0's experts; the layer-2 hint is still ahead and proceeds.
    get(&mut c, &pack, 1, 3);
    settle(&mut c);
    assert!((0..3).all(|e| c.is_resident(2, e)));
    assert_eq!(c.stats().prefetch.wasted, 0);
}
