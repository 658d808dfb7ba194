//! The nemesis's plan, and its bookkeeping of the worker slots as a pure state machine (no
//! processes, no async): the seeded schedule of faults, the timeline that interleaves them with
//! the heals they call for, and [`Slots`], which says what each fault or heal does to a
//! worker's process. `nemesis.rs` drives the real processes from it; the unit tests here replay
//! schedules through it alone.
//!
//! The rules, each one a lesson from a harness that lost its own workers (issue 33: it killed a
//! paused worker that a SIGTERM or a second SIGSTOP was drawn for, and a restarted worker that
//! an old pause's resume found, and never started either again):
//! - a fault on a slot that is not `Up` is skipped, and says why;
//! - a heal carries the generation of the process it was made for, and does nothing to a newer
//!   one (it is stale, and says so);
//! - no transition ends a process but the fault that means to (SIGKILL, SIGTERM), and a killed
//!   slot always has its restart due.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

pub const WORKERS: usize = 3;

#[derive(Clone, Copy, Debug)]
pub enum Fault {
    Kill {
        worker: usize,
        down: Duration,
    },
    Term {
        worker: usize,
    },
    Pause {
        worker: usize,
        span: Duration,
    },
    CutRedis {
        worker: usize,
        span: Duration,
    },
    CutAmqp {
        worker: usize,
        span: Duration,
    },
    EcsErrors {
        span: Duration,
    },
    EcsThrottle {
        span: Duration,
    },
    /// HA only: SIGKILL of the Redis primary, restarted (as a replica) after `down`.
    RedisFailover {
        down: Duration,
    },
    /// HA only: SIGKILL of one RabbitMQ node, restarted after `down`.
    NodeLoss {
        node: usize,
        down: Duration,
    },
}

impl Fault {
    pub fn kind(&self) -> &'static str {
        match self {
            Fault::Kill { .. } => "SIGKILL",
            Fault::Term { .. } => "SIGTERM",
            Fault::Pause { .. } => "SIGSTOP",
            Fault::CutRedis { .. } => "Redis cut",
            Fault::CutAmqp { .. } => "RabbitMQ cut",
            Fault::EcsErrors { .. } => "ECS ServerException",
            Fault::EcsThrottle { .. } => "ECS throttling",
            Fault::RedisFailover { .. } => "Redis failover",
            Fault::NodeLoss { .. } => "RabbitMQ node loss",
        }
    }
}

/// The faults of `seed`: (offset from the start, fault), one every 1–3 s. `ha` adds the HA
/// faults to the draw (without it, a seed's schedule is what it always was). The draw order
/// must never change: a seed replays its schedule exactly.
pub fn schedule(seed: u64, length: Duration, ha: bool) -> Vec<(Duration, Fault)> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut at = Duration::ZERO;
    let mut out = Vec::new();
    loop {
        at += Duration::from_millis(rng.random_range(1_000..=3_000));
        if at >= length {
            return out;
        }
        let worker = rng.random_range(0..WORKERS);
        let span = Duration::from_millis(rng.random_range(2_000..=6_000));
        let fault = match rng.random_range(0..if ha { 9 } else { 7 }) {
            0 => Fault::Kill {
                worker,
                down: Duration::from_millis(rng.random_range(1_000..=3_000)),
            },
            1 => Fault::Term { worker },
            2 => Fault::Pause { worker, span },
            3 => Fault::CutRedis { worker, span },
            4 => Fault::CutAmqp { worker, span },
            5 => Fault::EcsErrors { span },
            6 => Fault::EcsThrottle { span },
            7 => Fault::RedisFailover {
                down: Duration::from_millis(rng.random_range(8_000..=15_000)),
            },
            _ => Fault::NodeLoss {
                node: rng.random_range(0..3),
                down: Duration::from_millis(rng.random_range(5_000..=15_000)),
            },
        };
        out.push((at, fault));
    }
}

/// What ends a fault. A worker's heal names the generation (the process) it was made for.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Heal {
    Restart { worker: usize, generation: u64 },
    Resume { worker: usize, generation: u64 },
    RestoreRedis(usize),
    RestoreAmqp(usize),
    EcsErrorsOff,
    EcsThrottleOff,
    RestartRedis(u16),
    RestartNode(usize),
}

/// One step of a run, in time order.
#[derive(Clone, Copy, Debug)]
pub enum Step {
    Fault(Duration, Fault),
    Heal(Duration, Heal),
}

