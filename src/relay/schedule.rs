//! What runs next: synchronous state machines, driven by the async senders and the permit pump
//! (`sender`, `semaphore`), so their invariants can be tested on their own.
//!
//! - [`FairQueue`]: round robin over flows (clusters, rule 12), first come first served within
//!   a flow. Every call costs the same, so deficit round robin would pick the same order.
//! - [`Board`]: a shard's ordering keys with work: one runner per key, runners bounded, no wake
//!   lost, a key in backoff out of the way until its timer queues it again; the next key for
//!   a free runner comes from the fair queue.
//!
//! The permit pump hands the worker's permits to waiting calls through a `FairQueue` as well,
//! so both places where a key can wait behind other keys (for a runner, for a permit) are fair
//! between clusters.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::time::{Duration, Instant};

use rand::Rng;

/// A flow of the fair share: the cluster's full ARN (same-named clusters of two accounts are
/// two flows).
pub type Flow = String;

/// Round robin over the flows with waiting items, FIFO within each flow.
#[derive(Debug)]
pub struct FairQueue<T> {
    flows: HashMap<Flow, VecDeque<(T, Instant)>>,
    /// Flows with waiting items, in turn order: the front goes next.
    ring: VecDeque<Flow>,
    len: usize,
}

impl<T> Default for FairQueue<T> {
    fn default() -> Self {
        Self {
            flows: HashMap::new(),
            ring: VecDeque::new(),
            len: 0,
        }
    }
}

impl<T: PartialEq> FairQueue<T> {
    /// Queues `item` at the end of its flow; a flow new to the ring joins at the back, so it
    /// goes after every flow already waiting has had one turn.
    pub fn push(&mut self, flow: &str, item: T, now: Instant) {
        match self.flows.get_mut(flow) {
            Some(items) => items.push_back((item, now)),
            None => {
                self.flows
                    .insert(flow.to_string(), VecDeque::from([(item, now)]));
                self.ring.push_back(flow.to_string());
            }
        }
        self.len += 1;
    }

    /// The next item: the first of the flow whose turn it is; that flow goes to the back.
    pub fn pop(&mut self) -> Option<(Flow, T, Instant)> {
        let flow = self.ring.pop_front()?;
        let items = self.flows.get_mut(&flow)?;
        let (item, queued) = items.pop_front()?;
        self.len -= 1;
        if items.is_empty() {
            self.flows.remove(&flow);
        } else {
            self.ring.push_back(flow.clone());
        }
        Some((flow, item, queued))
    }

    /// Takes `item` out of `flow`'s queue (a waiter that gave up); false if it was not there.
    pub fn remove(&mut self, flow: &str, item: &T) -> bool {
        let Some(items) = self.flows.get_mut(flow) else {
            return false;
        };
        let Some(i) = items.iter().position(|(x, _)| x == item) else {
            return false;
        };
        items.remove(i);
        self.len -= 1;
        if items.is_empty() {
            self.flows.remove(flow);
            self.ring.retain(|f| f != flow);
        }
        true
    }

    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether a flow other than `flow` has items waiting.
    pub fn waiting_other_than(&self, flow: &str) -> bool {
        self.ring.iter().any(|f| f != flow)
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// What operators see: flows with waiting items, and the longest an item at the head of
    /// its flow has waited.
    pub fn backlog(&self, now: Instant) -> Backlog {
        let mut flows: Vec<(Flow, usize)> = self
            .flows
            .iter()
            .map(|(f, items)| (f.clone(), items.len()))
            .collect();
        flows.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        let oldest = self
            .flows
            .values()
            .filter_map(|items| items.front())
            .map(|(_, queued)| now.saturating_duration_since(*queued))
            .max()
            .unwrap_or_default();
        Backlog { flows, oldest }
    }
}

/// A fair queue's waiting work by flow.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Backlog {
    /// Flows with waiting items and how many each has, most first.
    pub flows: Vec<(Flow, usize)>,
    /// The longest an item at the head of its flow has waited.
    pub oldest: Duration,
}

impl Backlog {
    /// Adds another queue's backlog (the same flow in two shards counts once, summed).
    pub fn merge(&mut self, other: Backlog) {
        for (flow, n) in other.flows {
            match self.flows.iter_mut().find(|(f, _)| *f == flow) {
                Some((_, m)) => *m += n,
                None => self.flows.push((flow, n)),
            }
        }
        self.flows
            .sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        self.oldest = self.oldest.max(other.oldest);
    }
}

