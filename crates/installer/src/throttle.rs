//! Repair throttling: an agent that keeps reverting us (a primary CNI configured to own
//! the directory, or two installers fighting) must not turn the installer into a
//! busy loop. Pure: the caller passes the time.
//!
//! Policy: up to `limit` repairs within `window` run at once. Past that the file is
//! being fought over: repairs are spaced `window / limit` apart (so at most `limit` per
//! window), events in between are not even looked at, and a warning is due, at most
//! once per window while the fight lasts. When the reverts stop, the window empties
//! and repairs are immediate again.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Now,
    NotBefore(Instant),
}

/// The warning's figures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fight {
    pub repairs: usize,
    pub window: Duration,
    pub spacing: Duration,
}

#[derive(Debug)]
pub struct Throttle {
    limit: usize,
    window: Duration,
    recent: VecDeque<Instant>,
    last_warning: Option<Instant>,
}

impl Throttle {
    pub fn new(limit: usize, window: Duration) -> Throttle {
        Throttle { limit: limit.max(1), window, recent: VecDeque::new(), last_warning: None }
    }

    fn spacing(&self) -> Duration {
        self.window / self.limit as u32
    }

    fn expire(&mut self, now: Instant) {
        while self.recent.front().is_some_and(|&t| now.saturating_duration_since(t) >= self.window) {
            self.recent.pop_front();
        }
    }

    /// Whether the file is being fought over (repairs are being spaced out).
    pub fn fighting(&mut self, now: Instant) -> bool {
        self.expire(now);
        self.recent.len() >= self.limit
    }

    /// When a repair may run.
    pub fn admit(&mut self, now: Instant) -> Verdict {
        if !self.fighting(now) {
            return Verdict::Now;
        }
        let next = *self.recent.back().expect("fighting means recent repairs") + self.spacing();
        match next <= now {
            true => Verdict::Now,
            false => Verdict::NotBefore(next),
        }
    }

    /// Records a repair that ran. Returns the warning when one is due.
    pub fn record(&mut self, now: Instant) -> Option<Fight> {
        self.recent.push_back(now);
        if !self.fighting(now) || self.last_warning.is_some_and(|t| now.saturating_duration_since(t) < self.window) {
            return None;
        }
        self.last_warning = Some(now);
        Some(Fight { repairs: self.recent.len(), window: self.window, spacing: self.spacing() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn occasional_repairs_are_immediate() {
        let mut t = Throttle::new(3, 1000 * MS);
        let t0 = Instant::now();
        for i in 0..20 {
            let now = t0 + i * 600 * MS;
            assert_eq!(t.admit(now), Verdict::Now);
            assert_eq!(t.record(now), None);
        }
    }

    #[test]
    fn a_fight_is_warned_about_once_per_window_and_spaced_out() {
        let mut t = Throttle::new(3, 900 * MS);
        let t0 = Instant::now();
        assert_eq!(t.record(t0), None);
        assert_eq!(t.record(t0 + MS), None);
        let fight = t.record(t0 + 2 * MS).expect("third repair within the window is a fight");
        assert_eq!((fight.repairs, fight.spacing), (3, 300 * MS));
        assert_eq!(t.admit(t0 + 10 * MS), Verdict::NotBefore(t0 + 302 * MS));
        assert_eq!(t.admit(t0 + 302 * MS), Verdict::Now);
        assert_eq!(t.record(t0 + 302 * MS), None, "warned already in this window");
        // Still fighting a window later: warned again.
        let mut now = t0 + 302 * MS;
        let mut warnings = 0;
        while now < t0 + 2000 * MS {
            now = match t.admit(now) {
                Verdict::Now => now,
                Verdict::NotBefore(at) => at,
            };
            warnings += t.record(now).is_some() as usize;
            now += MS;
        }
        assert_eq!(warnings, 2);
    }

    #[test]
    fn calm_resets_it() {
        let mut t = Throttle::new(2, 100 * MS);
        let t0 = Instant::now();
        t.record(t0);
        t.record(t0);
        assert!(t.fighting(t0 + 50 * MS));
        assert!(!t.fighting(t0 + 100 * MS));
        assert_eq!(t.admit(t0 + 100 * MS), Verdict::Now);
    }
}