/// The schedule's faults interleaved with the heals they called for: a heal due at or before
/// the next fault goes first; heals due at the same time go in the order they were made.
pub struct Timeline {
    plan: Vec<(Duration, Fault)>,
    next: usize,
    heals: Vec<(Duration, Heal)>,
}

impl Timeline {
    pub fn new(plan: Vec<(Duration, Fault)>) -> Timeline {
        Timeline {
            plan,
            next: 0,
            heals: Vec::new(),
        }
    }

    pub fn heal_at(&mut self, at: Duration, heal: Heal) {
        self.heals.push((at, heal));
        self.heals.sort_by_key(|(at, _)| *at);
    }

    pub fn next_step(&mut self) -> Option<Step> {
        let fault_at = self.plan.get(self.next).map(|(at, _)| *at);
        let heal_at = self.heals.first().map(|(at, _)| *at);
        match (fault_at, heal_at) {
            (Some(f), Some(h)) if h <= f => {
                let (at, heal) = self.heals.remove(0);
                Some(Step::Heal(at, heal))
            }
            (Some(_), _) => {
                let (at, fault) = self.plan[self.next];
                self.next += 1;
                Some(Step::Fault(at, fault))
            }
            (None, Some(_)) => {
                let (at, heal) = self.heals.remove(0);
                Some(Step::Heal(at, heal))
            }
            (None, None) => None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlotState {
    Up,
    Paused,
    Down,
}

/// What the driver does to a worker's processes for one fault or heal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Act {
    /// SIGKILL the process; its restart is due.
    Kill,
    /// SIGTERM the process, wait for its clean exit, start a new one.
    TermAndRespawn,
    /// SIGSTOP the process; its resume is due.
    Stop,
    /// SIGCONT the paused process.
    Cont,
    /// Start a new process in the empty slot.
    Spawn,
}

/// Why a worker fault or heal did nothing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Moot {
    /// A fault drawn for a worker that is not running: it is mid-fault, with its heal due.
    NotUp(SlotState),
    /// A heal made for a process that a later fault has already ended or replaced.
    Stale { made_for: u64, now: u64 },
}

impl fmt::Display for Moot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Moot::NotUp(s) => write!(f, "the worker is {s:?}"),
            Moot::Stale { made_for, now } => write!(
                f,
                "stale: made for generation {made_for}, the slot is at {now}"
            ),
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Slot {
    state: SlotState,
    /// The number of the slot's current (or last) process: 0 for the first, +1 per start.
    generation: u64,
}

/// The worker slots' bookkeeping: which state each slot is in, and what a fault or heal does.
#[derive(Clone, Debug)]
pub struct Slots {
    slots: Vec<Slot>,
}

impl Slots {
    pub fn new(workers: usize) -> Slots {
        Slots {
            slots: vec![
                Slot {
                    state: SlotState::Up,
                    generation: 0,
                };
                workers
            ],
        }
    }

    pub fn state(&self, worker: usize) -> SlotState {
        self.slots[worker].state
    }

    pub fn generation(&self, worker: usize) -> u64 {
        self.slots[worker].generation
    }

    pub fn all_up(&self) -> bool {
        self.slots.iter().all(|s| s.state == SlotState::Up)
    }

    /// A worker fault (SIGKILL, SIGTERM, SIGSTOP): what to do to the process, and the heal it
    /// calls for; or why it is skipped. Other faults do not touch the slots (None).
    pub fn fault(&mut self, fault: &Fault) -> Option<Result<(Act, Option<Heal>), Moot>> {
        let (worker, act) = match *fault {
            Fault::Kill { worker, .. } => (worker, Act::Kill),
            Fault::Term { worker } => (worker, Act::TermAndRespawn),
            Fault::Pause { worker, .. } => (worker, Act::Stop),
            _ => return None,
        };
        let slot = &mut self.slots[worker];
        if slot.state != SlotState::Up {
            return Some(Err(Moot::NotUp(slot.state)));
        }
        let generation = slot.generation;
        let heal = match act {
            Act::Kill => {
                slot.state = SlotState::Down;
                Some(Heal::Restart { worker, generation })
            }
            Act::TermAndRespawn => {
                slot.generation += 1;
                None
            }
            Act::Stop => {
                slot.state = SlotState::Paused;
                Some(Heal::Resume { worker, generation })
            }
            Act::Cont | Act::Spawn => unreachable!("faults only kill, terminate or stop"),
        };
        Some(Ok((act, heal)))
    }