/// Exponential backoff of rule 9: min, ×1.3 per retry, capped, plus 0–20 % jitter.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    current: Duration,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Self {
        Self {
            min,
            max,
            current: min,
        }
    }

    /// The next sleep: the current base plus jitter in [0, 20 %); then the base grows.
    pub fn next_delay(&mut self) -> Duration {
        let base = self.current;
        let jitter_bound = base.as_nanos() as u64 / 5;
        let jitter = if jitter_bound == 0 {
            0
        } else {
            rand::rng().random_range(0..jitter_bound)
        };
        self.current = base.mul_f64(1.3).min(self.max);
        base + Duration::from_nanos(jitter)
    }

    pub fn reset(&mut self) {
        self.current = self.min;
    }

    /// The base of the next delay.
    pub fn current(&self) -> Duration {
        self.current
    }
}

/// A key's failure streak, kept while it waits out its backoff and handed back to the runner
/// that takes it next.
#[derive(Debug, Clone)]
pub struct Retry {
    pub backoff: Backoff,
    pub attempts: u32,
    /// When the streak started.
    pub since: Instant,
}

/// What a runner is doing with its key, for `inspect`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Phase {
    /// Reading the outbox, or recording a completion.
    Reading,
    /// Waiting for a permit of the fleet-wide limit.
    Permit,
    /// The ECS call is on the wire.
    Call,
}

/// Where an ordering key with work stands.
#[derive(Debug, Clone, PartialEq)]
enum Slot {
    /// A runner works on it; `woken`: woken again since its last read (read once more).
    Running {
        flow: Flow,
        woken: bool,
        phase: Phase,
        since: Instant,
    },
    /// Waiting in the fair queue for a runner.
    Queued,
    /// Waiting out a retry delay; [`Board::backoff_over`] queues it again.
    Backoff { flow: Flow },
}

/// A shard's ordering keys with work and its runners.
///
/// Invariants (each has a unit test):
/// - one runner per key: a key is handed to a runner only from the queue, and is in the
///   queue at most once;
/// - no lost wake-up: a wake while a runner works on the key makes [`Board::finish`] say
///   "read again";
/// - bounded runners: [`Board::wake`] asks for a new runner only below the bound, and a
///   runner leaves only when the queue is empty;
/// - fairness: the next key comes from the [`FairQueue`];
/// - backoff re-entry: a key in backoff is neither queued nor run by a wake; when its delay is
///   over it is queued again with its streak, and a wake that came meanwhile is not lost (the
///   runner reads the whole outbox).
#[derive(Debug)]
pub struct Board<K: Hash + Eq + Clone = String> {
    keys: HashMap<K, Slot>,
    queue: FairQueue<K>,
    runners: usize,
    max_runners: usize,
    retries: HashMap<K, Retry>,
    /// The last failure of keys whose last call failed: attempts, the error, and when the key
    /// will try again.
    failures: HashMap<K, Failure>,
}

/// A key's last failed call, for `inspect`.
#[derive(Debug, Clone, PartialEq)]
pub struct Failure {
    pub attempts: u32,
    pub error: String,
    pub retry_at: Instant,
}

/// What the worker holding a key can tell about it (`inspect`): its live state, which is in
/// memory only.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Live {
    /// `waiting for a runner`, `reading`, `waiting for a permit`, `in flight` or `backing off`.
    pub state: &'static str,
    /// How long it has been in this state, in ms (for a runner's phases).
    pub for_ms: Option<u64>,
    /// Failed calls in the current streak.
    pub attempts: u32,
    pub last_error: Option<String>,
    /// In how many ms the next attempt starts (backing off).
    pub next_attempt_in_ms: Option<u64>,
}

impl<K: Hash + Eq + Clone> Board<K> {
    pub fn new(max_runners: usize) -> Self {
        Self {
            keys: HashMap::new(),
            queue: FairQueue::default(),
            runners: 0,
            max_runners,
            retries: HashMap::new(),
            failures: HashMap::new(),
        }
    }

    /// `key` (of `flow`) has new work. True when the caller must start a runner.
    pub fn wake(&mut self, key: &K, flow: &str, now: Instant) -> bool {
        match self.keys.get_mut(key) {
            Some(Slot::Running { woken, .. }) => {
                *woken = true;
                false
            }
            // Queued keys are read when their turn comes; keys in backoff when it ends.
            Some(Slot::Queued | Slot::Backoff { .. }) => false,
            None => {
                self.keys.insert(key.clone(), Slot::Queued);
                self.queue.push(flow, key.clone(), now);
                self.want_runner()
            }
        }
    }

