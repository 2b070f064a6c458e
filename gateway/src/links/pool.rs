//! A service's pool: `links` slots for each of its instances, and the pick
//! of a link for a new client (the least loaded up link over all
//! instances, ties in turn).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use edgegate_link::proto::Frame;
use parking_lot::RwLock;
use tokio::sync::mpsc;

use crate::close::CloseReason;
use crate::outbox::ClientHandle;
use crate::registry::ClientRegistry;

/// One live link: what clients bound to it hold.
#[derive(Debug)]
pub struct LinkHandle {
    pub id: u64,
    pub service: Arc<str>,
    /// The link's bounded queue towards the service.
    pub tx: mpsc::Sender<Frame>,
    /// The largest frame the service accepts (from its `Hello`): a client
    /// frame above it is refused for that client, never sent, because the
    /// service would drop the whole link on it.
    pub max_frame_bytes: usize,
    /// Clients bound to this link now: its load, for [`ServicePool::pick`].
    /// Which clients they are is kept once, in each `ClientHandle::link_id`.
    bound: AtomicUsize,
    /// Set by the link's teardown before it looks for the clients bound to
    /// it, so a client that binds too late for that look sees it instead
    /// (see [`LinkHandle::bind`]).
    down: AtomicBool,
}

impl LinkHandle {
    /// A link handle outside any pool, for the client's own tests.
    #[cfg(test)]
    pub(crate) fn detached(id: u64, tx: mpsc::Sender<Frame>) -> Self {
        Self::new(id, "test".into(), tx, 1 << 20)
    }

    pub(super) fn new(
        id: u64,
        service: Arc<str>,
        tx: mpsc::Sender<Frame>,
        max_frame_bytes: usize,
    ) -> Self {
        Self {
            id,
            service,
            tx,
            max_frame_bytes,
            bound: AtomicUsize::new(0),
            down: AtomicBool::new(false),
        }
    }

    /// Binds `client` (whose `link_id` is this link's) to this link: puts it
    /// in `clients`, where the link's frames and its teardown find it, and
    /// counts it. A client that binds to a link already going down is closed
    /// here with 1012, as the teardown closes those it finds.
    ///
    /// No client stays bound to a dead link: the teardown marks the link
    /// down, then scans each registry shard under its lock; the client is
    /// inserted under its shard's lock, then reads the mark. Either the
    /// scan of its shard comes after the insert and finds it, or it came
    /// before, and the mark (stored before that scan took the lock the
    /// insert then took) is seen here.
    pub fn bind(&self, clients: &ClientRegistry, client: Arc<ClientHandle>) {
        debug_assert_eq!(client.link_id, self.id, "bound to another link");
        self.bound.fetch_add(1, Ordering::Relaxed);
        clients.insert(client.clone());
        if self.down.load(Ordering::Acquire) {
            client.outbox.close(CloseReason::LinkLost);
        }
    }

    /// Marks the link down: from now on [`LinkHandle::bind`] closes the
    /// clients that bind to it. The teardown calls this before it looks
    /// for the clients already bound.
    pub(super) fn mark_down(&self) {
        self.down.store(true, Ordering::Release);
    }

    /// Forgets a client counted by [`LinkHandle::bind`] (the caller removes
    /// it from the registry).
    pub fn unbind(&self) {
        self.bound.fetch_sub(1, Ordering::Relaxed);
    }

    /// Clients bound to this link now.
    pub(crate) fn load(&self) -> usize {
        self.bound.load(Ordering::Relaxed)
    }
}

/// One slot of a pool: the link it holds while up.
type Slot = RwLock<Option<Arc<LinkHandle>>>;

/// One instance of a service (one configured address) and its slots.
#[derive(Debug)]
struct Instance {
    addr: Arc<str>,
    slots: Box<[Slot]>,
}

impl Instance {
    fn is_linked(&self) -> bool {
        self.slots.iter().any(|s| s.read().is_some())
    }
}

/// The links of one service: `links` slots for each of its instances.
#[derive(Debug)]
pub struct ServicePool {
    pub name: Arc<str>,
    instances: Box<[Instance]>,
    /// Where the next [`ServicePool::pick`] starts looking, so clients spread
    /// over equally loaded links in turn.
    next: AtomicUsize,
}

