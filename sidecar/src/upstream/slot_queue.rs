//! The wait for a stream slot on an endpoint's full set of HTTP/2
//! connections, served in turn per client connection. A leaf: the pool
//! (`pool::H2Set`) queues requests here, and each [`StreamSlot`] that ends
//! (`in_flight`) hands its slot on through [`SlotQueue::freed`].
//!
//! A slot is a [`StreamSlot`] from the moment a request takes a stream: it
//! is freed when the response ends, and also when the request never gets
//! an answer (cancelled, timed out, refused).
//!
//! How a slot flows: when every connection of the set carries its limit of
//! streams, a request joins the queue under its client (the downstream
//! connection's `ClientStreams` id, or an id of its own). A stream that
//! ends wakes exactly one waiter: the oldest request of the client whose
//! turn it is, round-robin over the clients that wait. The woken request
//! takes the slot, or, if it no longer wants it (cancelled, timed out),
//! passes it to the next in turn. While anybody waits, a newcomer queues
//! too rather than taking a slot that is being handed to a waiter.
//!
//! Why per client: the previous queue was first come, first served, so a
//! client that queued thousands of requests (an attack holding every slot
//! with streams it never reads, re-opening each one reset) made every other
//! client wait behind all of them: with 150 such connections of 100
//! streams, a victim's request waited 15.7 s (p50). In turn, a client waits
//! for at most one slot per other waiting client.
//!
//! [`StreamSlot`]: crate::upstream::in_flight::StreamSlot

use std::collections::{HashMap, VecDeque};
use std::future::poll_fn;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Poll;

use futures_util::task::AtomicWaker;

/// Ids for requests without a client connection of their own (above every
/// `ClientStreams` id, which counts up from 1).
static OWN_IDS: AtomicU64 = AtomicU64::new(1 << 63);

/// A client id for a request that has no `ClientStreams` (an HTTP/1.1
/// client's request on the mesh hop: one request per connection).
pub fn own_client_id() -> u64 {
    OWN_IDS.fetch_add(1, Ordering::Relaxed)
}

/// The requests waiting for a stream slot of one `H2Set`.
#[derive(Debug, Default)]
pub struct SlotQueue {
    state: Mutex<QueueState>,
}

#[derive(Debug, Default)]
struct QueueState {
    /// Clients with waiting requests, in the order they are served.
    turns: VecDeque<u64>,
    /// Each waiting client's requests, oldest first.
    waiting: HashMap<u64, VecDeque<Arc<Ticket>>>,
    /// Requests waiting (the sum of `waiting`'s lengths).
    len: usize,
}

/// One waiting request's wake-up.
#[derive(Debug, Default)]
struct Ticket {
    woken: AtomicBool,
    task: AtomicWaker,
}

impl Ticket {
    /// Wakes the waiting task (marked woken already, under the lock).
    fn wake(&self) {
        self.task.wake();
    }
}

impl SlotQueue {
    fn state(&self) -> MutexGuard<'_, QueueState> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Whether requests wait: a newcomer queues behind them instead of
    /// taking a slot.
    pub fn is_waiting(&self) -> bool {
        self.state().len > 0
    }

    /// A stream ended (or a slot is otherwise free): wakes the request
    /// whose turn it is, if any waits.
    pub fn freed(&self) {
        if let Some(ticket) = self.state().next_in_turn() {
            ticket.wake();
        }
    }

    /// Queues a request of `client` (at the back of its client's requests;
    /// a client not waiting yet gets the last turn).
    pub fn join(self: &Arc<Self>, client: u64) -> Queued {
        let ticket = Arc::new(Ticket::default());
        let mut state = self.state();
        let requests = state.waiting.entry(client).or_default();
        let first = requests.is_empty();
        requests.push_back(Arc::clone(&ticket));
        if first {
            state.turns.push_back(client);
        }
        state.len += 1;
        Queued {
            queue: Arc::clone(self),
            client,
            ticket,
            settled: false,
        }
    }
}

impl QueueState {
    /// Takes the oldest request of the client whose turn it is off the
    /// queue, marked woken (under the lock: a request dropped at the same
    /// time on another thread then sees it was handed the slot and passes
    /// it on); that client's next request (if any) waits for its next
    /// turn. The caller wakes its task.
    fn next_in_turn(&mut self) -> Option<Arc<Ticket>> {
        let client = self.turns.pop_front()?;
        let requests = self.waiting.get_mut(&client)?;
        let ticket = requests.pop_front()?;
        if requests.is_empty() {
            self.waiting.remove(&client);
        } else {
            self.turns.push_back(client);
        }
        self.len -= 1;
        ticket.woken.store(true, Ordering::Release);
        Some(ticket)
    }

    /// Removes a request that leaves the queue without being woken.
    fn remove(&mut self, client: u64, ticket: &Arc<Ticket>) -> bool {
        let Some(requests) = self.waiting.get_mut(&client) else {
            return false;
        };
        let Some(at) = requests.iter().position(|t| Arc::ptr_eq(t, ticket)) else {
            return false;
        };
        requests.remove(at);
        if requests.is_empty() {
            self.waiting.remove(&client);
            self.turns.retain(|&c| c != client);
        }
        self.len -= 1;
        true
    }
}

