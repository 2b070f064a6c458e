//! A client's outbound queue and the handle the rest of the gateway holds to
//! reach a client.
//!
//! Invariants:
//! - The queue is bounded (`capacity`); when full, the slow-reader policy
//!   decides: drop the oldest message (counted) or close the client with 1008.
//! - A close request is never dropped by the policy: it lives beside the
//!   queue, and the session writes what is queued before it, then closes.
//! - An idle client holds no queue allocation: the `VecDeque` is released
//!   when it drains after a burst.
//! - Producers (links, fan-out) never wait on a client: `push` is a short
//!   critical section, so one slow client cannot stall a publish.

use std::collections::VecDeque;
use std::sync::Arc;

use edgegate_link::proto::ClientId;
use parking_lot::{Mutex, MutexGuard};
use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::Message;

use crate::close::CloseReason;
use crate::config::SlowReaderPolicy;

/// Queue capacity kept across bursts; larger deques are released when empty.
const RETAINED_QUEUE_CAPACITY: usize = 4;

/// What `push` did with a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    Queued,
    /// Queued after dropping the oldest message (policy `drop_oldest`).
    DroppedOldest,
    /// Not queued; the client is being closed (policy `close`, or already closing).
    Refused,
}

#[derive(Debug, Default)]
struct Inner {
    queue: VecDeque<Message>,
    /// A close the session must carry out after writing what is queued.
    close: Option<CloseReason>,
}

/// The bounded outbound queue of one client.
#[derive(Debug)]
pub struct Outbox {
    inner: Mutex<Inner>,
    /// Wakes the session when something is queued or a close is requested.
    /// `notify_one` stores a permit, so a wake-up between two polls is not lost.
    ready: Notify,
    capacity: u32,
    policy: SlowReaderPolicy,
}

impl Outbox {
    pub fn new(capacity: usize, policy: SlowReaderPolicy) -> Self {
        Self {
            inner: Mutex::new(Inner::default()),
            ready: Notify::new(),
            capacity: u32::try_from(capacity).unwrap_or(u32::MAX),
            policy,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding this lock leaves a consistent queue behind.
        self.inner.lock()
    }

    /// Queues `msg`, applying the slow-reader policy when full.
    pub fn push(&self, msg: Message) -> Pushed {
        let outcome = {
            let mut inner = self.lock();
            if inner.close.is_some() {
                return Pushed::Refused;
            }
            if inner.queue.len() < self.capacity as usize {
                inner.queue.push_back(msg);
                Pushed::Queued
            } else {
                match self.policy {
                    SlowReaderPolicy::DropOldest => {
                        inner.queue.pop_front();
                        inner.queue.push_back(msg);
                        Pushed::DroppedOldest
                    }
                    SlowReaderPolicy::Close => {
                        inner.close = Some(CloseReason::SlowReader);
                        Pushed::Refused
                    }
                }
            }
        };
        self.ready.notify_one();
        outcome
    }

    /// Asks the session to close the client after what is queued. The first
    /// request wins.
    pub fn close(&self, reason: CloseReason) {
        {
            let mut inner = self.lock();
            if inner.close.is_none() {
                inner.close = Some(reason);
            }
        }
        self.ready.notify_one();
    }

    /// The next queued message, if any.
    pub fn pop(&self) -> Option<Message> {
        let mut inner = self.lock();
        let msg = inner.queue.pop_front();
        if inner.queue.is_empty() && inner.queue.capacity() > RETAINED_QUEUE_CAPACITY {
            inner.queue = VecDeque::new();
        }
        msg
    }

    /// Whether messages are waiting.
    pub fn has_queued(&self) -> bool {
        !self.lock().queue.is_empty()
    }

    /// The pending close request, if any.
    pub fn close_request(&self) -> Option<CloseReason> {
        self.lock().close.clone()
    }

    /// Whether the queue overflowed under the `close` policy: the session
    /// closes without writing the backlog.
    pub fn overflowed(&self) -> bool {
        self.lock().close == Some(CloseReason::SlowReader)
    }

    /// Completes when something was pushed or a close requested since the
    /// last completion.
    ///
    /// # Cancel safety
    /// Cancel safe: a wake-up that arrives while no one waits is kept.
    pub async fn ready(&self) {
        self.ready.notified().await;
    }
}

/// What the gateway holds of a connected client: enough to deliver to it,
/// close it, and clean up its subscriptions. The session owns the socket.
#[derive(Debug)]
pub struct ClientHandle {
    pub id: ClientId,
    /// The link this client is bound to: only that link's service may
    /// address it (one service cannot reach another's clients by id), and
    /// when that link drops the clients with its id are closed with 1012.
    /// The one record of the binding (the link keeps only a count).
    pub link_id: u64,
    pub outbox: Outbox,
    /// Topics this client is subscribed to, for clean-up when it leaves.
    pub topics: Mutex<Vec<Arc<str>>>,
}

impl ClientHandle {
    pub fn new(id: ClientId, link_id: u64, capacity: usize, policy: SlowReaderPolicy) -> Self {
        Self {
            id,
            link_id,
            outbox: Outbox::new(capacity, policy),
            topics: Mutex::new(Vec::new()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(s: &str) -> Message {
        Message::text(s)
    }

    #[test]
    fn drop_oldest_keeps_the_newest_messages() {
        let o = Outbox::new(2, SlowReaderPolicy::DropOldest);
        assert_eq!(o.push(text("a")), Pushed::Queued);
        assert_eq!(o.push(text("b")), Pushed::Queued);
        assert_eq!(o.push(text("c")), Pushed::DroppedOldest);
        assert_eq!(o.pop(), Some(text("b")));
        assert_eq!(o.pop(), Some(text("c")));
        assert_eq!(o.pop(), None);
    }

    #[test]
    fn close_policy_refuses_and_requests_1008() {
        let o = Outbox::new(1, SlowReaderPolicy::Close);
        assert_eq!(o.push(text("a")), Pushed::Queued);
        assert_eq!(o.push(text("b")), Pushed::Refused);
        assert_eq!(o.close_request(), Some(CloseReason::SlowReader));
        assert!(o.overflowed());
        // What was queued before the close is still written first.
        assert_eq!(o.pop(), Some(text("a")));
    }

    #[test]
    fn first_close_request_wins() {
        let o = Outbox::new(1, SlowReaderPolicy::DropOldest);
        o.close(CloseReason::Shutdown);
        o.close(CloseReason::service(4000, "later"));
        assert_eq!(o.close_request(), Some(CloseReason::Shutdown));
        assert!(!o.overflowed());
        assert_eq!(o.push(text("x")), Pushed::Refused);
    }

    #[test]
    fn drained_queue_releases_its_allocation() {
        let o = Outbox::new(100, SlowReaderPolicy::DropOldest);
        for _ in 0..50 {
            o.push(text("burst"));
        }
        while o.pop().is_some() {}
        assert_eq!(o.lock().queue.capacity(), 0);
    }

    #[tokio::test]
    async fn push_before_wait_is_not_lost() {
        let o = Outbox::new(1, SlowReaderPolicy::DropOldest);
        o.push(text("a"));
        tokio::time::timeout(std::time::Duration::from_secs(5), o.ready())
            .await
            .expect("stored wake-up");
    }
}
