//! The engine's request queue: one model, many clients, served fairly and within bounds.
//!
//! The engine works on one request at a time (it is CPU- or accelerator-bound, and its KV cache and
//! adapter sessions are not shared). Every interface (HTTP, local socket, D-Bus) takes its turn here:
//!
//! * **fair**: turns go round-robin over *clients* (a socket peer's uid and connection, a D-Bus
//!   sender, an HTTP connection), first come first served within a client, so one app flooding the
//!   service cannot starve another;
//! * **bounded**: at most `capacity` requests wait; the next gets [`Error::Busy`] at once;
//! * **cancellable**: a waiter whose [`CancelToken`] fires (its client went away) leaves the queue and
//!   frees its place without ever touching the engine;
//! * **replaceable**: [`EngineQueue::replace`] swaps in a reloaded engine between two turns (SIGHUP),
//!   so no request is dropped or sees a half-swapped engine.

use std::collections::VecDeque;
use std::ops::{Deref, DerefMut};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::generate::CancelToken;

/// How often a waiter looks at its cancel token.
const CANCEL_POLL: Duration = Duration::from_millis(20);

pub struct EngineQueue {
    engine: Mutex<Engine>,
    state: Mutex<State>,
    turn: Condvar,
    capacity: usize,
}

#[derive(Default)]
struct State {
    /// The ticket whose turn it is (it may not have locked the engine yet).
    holder: Option<u64>,
    /// The client of the last turn granted: it goes behind every other waiting client next time.
    holder_client: Option<String>,
    next_ticket: u64,
    /// Clients in round-robin order, each with its waiting tickets in arrival order.
    clients: VecDeque<(String, VecDeque<u64>)>,
    waiting: usize,
}

impl State {
    fn enqueue(&mut self, client: &str, ticket: u64) {
        match self.clients.iter_mut().find(|(c, _)| c == client) {
            Some((_, tickets)) => tickets.push_back(ticket),
            None => self.clients.push_back((client.to_string(), VecDeque::from([ticket]))),
        }
        self.waiting += 1;
    }

    /// Hands the turn to the next client in the round, and moves that client to the back. The client
    /// that just had the turn goes after everyone else waiting: its further requests may have queued
    /// (at the front of an empty round) while it held the turn, before another client arrived.
    fn grant_next(&mut self) {
        self.holder = None;
        if let Some(last) = self.holder_client.take() {
            if self.clients.len() > 1 && self.clients.front().is_some_and(|(c, _)| *c == last) {
                self.clients.rotate_left(1);
            }
        }
        while let Some((client, mut tickets)) = self.clients.pop_front() {
            if let Some(t) = tickets.pop_front() {
                self.waiting -= 1;
                self.holder = Some(t);
                if tickets.is_empty() {
                    self.holder_client = Some(client);
                } else {
                    self.holder_client = Some(client.clone());
                    self.clients.push_back((client, tickets));
                }
                return;
            }
        }
    }

    fn withdraw(&mut self, ticket: u64) {
        for (_, tickets) in self.clients.iter_mut() {
            if let Some(i) = tickets.iter().position(|&t| t == ticket) {
                tickets.remove(i);
                self.waiting -= 1;
                break;
            }
        }
        self.clients.retain(|(_, t)| !t.is_empty());
    }
}

/// Queue statistics for status reports.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct QueueStats {
    pub waiting: usize,
    pub busy: bool,
    pub capacity: usize,
}

impl EngineQueue {
    /// `capacity`: how many requests may wait (besides the one being served); at least 1.
    pub fn new(engine: Engine, capacity: usize) -> EngineQueue {
        EngineQueue {
            engine: Mutex::new(engine),
            state: Mutex::new(State::default()),
            turn: Condvar::new(),
            capacity: capacity.max(1),
        }
    }