    /// One more runner for the key just queued, unless the bound is reached (a runner that
    /// finishes its key takes the next from the queue).
    fn want_runner(&mut self) -> bool {
        if self.runners >= self.max_runners {
            return false;
        }
        self.runners += 1;
        true
    }

    /// A runner's next key, with its flow, when it was queued and its failure streak; None: the
    /// queue is empty (or the shard stops) and the runner must exit (it is no longer counted).
    pub fn next(&mut self, stopping: bool) -> Option<Next<K>> {
        let popped = if stopping { None } else { self.queue.pop() };
        let Some((flow, key, queued)) = popped else {
            self.runners -= 1;
            return None;
        };
        self.keys.insert(
            key.clone(),
            Slot::Running {
                flow: flow.clone(),
                woken: false,
                phase: Phase::Reading,
                since: Instant::now(),
            },
        );
        let retry = self.retries.remove(&key);
        Some(Next {
            key,
            flow,
            queued,
            retry,
        })
    }

    /// Before the runner reads `key`'s outbox: a wake from now on means "read again".
    pub fn reading<Q: Hash + Eq + ?Sized>(&mut self, key: &Q)
    where
        K: std::borrow::Borrow<Q>,
    {
        if let Some(Slot::Running { woken, .. }) = self.keys.get_mut(key) {
            *woken = false;
        }
        self.phase(key, Phase::Reading);
    }

    /// The runner of `key` moves on to `phase`.
    pub fn phase<Q: Hash + Eq + ?Sized>(&mut self, key: &Q, phase: Phase)
    where
        K: std::borrow::Borrow<Q>,
    {
        if let Some(Slot::Running {
            phase: current,
            since,
            ..
        }) = self.keys.get_mut(key)
        {
            if *current != phase {
                *current = phase;
                *since = Instant::now();
            }
        }
    }

    /// A call for `key` failed for the `attempts`th time in a row with `error`; it tries again
    /// after `delay`.
    pub fn failed(&mut self, key: &K, attempts: u32, error: String, delay: Duration) {
        let failure = Failure {
            attempts,
            error,
            retry_at: Instant::now() + delay,
        };
        self.failures.insert(key.clone(), failure);
    }

    /// A call for `key` went through: its failure streak is over.
    pub fn succeeded<Q: Hash + Eq + ?Sized>(&mut self, key: &Q)
    where
        K: std::borrow::Borrow<Q>,
    {
        self.failures.remove(key);
    }

    /// What this board can tell about `key`; None when it holds no work of it.
    pub fn live(&self, key: &K, now: Instant) -> Option<Live> {
        let failure = self.failures.get(key);
        let (state, for_ms) = match self.keys.get(key)? {
            Slot::Queued => ("waiting for a runner", None),
            Slot::Backoff { .. } => ("backing off", None),
            Slot::Running { phase, since, .. } => {
                let state = match phase {
                    Phase::Reading => "reading",
                    Phase::Permit => "waiting for a permit",
                    Phase::Call => "in flight",
                };
                (
                    state,
                    Some(now.saturating_duration_since(*since).as_millis() as u64),
                )
            }
        };
        let backing_off = state == "backing off";
        Some(Live {
            state,
            for_ms,
            attempts: failure.map_or(0, |f| f.attempts),
            last_error: failure.map(|f| f.error.clone()),
            next_attempt_in_ms: failure
                .filter(|_| backing_off)
                .map(|f| f.retry_at.saturating_duration_since(now).as_millis() as u64),
        })
    }

    /// The runner read `key`'s outbox empty. True: the key is done and forgotten; false: it
    /// was woken since the read, so read again.
    pub fn finish<Q: Hash + Eq + ?Sized>(&mut self, key: &Q) -> bool
    where
        K: std::borrow::Borrow<Q>,
    {
        match self.keys.get_mut(key) {
            Some(Slot::Running { woken, .. }) if *woken => {
                *woken = false;
                false
            }
            _ => {
                self.keys.remove(key);
                self.failures.remove(key);
                true
            }
        }
    }

    /// Whether a key of another cluster than `flow` waits for a runner: then a runner whose key
    /// has more work gives it back ([`Board::requeue`]) rather than keep it to the end.
    pub fn others_wait(&self, flow: &str) -> bool {
        self.queue.waiting_other_than(flow)
    }