impl ServicePool {
    pub(super) fn new(name: &str, addresses: &[String], links: usize) -> Self {
        Self {
            name: Arc::from(name),
            instances: addresses
                .iter()
                .map(|addr| Instance {
                    addr: Arc::from(addr.as_str()),
                    slots: (0..links).map(|_| RwLock::new(None)).collect(),
                })
                .collect(),
            next: AtomicUsize::new(0),
        }
    }

    /// Every slot, interleaved by instance (slot 0 of each instance, then
    /// slot 1 of each, ...), so a scan alternates between instances.
    fn slots(&self) -> impl Iterator<Item = &Slot> + Clone {
        let per_instance = self.instances.first().map_or(0, |i| i.slots.len());
        (0..per_instance).flat_map(move |s| self.instances.iter().map(move |i| &i.slots[s]))
    }

    /// The link for a new client: the up link with the fewest clients over
    /// all instances; among equals, the next in turn. `None` when no link of
    /// the service is up.
    pub fn pick(&self) -> Option<Arc<LinkHandle>> {
        let total = self.slots().count();
        if total == 0 {
            return None;
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed) % total;
        self.slots()
            .cycle()
            .skip(start)
            .take(total)
            .filter_map(|s| s.read().clone())
            .min_by_key(|l| l.load())
    }

    /// Links up right now, over all instances.
    pub fn links_up(&self) -> usize {
        self.slots().filter(|s| s.read().is_some()).count()
    }

    /// Instances with at least one link up.
    pub fn instances_linked(&self) -> usize {
        self.instances.iter().filter(|i| i.is_linked()).count()
    }

    /// Instances configured (the service's `addresses`).
    pub fn instances(&self) -> usize {
        self.instances.len()
    }

    /// Frames queued over all up links (for the queue-depth gauge).
    pub fn queued_frames(&self) -> usize {
        self.slots()
            .filter_map(|s| s.read().clone())
            .map(|l| l.tx.max_capacity() - l.tx.capacity())
            .sum()
    }

    /// The address of instance `instance`.
    pub(super) fn address(&self, instance: usize) -> Arc<str> {
        self.instances[instance].addr.clone()
    }

    pub(super) fn set(&self, instance: usize, slot: usize, link: Option<Arc<LinkHandle>>) {
        *self.instances[instance].slots[slot].write() = link;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SlowReaderPolicy;

    fn bind_one(clients: &ClientRegistry, link: &LinkHandle, id: u64) {
        let client = ClientHandle::new(id, link.id, 1, SlowReaderPolicy::Close);
        link.bind(clients, Arc::new(client));
    }

    fn up(pool: &ServicePool, instance: usize, slot: usize, id: u64) -> Arc<LinkHandle> {
        let (tx, _rx) = mpsc::channel(1);
        let link = Arc::new(LinkHandle::new(id, pool.name.clone(), tx, 1 << 20));
        pool.set(instance, slot, Some(link.clone()));
        link
    }

    #[test]
    fn a_client_goes_to_the_least_loaded_up_link_of_any_instance() {
        let pool = ServicePool::new("s", &["a:1".into(), "b:1".into(), "c:1".into()], 1);
        let clients = ClientRegistry::default();
        assert!(pool.pick().is_none(), "no link up");
        let a = up(&pool, 0, 0, 1);
        let b = up(&pool, 1, 0, 2);
        assert_eq!((pool.instances_linked(), pool.instances()), (2, 3));
        // Equal loads: in turn.
        let first = pool.pick().unwrap();
        bind_one(&clients, &first, 1);
        let second = pool.pick().unwrap();
        bind_one(&clients, &second, 2);
        assert_ne!(first.id, second.id);
        // A restarted instance has no clients: it gets the next one.
        let c = up(&pool, 2, 0, 3);
        let next = pool.pick().unwrap();
        bind_one(&clients, &next, 3);
        assert_eq!(next.id, 3);
        assert_eq!((a.load(), b.load(), c.load()), (1, 1, 1));
        pool.set(2, 0, None);
        assert_eq!(pool.links_up(), 2);
        assert!(pool.pick().is_some_and(|l| l.id != 3));
    }
}