    /// A worker heal: what to do, or why it is moot. Other heals do not touch the slots (None).
    pub fn heal(&mut self, heal: &Heal) -> Option<Result<Act, Moot>> {
        let (worker, made_for, wanted, act) = match *heal {
            Heal::Restart { worker, generation } => {
                (worker, generation, SlotState::Down, Act::Spawn)
            }
            Heal::Resume { worker, generation } => {
                (worker, generation, SlotState::Paused, Act::Cont)
            }
            _ => return None,
        };
        let slot = &mut self.slots[worker];
        if slot.generation != made_for || slot.state != wanted {
            return Some(Err(Moot::Stale {
                made_for,
                now: slot.generation,
            }));
        }
        if act == Act::Spawn {
            slot.generation += 1;
        }
        slot.state = SlotState::Up;
        Some(Ok(act))
    }
}

/// Draws of one kind, none applied, that fail a run.
const NEVER_APPLIED: usize = 3;

/// Faults drawn, applied and skipped, by kind: the checker's view of what the nemesis did.
#[derive(Default, Debug)]
pub struct Tally {
    drawn: BTreeMap<&'static str, usize>,
    applied: BTreeMap<&'static str, usize>,
    skipped: BTreeMap<&'static str, usize>,
    /// Kinds this setup cannot apply (a Redis cut with Sentinel: no per-worker proxy).
    inapplicable: BTreeMap<&'static str, usize>,
}

impl Tally {
    pub fn drawn(&mut self, kind: &'static str) {
        *self.drawn.entry(kind).or_default() += 1;
    }
    pub fn applied(&mut self, kind: &'static str) {
        *self.applied.entry(kind).or_default() += 1;
    }
    pub fn skipped(&mut self, kind: &'static str) {
        *self.skipped.entry(kind).or_default() += 1;
    }
    pub fn inapplicable(&mut self, kind: &'static str) {
        *self.inapplicable.entry(kind).or_default() += 1;
    }