    /// Waits for `client`'s turn and returns the engine. Fails at once with [`Error::Busy`] when
    /// `capacity` requests already wait, and with [`Error::Cancelled`] if `cancel` fires while waiting.
    pub fn lock(&self, client: &str, cancel: &CancelToken) -> Result<EngineGuard<'_>> {
        let mut st = self.state();
        let ticket = st.next_ticket;
        st.next_ticket += 1;
        if st.holder.is_none() && st.clients.is_empty() {
            st.holder = Some(ticket);
            st.holder_client = Some(client.to_string());
        } else {
            if st.waiting >= self.capacity {
                return Err(Error::Busy(format!("{} requests already wait for the model", st.waiting)));
            }
            st.enqueue(client, ticket);
            while st.holder != Some(ticket) {
                if cancel.is_cancelled() {
                    st.withdraw(ticket);
                    return Err(Error::Cancelled);
                }
                st = self.turn.wait_timeout(st, CANCEL_POLL).unwrap_or_else(|p| p.into_inner()).0;
            }
        }
        drop(st);
        // The holder alone locks the engine, so this never waits on another request.
        let engine = self.engine.lock().unwrap_or_else(|p| p.into_inner());
        Ok(EngineGuard { engine: Some(engine), queue: self })
    }

    /// Swaps in a new engine at the next turn (waiting like any client, ahead of nobody) and returns
    /// the old one. Requests already waiting are then served by the new engine.
    pub fn replace(&self, engine: Engine) -> Engine {
        let never = CancelToken::new();
        // The admission bound must not refuse a reload: wait for a place if the queue is full.
        let mut guard = loop {
            match self.lock("\0reload", &never) {
                Ok(g) => break g,
                Err(_) => std::thread::sleep(CANCEL_POLL),
            }
        };
        std::mem::replace(&mut *guard, engine)
    }

    pub fn stats(&self) -> QueueStats {
        let st = self.state();
        QueueStats { waiting: st.waiting, busy: st.holder.is_some(), capacity: self.capacity }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The engine, for one turn. Dropping it hands the turn to the next client.
pub struct EngineGuard<'a> {
    engine: Option<MutexGuard<'a, Engine>>,
    queue: &'a EngineQueue,
}

impl Deref for EngineGuard<'_> {
    type Target = Engine;
    fn deref(&self) -> &Engine {
        self.engine.as_ref().expect("engine guard used after release")
    }
}

impl DerefMut for EngineGuard<'_> {
    fn deref_mut(&mut self) -> &mut Engine {
        self.engine.as_mut().expect("engine guard used after release")
    }
}

impl Drop for EngineGuard<'_> {
    fn drop(&mut self) {
        // Unlock the engine before the next holder is named, so it never waits on us.
        self.engine.take();
        let mut st = self.queue.state();
        st.grant_next();
        drop(st);
        self.queue.turn.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The order turns are granted in, after `holder` (ticket 999, of `holder_client`).
    fn order_after(holder_client: Option<&str>, clients: &[(&str, u64)]) -> Vec<u64> {
        let mut st = State { holder: Some(999), holder_client: holder_client.map(String::from), ..Default::default() };
        for (c, t) in clients {
            st.enqueue(c, *t);
        }
        let mut out = Vec::new();
        loop {
            st.grant_next();
            match st.holder {
                Some(t) => out.push(t),
                None => break,
            }
        }
        out
    }

    fn order(clients: &[(&str, u64)]) -> Vec<u64> {
        order_after(None, clients)
    }

    #[test]
    fn turns_go_round_robin_over_clients() {
        // "a" floods with four requests before "b" and "c" arrive: they still get the second and
        // third turns.
        let got = order(&[("a", 1), ("a", 2), ("a", 3), ("a", 4), ("b", 5), ("c", 6), ("b", 7)]);
        assert_eq!(got, vec![1, 5, 6, 2, 7, 3, 4]);
    }

    #[test]
    fn the_client_holding_the_turn_goes_after_a_newcomer() {
        // "a" holds the turn and queues three more while "b" is not there yet; "b" then arrives: it
        // is next, not after a second turn of "a" (what an HTTP device flooding a server did).
        let got = order_after(Some("a"), &[("a", 1), ("a", 2), ("a", 3), ("b", 4)]);
        assert_eq!(got, vec![4, 1, 2, 3]);
    }

    #[test]
    fn withdrawn_tickets_lose_their_place_only() {
        let mut st = State { holder: Some(0), ..Default::default() };
        st.enqueue("a", 1);
        st.enqueue("b", 2);
        st.enqueue("b", 3);
        st.withdraw(2);
        assert_eq!(st.waiting, 2);
        st.grant_next();
        assert_eq!(st.holder, Some(1));
        st.grant_next();
        assert_eq!(st.holder, Some(3));
        st.grant_next();
        assert_eq!(st.holder, None);
        assert_eq!(st.waiting, 0);
    }
}