/// A request's place in a [`SlotQueue`]. Dropped after it was woken but
/// before [`Queued::served`], it passes its slot on to the next in turn;
/// dropped while waiting, it leaves the queue.
#[derive(Debug)]
pub struct Queued {
    queue: Arc<SlotQueue>,
    client: u64,
    ticket: Arc<Ticket>,
    /// Served, or put back (`again`): nothing to do on drop.
    settled: bool,
}

impl Queued {
    /// Whether a freed slot was handed to this request.
    pub fn woken(&self) -> bool {
        self.ticket.woken.load(Ordering::Acquire)
    }

    /// Waits until a freed slot is handed to this request.
    pub async fn turn(&self) {
        poll_fn(|cx| {
            self.ticket.task.register(cx.waker());
            if self.woken() {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await
    }

    /// The request took a slot: it leaves the queue, passing nothing on.
    pub fn served(mut self) {
        self.settled = true;
        let client = self.client;
        self.queue.state().remove(client, &self.ticket);
    }

    /// Woken, but the slot was gone when this request looked (taken by a
    /// request that did not queue, or its connection closed): back to the
    /// front of its client's requests, its client first in turn.
    pub fn again(mut self) -> Queued {
        self.settled = true;
        let ticket = Arc::new(Ticket::default());
        let mut state = self.queue.state();
        state.remove(self.client, &self.ticket);
        let requests = state.waiting.entry(self.client).or_default();
        let first = requests.is_empty();
        requests.push_front(Arc::clone(&ticket));
        if first {
            state.turns.push_front(self.client);
        }
        state.len += 1;
        drop(state);
        Queued {
            queue: Arc::clone(&self.queue),
            client: self.client,
            ticket,
            settled: false,
        }
    }
}

impl Drop for Queued {
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        let mut state = self.queue.state();
        if state.remove(self.client, &self.ticket) || !self.woken() {
            return;
        }
        // Handed a slot it will not take: the next in turn gets it.
        if let Some(next) = state.next_in_turn() {
            drop(state);
            next.wake();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The clients whose requests `freed` woke, in order, for `frees` slots.
    fn served_in_order(queue: &Arc<SlotQueue>, queued: &mut Vec<Queued>, frees: usize) -> Vec<u64> {
        let mut order = Vec::new();
        for _ in 0..frees {
            queue.freed();
            let at = queued
                .iter()
                .position(Queued::woken)
                .expect("a freed slot wakes one waiter");
            let woken = queued.remove(at);
            order.push(woken.client);
            woken.served();
        }
        order
    }

    #[test]
    fn a_client_with_many_waiting_requests_takes_one_slot_per_turn() {
        let queue = Arc::new(SlotQueue::default());
        // Client 1 queued 50 requests before clients 2 and 3 queued one each.
        let mut queued: Vec<Queued> = (0..50).map(|_| queue.join(1)).collect();
        queued.push(queue.join(2));
        queued.push(queue.join(3));
        assert_eq!(served_in_order(&queue, &mut queued, 4), [1, 2, 3, 1]);
        assert!(queue.is_waiting());
        assert_eq!(queue.state().len, 48);
    }

    #[test]
    fn a_client_keeps_its_own_order_and_a_freed_slot_with_no_waiter_is_not_kept() {
        let queue = Arc::new(SlotQueue::default());
        queue.freed(); // nobody waits: nothing to hand over, nothing stored
        let first = queue.join(7);
        let second = queue.join(7);
        queue.freed();
        assert!(
            first.woken() && !second.woken(),
            "oldest request of the client first"
        );
        first.served();
        second.served(); // gives up without a slot: leaves the queue
        assert!(!queue.is_waiting());
        assert!(queue.state().turns.is_empty() && queue.state().waiting.is_empty());
    }

    #[test]
    fn a_woken_request_that_is_dropped_passes_its_slot_to_the_next_in_turn() {
        let queue = Arc::new(SlotQueue::default());
        let (gone, next) = (queue.join(1), queue.join(2));
        queue.freed();
        assert!(gone.woken());
        drop(gone); // cancelled (its client went away, its deadline passed)
        assert!(next.woken(), "the slot went nowhere");
        next.served();
        assert!(!queue.is_waiting());
    }

    #[test]
    fn a_waiting_request_that_is_dropped_leaves_its_clients_turn() {
        let queue = Arc::new(SlotQueue::default());
        let (leaving, staying) = (queue.join(1), queue.join(2));
        drop(leaving);
        assert_eq!(queue.state().turns, [2]);
        queue.freed();
        assert!(staying.woken());
        staying.served();
        assert!(!queue.is_waiting());
    }

    #[test]
    fn a_request_woken_for_a_slot_already_gone_is_first_again() {
        let queue = Arc::new(SlotQueue::default());
        let (unlucky, other) = (queue.join(1), queue.join(2));
        queue.freed();
        let unlucky = unlucky.again();
        assert!(!unlucky.woken());
        queue.freed();
        assert!(unlucky.woken() && !other.woken(), "put back first in turn");
        unlucky.served();
        other.served();
        assert!(!queue.is_waiting());
    }

    #[tokio::test]
    async fn turn_completes_when_a_slot_is_handed_over() {
        let queue = Arc::new(SlotQueue::default());
        let queued = queue.join(1);
        let freeing = Arc::clone(&queue);
        tokio::spawn(async move { freeing.freed() });
        tokio::time::timeout(std::time::Duration::from_secs(10), queued.turn())
            .await
            .expect("woken");
        queued.served();
    }
}