    /// `kind drawn/applied` for every kind drawn (`n/n.a.` for a kind this setup lacks).
    pub fn table(&self) -> String {
        let applicable = self
            .drawn
            .iter()
            .map(|(k, d)| format!("{k} {d}/{}", self.applied.get(k).unwrap_or(&0)));
        let inapplicable = self
            .inapplicable
            .iter()
            .map(|(k, d)| format!("{k} {d}/n.a."));
        applicable
            .chain(inapplicable)
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// What is wrong with the tally: a draw neither applied nor skipped for a logged reason,
    /// or a kind drawn [`NEVER_APPLIED`] times or more and never applied (every draw found its
    /// target mid-fault: the run did not test that fault at all, as when the old harness had
    /// lost the workers). A kind drawn once or twice may find its target mid-fault each time.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (kind, &drawn) in &self.drawn {
            let applied = *self.applied.get(kind).unwrap_or(&0);
            let skipped = *self.skipped.get(kind).unwrap_or(&0);
            if applied + skipped != drawn {
                out.push(format!(
                    "{kind}: drawn {drawn}, applied {applied}, skipped {skipped}: {} unaccounted for",
                    drawn as i64 - applied as i64 - skipped as i64
                ));
            }
            if applied == 0 && drawn >= NEVER_APPLIED {
                out.push(format!("{kind}: drawn {drawn}, never applied"));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The seed whose 10-minute HA run stopped draining with no worker left (issue 33).
    const LOST_SEED: u64 = 5_453_656_272_324_569_950;

    /// The old harness's slot rules, kept here only to show what they did: `apply` took the slot
    /// (leaving `Down`) before it checked what was there, so a SIGTERM or SIGSTOP drawn for a
    /// paused worker, or a resume that found a restarted one, dropped the process (SIGKILL) and
    /// left the slot `Down` with no restart due. Returns the slots so lost, with when and how,
    /// and the SIGTERMs applied.
    fn old_rules(plan: Vec<(Duration, Fault)>) -> (Vec<String>, usize) {
        let mut state = [SlotState::Up; WORKERS];
        let mut restarts_due = [0usize; WORKERS];
        let mut lost = Vec::new();
        let mut terms = 0;
        let mut timeline = Timeline::new(plan);
        let mut leave = |w: usize, at: Duration, how: &str, restarts_due: &[usize]| {
            if restarts_due[w] == 0 {
                lost.push(format!(
                    "{:.1}s worker {w} left Down with no restart due ({how})",
                    at.as_secs_f64()
                ));
            }
        };
        while let Some(step) = timeline.next_step() {
            match step {
                Step::Fault(at, Fault::Kill { worker, down }) => {
                    if state[worker] != SlotState::Down {
                        state[worker] = SlotState::Down;
                        restarts_due[worker] += 1;
                        timeline.heal_at(
                            at + down,
                            Heal::Restart {
                                worker,
                                generation: 0,
                            },
                        );
                    }
                }
                Step::Fault(at, Fault::Term { worker }) => match state[worker] {
                    SlotState::Up => terms += 1,
                    SlotState::Paused => {
                        state[worker] = SlotState::Down;
                        leave(worker, at, "SIGTERM on a paused worker", &restarts_due);
                    }
                    SlotState::Down => {}
                },
                Step::Fault(at, Fault::Pause { worker, span }) => match state[worker] {
                    SlotState::Up => {
                        state[worker] = SlotState::Paused;
                        timeline.heal_at(
                            at + span,
                            Heal::Resume {
                                worker,
                                generation: 0,
                            },
                        );
                    }
                    SlotState::Paused => {
                        state[worker] = SlotState::Down;
                        leave(worker, at, "SIGSTOP on a paused worker", &restarts_due);
                    }
                    SlotState::Down => {}
                },
                Step::Heal(_, Heal::Restart { worker, .. }) => {
                    restarts_due[worker] -= 1;
                    if state[worker] == SlotState::Down {
                        state[worker] = SlotState::Up;
                    }
                }
                Step::Heal(at, Heal::Resume { worker, .. }) => match state[worker] {
                    SlotState::Paused => state[worker] = SlotState::Up,
                    SlotState::Up => {
                        state[worker] = SlotState::Down;
                        leave(
                            worker,
                            at,
                            "a resume that found a restarted worker",
                            &restarts_due,
                        );
                    }
                    SlotState::Down => {}
                },
                Step::Fault(..) | Step::Heal(..) => {}
            }
        }
        (lost, terms)
    }

    /// The new rules over a whole schedule: every transition, the slots lost (a slot left
    /// `Down` with no restart due), and whether every slot ends `Up`.
    fn new_rules(plan: Vec<(Duration, Fault)>) -> (Vec<String>, Vec<String>, bool, Tally) {
        let mut slots = Slots::new(WORKERS);
        let mut restarts_due = [0usize; WORKERS];
        let mut log = Vec::new();
        let mut lost = Vec::new();
        let mut tally = Tally::default();
        let mut timeline = Timeline::new(plan);
        while let Some(step) = timeline.next_step() {
            let (at, what) = match step {
                Step::Fault(at, fault) => {
                    let worker_fault = slots.fault(&fault);
                    if worker_fault.is_some() {
                        tally.drawn(fault.kind());
                    }
                    match worker_fault {
                        None => continue,
                        Some(Ok((act, heal))) => {
                            tally.applied(fault.kind());
                            let due = match (fault, heal) {
                                (Fault::Kill { down, .. }, Some(h)) => Some((at + down, h)),
                                (Fault::Pause { span, .. }, Some(h)) => Some((at + span, h)),
                                _ => None,
                            };
                            if let Some((when, h)) = due {
                                if let Heal::Restart { worker, .. } = h {
                                    restarts_due[worker] += 1;
                                }
                                timeline.heal_at(when, h);
                            }
                            (at, format!("{fault:?}: {act:?}"))
                        }
                        Some(Err(moot)) => {
                            tally.skipped(fault.kind());
                            (at, format!("{fault:?}: skipped, {moot}"))
                        }
                    }
                }
                Step::Heal(at, heal) => {
                    if let Heal::Restart { worker, .. } = heal {
                        restarts_due[worker] -= 1;
                    }
                    match slots.heal(&heal) {
                        None => continue,
                        Some(Ok(act)) => (at, format!("{heal:?}: {act:?}")),
                        Some(Err(moot)) => (at, format!("{heal:?}: {moot}")),
                    }
                }
            };
            for (w, due) in restarts_due.iter().enumerate() {
                if slots.state(w) == SlotState::Down && *due == 0 {
                    lost.push(format!(
                        "{:.1}s worker {w} Down with no restart due",
                        at.as_secs_f64()
                    ));
                }
            }
            log.push(format!("{:>7.2}s {what}", at.as_secs_f64()));
        }
        (log, lost, slots.all_up(), tally)
    }

    /// A SIGSTOP of worker 0 for `secs`.
    fn pause_w0(secs: u64) -> Fault {
        Fault::Pause {
            worker: 0,
            span: Duration::from_secs(secs),
        }
    }

    #[test]
    fn the_old_rules_lost_three_workers_of_the_failing_seed_and_the_new_rules_none() {
        let plan = schedule(LOST_SEED, Duration::from_secs(600), true);
        let terms_drawn = plan
            .iter()
            .filter(|(_, f)| matches!(f, Fault::Term { .. }))
            .count();
        let (lost, terms) = old_rules(plan.clone());
        println!(
            "old rules, seed {LOST_SEED}: SIGTERM drawn {terms_drawn}, applied {terms}\n{}",
            lost.join("\n")
        );
        assert_eq!(
            lost,
            [
                "44.3s worker 0 left Down with no restart due (SIGSTOP on a paused worker)",
                "244.2s worker 2 left Down with no restart due (SIGSTOP on a paused worker)",
                "378.0s worker 1 left Down with no restart due (SIGSTOP on a paused worker)",
            ],
            "the old rules' lost slots, as the failing run saw them"
        );
        assert_eq!((terms_drawn, terms), (33, 9));

        let (log, lost, all_up, tally) = new_rules(plan);
        println!("new rules: {}\n{}", tally.table(), log.join("\n"));
        assert!(lost.is_empty(), "slots lost under the new rules: {lost:?}");
        assert!(all_up, "every slot is Up once every heal has run");
        assert!(tally.problems().is_empty(), "{:?}", tally.problems());
    }

    /// The three 10-minute runs docs/reliability.md listed before this harness passed with
    /// workers lost for much of the run: the old rules' replay of their schedules.
    #[test]
    fn the_old_rules_lost_workers_in_the_earlier_documented_runs() {
        let runs: [(u64, &[&str]); 3] = [
            (8_316_092_720_147_849_238, &["267.8s worker 2"]),
            (
                18_435_517_338_312_571_208,
                &["65.6s worker 1", "256.4s worker 0"],
            ),
            (
                668_791_469_258_927_203,
                &["52.8s worker 2", "300.2s worker 1"],
            ),
        ];
        for (seed, want) in runs {
            let (lost, terms) = old_rules(schedule(seed, Duration::from_secs(600), true));
            println!("seed {seed}: SIGTERM applied {terms}; {lost:?}");
            let when: Vec<&str> = lost
                .iter()
                .map(|l| l.split(" left").next().unwrap_or_default())
                .collect();
            assert_eq!(when, want, "seed {seed}: {lost:?}");
        }
    }

    /// The same over many schedules, HA and local, long and short: no slot is ever left `Down`
    /// without its restart due, every slot ends `Up`, and every draw is applied or skipped.
    #[test]
    fn no_schedule_loses_a_slot_under_the_new_rules() {
        for seed in 0..300u64 {
            for (length, ha) in [(30, false), (600, true)] {
                let plan = schedule(seed, Duration::from_secs(length), ha);
                let (log, lost, all_up, tally) = new_rules(plan);
                assert!(lost.is_empty(), "seed {seed}: {lost:?}\n{}", log.join("\n"));
                assert!(all_up, "seed {seed}: not every slot Up at the end");
                let unaccounted: Vec<String> = tally
                    .problems()
                    .into_iter()
                    .filter(|p| p.contains("unaccounted"))
                    .collect();
                assert!(unaccounted.is_empty(), "seed {seed}: {unaccounted:?}");
            }
        }
    }

    /// The test command's seeds (30 s, local) and the 60 s HA regression seed apply every
    /// worker fault kind they draw at least once.
    #[test]
    fn the_regression_seeds_apply_every_worker_fault_kind_they_draw() {
        let seeds = [
            (1, 30, false),
            (2, 30, false),
            (3, 30, false),
            (8, 30, false),
        ];
        let more = [(11, 30, false), (9_359_797_762_308_562_093, 60, true)];
        for (seed, length, ha) in seeds.into_iter().chain(more) {
            let (_, lost, all_up, tally) =
                new_rules(schedule(seed, Duration::from_secs(length), ha));
            println!("seed {seed}: {}", tally.table());
            assert!(lost.is_empty() && all_up, "seed {seed}: {lost:?}");
            assert!(
                tally.problems().is_empty(),
                "seed {seed}: {:?}",
                tally.problems()
            );
        }
    }

    #[test]
    fn a_fault_on_a_slot_that_is_not_up_is_skipped() {
        let mut slots = Slots::new(1);
        let pause = pause_w0(2);
        assert_eq!(
            slots.fault(&pause),
            Some(Ok((
                Act::Stop,
                Some(Heal::Resume {
                    worker: 0,
                    generation: 0
                })
            )))
        );
        for fault in [pause, Fault::Term { worker: 0 }] {
            assert_eq!(
                slots.fault(&fault),
                Some(Err(Moot::NotUp(SlotState::Paused)))
            );
        }
        let kill = Fault::Kill {
            worker: 0,
            down: Duration::from_secs(1),
        };
        assert_eq!(
            slots.fault(&kill),
            Some(Err(Moot::NotUp(SlotState::Paused)))
        );
        assert_eq!(
            slots.state(0),
            SlotState::Paused,
            "the paused process lives on"
        );
        let Some(Ok(Act::Cont)) = slots.heal(&Heal::Resume {
            worker: 0,
            generation: 0,
        }) else {
            panic!("the resume applies");
        };
        assert!(matches!(
            slots.fault(&kill),
            Some(Ok((Act::Kill, Some(Heal::Restart { .. }))))
        ));
        for fault in [kill, pause, Fault::Term { worker: 0 }] {
            assert_eq!(slots.fault(&fault), Some(Err(Moot::NotUp(SlotState::Down))));
        }
    }

    #[test]
    fn a_heal_does_nothing_to_a_newer_process() {
        let mut slots = Slots::new(1);
        let pause = pause_w0(6);
        let kill = Fault::Kill {
            worker: 0,
            down: Duration::from_secs(1),
        };
        let Some(Ok((_, Some(restart)))) = slots.fault(&kill) else {
            panic!("the kill applies");
        };
        assert_eq!(slots.heal(&restart), Some(Ok(Act::Spawn)));
        assert_eq!(slots.generation(0), 1);
        let Some(Ok((_, Some(resume)))) = slots.fault(&pause) else {
            panic!("the pause applies");
        };
        assert_eq!(
            slots.fault(&Fault::Term { worker: 0 }),
            Some(Err(Moot::NotUp(SlotState::Paused)))
        );
        // A resume made for the first process (generation 0) finds the second paused: it is
        // left alone, and its own resume (generation 1) wakes it.
        let old_resume = Heal::Resume {
            worker: 0,
            generation: 0,
        };
        assert_eq!(
            slots.heal(&old_resume),
            Some(Err(Moot::Stale {
                made_for: 0,
                now: 1
            }))
        );
        assert_eq!(slots.state(0), SlotState::Paused);
        assert_eq!(slots.heal(&resume), Some(Ok(Act::Cont)));
        assert_eq!(slots.state(0), SlotState::Up);
        // So is a restart for a process already restarted: it starts no second one.
        assert_eq!(
            slots.heal(&restart),
            Some(Err(Moot::Stale {
                made_for: 0,
                now: 1
            }))
        );
        assert_eq!(slots.generation(0), 1);
    }

    #[test]
    fn the_tally_flags_a_kind_never_applied_and_a_draw_unaccounted_for() {
        let mut tally = Tally::default();
        for _ in 0..NEVER_APPLIED {
            tally.drawn("SIGTERM");
            tally.skipped("SIGTERM");
        }
        tally.drawn("SIGSTOP");
        tally.skipped("SIGSTOP");
        tally.drawn("SIGKILL");
        tally.drawn("SIGKILL");
        tally.applied("SIGKILL");
        assert_eq!(
            tally.problems(),
            [
                "SIGKILL: drawn 2, applied 1, skipped 0: 1 unaccounted for",
                "SIGTERM: drawn 3, never applied"
            ]
        );
        assert_eq!(tally.table(), "SIGKILL 2/1, SIGSTOP 1/0, SIGTERM 3/0");
    }
}