    /// The runner gives `key`, which has more work, back to the queue behind the keys waiting,
    /// and takes the next in turn: a task with a long outbox does not keep a runner from
    /// another cluster's task.
    pub fn requeue(&mut self, key: &K, now: Instant) {
        let Some(Slot::Running { flow, .. }) = self.keys.get(key).cloned() else {
            return;
        };
        self.keys.insert(key.clone(), Slot::Queued);
        self.queue.push(&flow, key.clone(), now);
    }

    /// A call for `key` failed: it waits out its delay away from the runners (which go on with
    /// other keys) with its streak kept for the next try.
    pub fn back_off(&mut self, key: &K, retry: Retry) {
        let flow = match self.keys.remove(key) {
            Some(Slot::Running { flow, .. } | Slot::Backoff { flow }) => flow,
            _ => Flow::new(),
        };
        self.keys.insert(key.clone(), Slot::Backoff { flow });
        self.retries.insert(key.clone(), retry);
    }

    /// `key`'s delay is over: it goes back in the queue. True when the caller must start a
    /// runner.
    pub fn backoff_over(&mut self, key: &K, now: Instant) -> bool {
        let Some(Slot::Backoff { flow }) = self.keys.get(key).cloned() else {
            return false;
        };
        self.keys.insert(key.clone(), Slot::Queued);
        self.queue.push(&flow, key.clone(), now);
        self.want_runner()
    }

    /// The shard stops under a runner working on `key`: the key is forgotten (its work stays
    /// in Redis for the next owner) and the runner exits.
    pub fn stop(&mut self, key: &K) {
        self.keys.remove(key);
        self.retries.remove(key);
        self.failures.remove(key);
        self.runners -= 1;
    }

    /// The streaks of keys waiting out a backoff.
    pub fn retries(&self) -> impl Iterator<Item = &Retry> {
        self.retries.values()
    }

    pub fn runners(&self) -> usize {
        self.runners
    }

    /// Keys waiting for a runner, by flow.
    pub fn backlog(&self, now: Instant) -> Backlog {
        self.queue.backlog(now)
    }
}

/// What a runner takes next.
#[derive(Debug)]
pub struct Next<K> {
    pub key: K,
    pub flow: Flow,
    pub queued: Instant,
    pub retry: Option<Retry>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t0() -> Instant {
        Instant::now()
    }

