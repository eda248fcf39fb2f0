//! The event loop's decisions, as pure functions of the events and the time: what to
//! check after a batch of events, and whether a needed write may run now.

use std::time::Instant;

use crate::plan::Plan;
use crate::throttle::{Fight, Throttle, Verdict};

/// What the loop reacts to. Tests inject these; in production they come from inotify,
/// timers and signals ([`crate::sources`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A configuration file changed in the net dir.
    NetDir,
    /// Our kubeconfig changed (or went) in the net dir.
    Kubeconfig,
    /// Our binary changed (or went) in a bin dir.
    Binary,
    /// The service-account token changed (a projected volume swaps its `..data` link).
    Token,
    /// `CFGCHECK_INTERVAL` elapsed: check everything, whatever the watches said.
    Backstop,
    /// `REFRESH_SA_TOKEN_INTERVAL` elapsed.
    TokenTick,
    /// A repair held back by the throttle is due.
    Wake,
    /// SIGTERM or SIGINT: remove ourselves and exit.
    Shutdown,
}

/// What to look at now.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Checks {
    pub chain: bool,
    pub kubeconfig: bool,
    pub binary: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Check(Checks),
    Remove,
}

/// Whether the chain check's plan may be applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    /// Write now. `repair`: our entry had been in place and was taken out.
    Write { repair: bool, fight: Option<Fight> },
    /// The file is being fought over; the repair waits until then.
    Defer(Instant),
    /// Nothing to write.
    Idle,
}

#[derive(Debug)]
pub struct Machine {
    throttle: Throttle,
    /// A held-back repair's due time; chain checks wait for it.
    deferred: Option<Instant>,
    /// We have put our entry in once: any later write is a repair.
    installed: bool,
}

impl Machine {
    pub fn new(throttle: Throttle) -> Machine {
        Machine { throttle, deferred: None, installed: false }
    }

    /// The checks a batch of events calls for.
    pub fn decide(&mut self, events: &[Event], now: Instant) -> Step {
        if events.contains(&Event::Shutdown) {
            return Step::Remove;
        }
        let mut checks = Checks::default();
        for event in events {
            match event {
                Event::NetDir | Event::Wake => checks.chain = true,
                Event::Kubeconfig | Event::Token | Event::TokenTick => checks.kubeconfig = true,
                Event::Binary => checks.binary = true,
                Event::Backstop => checks = Checks { chain: true, kubeconfig: true, binary: true },
                Event::Shutdown => unreachable!("handled above"),
            }
        }
        // While a repair is held back, reverts are not even read: that is what bounds
        // the work an agent fighting us can cause.
        match self.deferred {
            Some(at) if now < at => checks.chain = false,
            Some(_) => (self.deferred, checks.chain) = (None, true),
            None => {}
        }
        Step::Check(checks)
    }

    /// Whether `plan` may be applied now.
    pub fn gate(&mut self, plan: &Plan, now: Instant) -> Gate {
        match plan {
            Plan::InPlace { .. } => {
                self.installed = true;
                Gate::Idle
            }
            Plan::Apply { .. } if !self.installed => {
                self.installed = true;
                Gate::Write { repair: false, fight: None }
            }
            Plan::Apply { .. } => match self.throttle.admit(now) {
                Verdict::Now => Gate::Write { repair: true, fight: self.throttle.record(now) },
                Verdict::NotBefore(at) => {
                    self.deferred = Some(at);
                    Gate::Defer(at)
                }
            },
            Plan::Waiting { .. } | Plan::Refused { .. } => Gate::Idle,
        }
    }

    /// When the loop must wake up by itself (a held-back repair).
    pub fn wake_at(&self) -> Option<Instant> {
        self.deferred
    }

    pub fn fighting(&mut self, now: Instant) -> bool {
        self.throttle.fighting(now)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn apply() -> Plan {
        Plan::Apply { file: "10-calico.conflist".into(), primary: vec!["calico".into()], ops: Vec::new() }
    }

    fn in_place() -> Plan {
        Plan::InPlace { file: "10-calico.conflist".into(), primary: vec!["calico".into()] }
    }

    #[test]
    fn events_map_to_checks_and_shutdown_wins() {
        let mut m = Machine::new(Throttle::new(3, Duration::from_secs(10)));
        let now = Instant::now();
        let check = |c, k, b| Step::Check(Checks { chain: c, kubeconfig: k, binary: b });
        assert_eq!(m.decide(&[Event::NetDir], now), check(true, false, false));
        assert_eq!(m.decide(&[Event::Kubeconfig], now), check(false, true, false));
        assert_eq!(m.decide(&[Event::Token], now), check(false, true, false));
        assert_eq!(m.decide(&[Event::Binary], now), check(false, false, true));
        assert_eq!(m.decide(&[Event::TokenTick, Event::Wake], now), check(true, true, false));
        assert_eq!(m.decide(&[Event::Backstop], now), check(true, true, true));
        assert_eq!(m.decide(&[Event::NetDir, Event::Shutdown], now), Step::Remove);
    }

    #[test]
    fn first_write_is_an_install_later_ones_repairs() {
        let mut m = Machine::new(Throttle::new(3, Duration::from_secs(10)));
        let now = Instant::now();
        assert_eq!(m.gate(&Plan::Waiting { reason: String::new() }, now), Gate::Idle);
        assert_eq!(m.gate(&apply(), now), Gate::Write { repair: false, fight: None });
        assert_eq!(m.gate(&in_place(), now), Gate::Idle);
        assert_eq!(m.gate(&apply(), now), Gate::Write { repair: true, fight: None });
    }

    #[test]
    fn a_fight_defers_repairs_and_ignores_events_until_due() {
        let mut m = Machine::new(Throttle::new(2, Duration::from_secs(10)));
        let t0 = Instant::now();
        m.gate(&apply(), t0);
        assert!(matches!(m.gate(&apply(), t0), Gate::Write { repair: true, fight: None }));
        assert!(matches!(m.gate(&apply(), t0), Gate::Write { repair: true, fight: Some(_) }));
        let Gate::Defer(at) = m.gate(&apply(), t0) else { panic!() };
        assert_eq!(at, t0 + Duration::from_secs(5));
        assert_eq!(m.wake_at(), Some(at));
        let Step::Check(c) = m.decide(&[Event::NetDir, Event::Backstop], t0 + Duration::from_secs(1)) else { panic!() };
        assert!(!c.chain && c.kubeconfig && c.binary);
        let Step::Check(c) = m.decide(&[Event::Wake], at) else { panic!() };
        assert!(c.chain);
        assert_eq!(m.wake_at(), None);
    }
}