    #[test]
    fn backoff_follows_rule_9() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
        let bases = [1.0, 1.3, 1.69, 2.197];
        for base in bases {
            let d = b.next_delay().as_secs_f64();
            assert!(d >= base - 1e-6 && d < base * 1.2 + 1e-6, "{d} vs {base}");
        }
        for _ in 0..20 {
            b.next_delay();
        }
        let d = b.next_delay().as_secs_f64();
        assert!((30.0..36.0).contains(&d), "{d}");
        b.reset();
        assert!(b.next_delay() < Duration::from_millis(1200));
    }

    #[test]
    fn fairness_round_robin_over_flows_fifo_within_each() {
        let mut q = FairQueue::default();
        let now = t0();
        for i in 0..5 {
            q.push("storm", format!("s{i}"), now);
        }
        q.push("quiet", "q0".to_string(), now);
        q.push("other", "o0".to_string(), now);
        q.push("quiet", "q1".to_string(), now);
        let order: Vec<String> = std::iter::from_fn(|| q.pop().map(|(_, k, _)| k)).collect();
        assert_eq!(
            order,
            ["s0", "q0", "o0", "s1", "q1", "s2", "s3", "s4"],
            "one turn per flow, each flow in order; a lone flow gets every turn"
        );
        assert!(q.is_empty());
    }

    #[test]
    fn fairness_a_new_flow_waits_at_most_one_round() {
        let mut q = FairQueue::default();
        let now = t0();
        for f in ["a", "b", "c"] {
            for i in 0..100 {
                q.push(f, (f, i), now);
            }
        }
        q.pop();
        q.push("late", ("late", 0), now);
        // a went; then b, c, a and the newcomer: after one turn of each waiting flow.
        let before: Vec<String> = std::iter::from_fn(|| q.pop())
            .map(|(f, _, _)| f)
            .take_while(|f| f != "late")
            .collect();
        assert_eq!(before, ["b", "c", "a"]);
    }

    #[test]
    fn fairness_removing_a_waiter_keeps_the_rest_in_turn() {
        let mut q = FairQueue::default();
        let now = t0();
        q.push("a", 1, now);
        q.push("b", 2, now);
        q.push("a", 3, now);
        assert!(q.remove("b", &2));
        assert!(!q.remove("b", &2));
        assert_eq!(q.len(), 2);
        let order: Vec<i32> = std::iter::from_fn(|| q.pop().map(|(_, x, _)| x)).collect();
        assert_eq!(order, [1, 3]);
        assert!(q.backlog(now).flows.is_empty());
    }

    #[test]
    fn backlog_names_the_flows_with_the_most_and_the_oldest_head() {
        let mut q = FairQueue::default();
        let start = t0();
        q.push("a", 1, start);
        q.push("b", 2, start + Duration::from_secs(1));
        q.push("b", 3, start + Duration::from_secs(2));
        let b = q.backlog(start + Duration::from_secs(5));
        assert_eq!(b.flows, [("b".to_string(), 2), ("a".to_string(), 1)]);
        assert_eq!(b.oldest, Duration::from_secs(5));
        let mut merged = b.clone();
        merged.merge(Backlog {
            flows: vec![("a".into(), 4)],
            oldest: Duration::from_secs(9),
        });
        assert_eq!(merged.flows, [("a".to_string(), 5), ("b".to_string(), 2)]);
        assert_eq!(merged.oldest, Duration::from_secs(9));
    }

    /// Drives a board like the senders do, checking on every step that no key has two runners.
    struct Sim {
        board: Board<u32>,
        running: Vec<u32>,
    }

    impl Sim {
        fn take(&mut self) -> Option<u32> {
            let next = self.board.next(false)?;
            assert!(
                !self.running.contains(&next.key),
                "key {} handed to a second runner",
                next.key
            );
            self.running.push(next.key);
            Some(next.key)
        }
    }

    #[test]
    fn one_runner_per_key_however_often_it_is_woken() {
        let mut sim = Sim {
            board: Board::new(4),
            running: Vec::new(),
        };
        let now = t0();
        assert!(sim.board.wake(&1, "a", now), "first work starts a runner");
        assert!(
            !sim.board.wake(&1, "a", now),
            "queued once, no second runner"
        );
        assert_eq!(sim.take(), Some(1));
        // Woken while running: not queued again, so no other runner can take it.
        sim.board.wake(&1, "a", now);
        sim.board.wake(&1, "a", now);
        assert!(sim.board.next(false).is_none(), "nothing else queued");
        assert_eq!(sim.board.runners(), 0);
    }

    #[test]
    fn no_wake_is_lost_between_the_read_and_the_finish() {
        let mut board: Board<u32> = Board::new(2);
        let now = t0();
        board.wake(&7, "a", now);
        let key = board.next(false).expect("queued").key;
        board.reading(&key);
        // The outbox was read empty, then intake appended and woke the key.
        board.wake(&7, "a", now);
        assert!(!board.finish(&7), "woken after the read: read again");
        board.reading(&7);
        assert!(board.finish(&7), "nothing new since: done");
        // Done and forgotten: the next wake queues it again.
        assert!(board.wake(&7, "a", now) || board.runners() > 0);
        assert_eq!(board.next(false).map(|n| n.key), Some(7));
    }

    #[test]
    fn runners_stay_within_the_bound_and_leave_only_when_the_queue_is_empty() {
        let mut board: Board<u32> = Board::new(3);
        let now = t0();
        let started = (0..10).filter(|k| board.wake(k, "a", now)).count();
        assert_eq!(started, 3, "three runners for ten keys");
        assert_eq!(board.runners(), 3);
        let mut served = 0;
        for _ in 0..3 {
            while let Some(n) = board.next(false) {
                assert!(board.finish(&n.key));
                served += 1;
            }
        }
        assert_eq!(served, 10);
        assert_eq!(
            board.runners(),
            0,
            "each runner left once the queue was empty"
        );
        // A stopping shard sends its runners home with keys still queued.
        board.wake(&20, "a", now);
        assert!(board.next(true).is_none());
        assert_eq!(board.runners(), 0);
    }

    #[test]
    fn fairness_a_free_runner_takes_the_next_flow_in_turn() {
        let mut board: Board<u32> = Board::new(1);
        let now = t0();
        for k in 0..50 {
            board.wake(&k, "storm", now);
        }
        board.wake(&100, "quiet", now);
        let mut order = Vec::new();
        for _ in 0..3 {
            let n = board.next(false).expect("queued");
            assert!(board.finish(&n.key));
            order.push(n.key);
        }
        assert_eq!(
            order,
            [0, 100, 1],
            "the quiet key after one storm key, not fifty"
        );
    }

    #[test]
    fn fairness_a_key_with_more_work_gives_its_runner_to_another_cluster() {
        let mut board: Board<u32> = Board::new(1);
        let now = t0();
        board.wake(&1, "storm", now);
        board.wake(&2, "storm", now);
        let n = board.next(false).expect("queued");
        assert_eq!(n.key, 1);
        assert!(
            !board.others_wait("storm"),
            "only its own cluster waits: keep going"
        );
        board.wake(&9, "quiet", now);
        assert!(board.others_wait("storm"));
        board.requeue(&1, now);
        let order: Vec<u32> = std::iter::from_fn(|| {
            let n = board.next(false)?;
            board.finish(&n.key);
            Some(n.key)
        })
        .collect();
        assert_eq!(
            order,
            [2, 9, 1],
            "the quiet key after one turn of the storm, not after the storm key's whole outbox"
        );
    }

    #[test]
    fn backoff_re_entry_keeps_the_streak_and_the_key_out_of_the_runners_meanwhile() {
        let mut board: Board<u32> = Board::new(2);
        let now = t0();
        board.wake(&1, "a", now);
        let n = board.next(false).expect("queued");
        assert!(n.retry.is_none());
        let mut backoff = Backoff::new(Duration::from_millis(10), Duration::from_secs(1));
        backoff.next_delay();
        board.back_off(
            &1,
            Retry {
                backoff,
                attempts: 1,
                since: now,
            },
        );
        assert_eq!(board.retries().count(), 1);
        // Woken during the backoff: neither queued nor run before the delay is over.
        assert!(!board.wake(&1, "a", now));
        assert!(
            board.next(false).is_none(),
            "the runner leaves; key 1 waits out its delay"
        );
        assert!(
            board.backoff_over(&1, now),
            "queued again, with a runner for it"
        );
        let n = board.next(false).expect("back in the queue");
        assert_eq!(n.key, 1);
        assert_eq!(n.flow, "a", "back in its own flow");
        let retry = n.retry.expect("the streak comes back");
        assert_eq!(retry.attempts, 1);
        assert!(retry.backoff.current() > Duration::from_millis(10));
        assert_eq!(board.retries().count(), 0);
        // A timer that fires for a key no longer in backoff changes nothing.
        assert!(!board.backoff_over(&1, now));
    }

    #[test]
    fn live_state_follows_the_runner_and_the_backoff() {
        let mut board: Board<u32> = Board::new(1);
        let now = t0();
        assert_eq!(board.live(&1, now), None, "no work held");
        board.wake(&1, "a", now);
        board.wake(&2, "a", now);
        assert_eq!(
            board.live(&2, now).map(|l| l.state),
            Some("waiting for a runner")
        );
        board.next(false).expect("queued");
        board.phase(&1, Phase::Permit);
        assert_eq!(
            board.live(&1, now).map(|l| l.state),
            Some("waiting for a permit")
        );
        board.phase(&1, Phase::Call);
        assert_eq!(board.live(&1, now).map(|l| l.state), Some("in flight"));
        board.failed(
            &1,
            3,
            "ServerException: busy".into(),
            Duration::from_secs(5),
        );
        let retry = Retry {
            backoff: Backoff::new(Duration::from_secs(1), Duration::from_secs(30)),
            attempts: 3,
            since: now,
        };
        board.back_off(&1, retry);
        let live = board.live(&1, Instant::now()).expect("held");
        assert_eq!(live.state, "backing off");
        assert_eq!(live.attempts, 3);
        assert_eq!(live.last_error.as_deref(), Some("ServerException: busy"));
        assert!(live
            .next_attempt_in_ms
            .is_some_and(|ms| ms > 4_000 && ms <= 5_000));
        board.backoff_over(&1, now);
        let n = board.next(false).expect("queued again");
        assert_eq!(n.key, 2);
        board.finish(&2);
        board.next(false).expect("key 1 again");
        board.succeeded(&1);
        assert_eq!(board.live(&1, now).map(|l| l.attempts), Some(0));
    }

    #[test]
    fn a_stopped_key_is_forgotten_and_its_runner_counted_out() {
        let mut board: Board<u32> = Board::new(2);
        let now = t0();
        board.wake(&1, "a", now);
        let n = board.next(false).expect("queued");
        board.stop(&n.key);
        assert_eq!(board.runners(), 0);
        assert!(board.wake(&1, "a", now), "a later wake starts afresh");
    }
}
